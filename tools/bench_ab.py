#!/usr/bin/env python3
"""A/B of decode spec variants in one process on one card: ms a step per variant, the rounds alternating.

  python3 tools/bench_ab.py --variant base --variant trig1=scratch/trig1.yaml \\
      --variant chunk384=:attn_decode_chunk=384 [--batches 1] [--contexts 128,2048] [--rounds 3] [--steps 30]
      [--json ab.json]

A variant is NAME[=SPEC][:DIM=V[,DIM=V...]]: SPEC defaults to the fused decode spec (tools/spec_variant.py writes
copies with other compile options or launch fields), the DIMs override spec dims. Every variant is checked and its
pool of batch buckets built (and its kernels compiled) before anything is timed, with the same random weights. Then
each round times every variant at every (context, batch) in turn, so a drift of clocks or temperature during the
run falls on all of them alike. Prints every round and the median of the rounds, with each variant's ratio to the
first. Each variant's pool stays allocated for the whole run: mind the KV caches of large batches at long contexts.
A step is what tools/bench_batch.py times: write the tokens and positions, launch, wait, read the next tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))  # bench_batch's step

SPEC = ROOT / "specs" / "llama_decode_fused.yaml"


@dataclass(frozen=True)
class Variant:
    """One side of the A/B: a spec file and the dims set on top of the common ones."""

    name: str
    spec: Path
    dims: dict[str, int] = field(default_factory=dict)


def parse_variant(text: str) -> Variant:
    """NAME[=SPEC][:DIM=V[,DIM=V...]] -> Variant; a malformed one raises ValueError naming what is wrong."""
    head, _, dims_text = text.partition(":")
    name, _, spec = head.partition("=")
    name = name.strip()
    if not name:
        raise ValueError(f"variant {text!r}: no name (NAME[=SPEC][:DIM=V,...])")
    path = Path(spec.strip()) if spec.strip() else SPEC
    if not path.is_file():
        raise ValueError(f"variant {name!r}: spec {str(path)!r} is not a file")
    dims: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in dims_text.split(","))):
        key, eq, value = item.partition("=")
        try:
            if not eq or not key.strip():
                raise ValueError
            dims[key.strip()] = int(value)
        except ValueError:
            raise ValueError(f"variant {name!r}: {item!r} is not DIM=INTEGER") from None
    return Variant(name, path, dims)


def parse_variants(texts: list[str]) -> list[Variant]:
    variants = [parse_variant(t) for t in texts or ["base"]]
    names = [v.name for v in variants]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"variant names must differ: {', '.join(dup)} given twice")
    return variants


def check_variants(variants: list[Variant], overrides: dict[str, Any], batches: list[int]) -> dict[str, Any]:
    """Load and bind every variant at every batch on the host (no GPU), so a bad spec or dim fails before any device
    work, naming the variant. Returns the loaded specs by variant name."""
    from dagbuild.bind import bind
    from dagbuild.errors import SpecError
    from dagbuild.load import load_spec

    specs = {}
    for v in variants:
        try:
            specs[v.name] = load_spec(v.spec)
        except SpecError as e:
            raise ValueError(f"variant {v.name!r}: {e}") from None
        for b in batches:
            _, issues = bind(specs[v.name], {**overrides, **v.dims, "batch": b})
            if issues:
                raise ValueError(f"variant {v.name!r} at batch {b}: {issues[0]}")
    return specs


def report(r: dict[str, Any]) -> str:
    names = [v["name"] for v in r["variants"]]
    width = max(8, *(len(n) for n in names))
    lines = [f"{r['device']} · {r['config']} · {r['rounds']} rounds of {r['steps']} steps · ms a step",
             f"{'context':>7} {'batch':>5}  {'variant':<{width}}  {'median':>7}  {'ratio':>6}  rounds"]
    for row in r["rows"]:
        base, where = row["median_ms"][names[0]], f"{row['context']:>7} {row['batch']:>5}"
        for n in names:
            med, rounds = row["median_ms"][n], " / ".join(f"{t:.3f}" for t in row["rounds_ms"][n])
            lines.append(f"{where}  {n:<{width}}  {med:7.3f}  {med / base:5.3f}x  {rounds}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", action="append", default=[], metavar="NAME[=SPEC][:DIM=V,...]",
                    help="a side of the A/B (repeatable; the first is the baseline; default: the fused spec as is)")
    ap.add_argument("--config", default=str(ROOT / "specs" / "configs" / "tinyllama.yaml"))
    ap.add_argument("--batches", default="1")
    ap.add_argument("--contexts", default="128,2048")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--json", default=None, help="write every round's figures here")
    args = ap.parse_args(argv)
    batches = sorted({int(b) for b in args.batches.split(",")})
    contexts = [int(c) for c in args.contexts.split(",")]
    dims = {k: v for k, v in yaml.safe_load(Path(args.config).read_text()).items() if k != "wt"}
    max_seq = max(contexts) + args.rounds * (args.warmup + args.steps) + 8
    overrides = {**dims, "wt": "f16", "max_seq": max_seq, "cache_batch": max(batches)}
    try:
        variants = parse_variants(args.variant)
        specs = check_variants(variants, overrides, batches)
    except ValueError as e:
        print(f"bench_ab: {e}", file=sys.stderr)
        return 2

    from bench_batch import dagbuild_steps

    from dagbuild.llama.weights import random_weights
    from dagbuild.pool import GraphPool

    try:
        import cupy

        device = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception as e:  # no CUDA device or driver: say so, not a traceback
        print(f"bench_ab: needs a CUDA GPU ({type(e).__name__}: {e}); the variants were checked on the host",
              file=sys.stderr)
        return 1
    r: dict[str, Any] = {"device": device, "config": Path(args.config).stem, "rounds": args.rounds,
                         "steps": args.steps, "variants": [{"name": v.name, "spec": str(v.spec), "dims": v.dims}
                                                           for v in variants], "rows": []}
    with ExitStack() as stack:
        pools = {}
        for v in variants:
            pool = stack.enter_context(GraphPool(specs[v.name], {"batch": batches},
                                                 overrides={**overrides, **v.dims}))
            random_weights(pool.get(batch=max(batches)), 1)
            pools[v.name] = pool
        # positions advance from the context over the rounds, alike for every variant
        times: dict[tuple[int, int], dict[str, list[float]]] = {}
        for rnd in range(args.rounds):
            for ctx in contexts:
                start = ctx + rnd * (args.warmup + args.steps)
                for v in variants:
                    for b, ms in dagbuild_steps(pools[v.name], batches, start, args.warmup, args.steps).items():
                        times.setdefault((ctx, b), {}).setdefault(v.name, []).append(ms)
    for (ctx, b), per in sorted(times.items()):
        r["rows"].append({"context": ctx, "batch": b, "rounds_ms": per,
                          "median_ms": {n: statistics.median(t) for n, t in per.items()}})
    print(report(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
