#!/usr/bin/env python3
"""K decode steps per launch (a loop node) against one launch per token, one GPU.

For each config (tiny, TinyLlama shape), batch (1, 8) and spec (unfused, fused), the same random weights:
  single    one launch per token through the decode spec (LlamaDecoder.step: write the token, launch,
            wait, read the next one), host-observed ms per step, median over the timed steps.
  loop K    the looped spec (dagbuild.llama.loop) at K = 1, 4, 16, 64: host-observed ms per step over whole
            launches of K steps (launch + wait + read the ring), median over launches; greedy, no EOS, so
            every launch runs K steps. Prompts of one token: every step decodes.
  device    per step, device time of back-to-back launches (CUDA events, no host round trip between):
            the single-step graph, the looped graph at K = 64 as a WHILE node and unrolled (the same nodes
            without the conditional node and its two loop kernels).
  overhead  loop overhead per step = (WHILE K=64 - unrolled K=64) / 64 in µs (at the default 4 steps per WHILE
            iteration, and at 1; with how many body edges the driver kept programmatic): what the conditional
            node and its loop kernels cost per step on the device; also (WHILE K=64) / 64 - single.

Every mode decodes the same positions (STEPS steps from position 0), so attention costs the same; the
tokens of every loop mode are checked equal to the single-step tokens.

  python3 tools/bench_loop.py                                    # everything (a few minutes)
  python3 tools/bench_loop.py --configs specs/configs/llama_tiny.yaml --batches 1 --specs llama_decode.yaml
  python3 tools/bench_loop.py --json loop.json
  python3 tools/bench_loop.py --specs llama_decode_fused.yaml --batches 1 --set layer_kernel=2 --set sms=32
                                                                 # the body's layers as one kernel node
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dagbuild.executable import ExecOptions, Executable  # noqa: E402
from dagbuild.llama.decode import LlamaDecoder, llama_plan  # noqa: E402
from dagbuild.llama.loop import LoopDecoder, looped_plan  # noqa: E402
from dagbuild.llama.weights import random_weights  # noqa: E402

sys.path.insert(0, str(ROOT / "tools"))
from timeline import parse_set  # noqa: E402

CONFIGS = ("specs/configs/llama_tiny.yaml", "specs/configs/tinyllama.yaml")
SPECS = ("llama_decode.yaml", "llama_decode_fused.yaml")
KS = (1, 4, 16, 64)
STEPS = 192  # decode steps per measurement (3 launches at K = 64)


def single_step(p: Any, steps: int, warmup: int) -> tuple[list[list[int]], list[float], float]:
    """Tokens, host ms per step, device µs per step of one launch per token."""
    import cupy

    with Executable(p) as exe:
        random_weights(exe, 0)
        dec = LlamaDecoder(exe)
        rows = p.dims["batch"]
        for _ in range(2):  # the first pass warms up
            dec.reset()
            tokens, out, ms = [1 + r for r in range(rows)], [[] for _ in range(rows)], []
            for t in range(steps):
                t0 = time.perf_counter()
                nxt = dec.step(tokens, [t] * rows)
                ms.append((time.perf_counter() - t0) * 1e3)
                tokens = [int(x) for x in nxt]
                for r in range(rows):
                    out[r].append(tokens[r])
        # device time: back-to-back launches at a mid position (the host buffers unchanged between)
        b = exe.buffers
        b["pos_host"][:] = steps // 2
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        for _ in range(warmup):
            exe.launch()
        start.record(exe.stream)
        for _ in range(steps):
            exe.launch()
        end.record(exe.stream)
        end.synchronize()
        return out, ms[warmup:], cupy.cuda.get_elapsed_time(start, end) * 1e3 / steps


def body_edges(exe: Any) -> str:
    """How many edges between kernels of the loop body the driver holds as programmatic, of how many."""
    kinds, edges = exe.driver_graph()
    scoped = {n.id for n in exe.plan.nodes if n.scope is not None}
    inner = [kind for (u, v), kind in edges.items()
             if u.split("~")[0].split("#")[0] in scoped and v.split("~")[0].split("#")[0] in scoped]
    return f"{sum(k == 'programmatic' for k in inner)}/{len(inner)}"


def looped(p: Any, k: int, steps: int, mode: str = "auto", unroll: int | None = None,
           info: dict | None = None) -> tuple[list[list[int]], list[float], float]:
    """Tokens, host ms per step per launch, device µs per step (launches of K steps back to back)."""
    import cupy

    lp = looped_plan(p, k, unroll)
    rows = p.dims["batch"]
    with Executable(lp, ExecOptions(loops=mode)) as exe:
        if info is not None:
            info["body_programmatic_edges"] = body_edges(exe)
        random_weights(exe, 0)
        dec = LoopDecoder(exe)
        for _ in range(2):  # the first pass warms up
            gen = dec.generate([[1 + r] for r in range(rows)], steps)
        per_step = [ms / s for ms, s in zip(gen.launch_ms, gen.launch_steps, strict=True) if s == k]
        # device time: the whole generation again, its launches queued back to back (the state carries over
        # on the device and through the pinned buffers, stream-ordered)
        dec.start([[1 + r] for r in range(rows)], steps)
        launches = -(-steps // k)
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(exe.stream)
        for _ in range(launches):
            exe.launch()
        end.record(exe.stream)
        end.synchronize()
        device_us = cupy.cuda.get_elapsed_time(start, end) * 1e3 / (launches * k)
        return gen.tokens, per_step or [gen.ms_per_step], device_us


def run(config: str, spec: str, batch: int, ks: tuple[int, ...], steps: int,
        overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    dims = yaml.safe_load((ROOT / config).read_text())
    dims = {**dims, **(overrides or {}), "batch": batch, "max_seq": max(int(dims.get("max_seq", 0)), steps + 2)}
    p = llama_plan(dims, ROOT / "specs" / spec)
    ref, ms, dev = single_step(p, steps, warmup=10)
    single = statistics.median(ms)
    row: dict[str, Any] = {"config": Path(config).stem, "spec": spec, "batch": batch, "nodes": len(p.nodes),
                           "set": overrides or {},
                           "single_ms": single, "single_device_us": dev, "loop": {}}
    for k in ks:
        toks, per_step, dev_k = looped(p, k, steps)
        med = statistics.median(per_step)
        row["loop"][k] = {"ms_per_step": med, "speedup": single / med, "device_us": dev_k,
                          "same_tokens": toks == ref}
    if 64 in ks:
        _, _, dev_unrolled = looped(p, 64, steps, mode="unroll")
        info: dict[str, Any] = {}
        _, _, dev_u1 = looped(p, 64, steps, unroll=1, info=info)
        row["unrolled64_device_us"] = dev_unrolled
        row["overhead_us_per_iteration"] = row["loop"][64]["device_us"] - dev_unrolled
        row["overhead_us_per_iteration_unroll1"] = dev_u1 - dev_unrolled
        row["body_programmatic_edges"] = info["body_programmatic_edges"]
        row["loop64_minus_single_us"] = row["loop"][64]["device_us"] - dev
    return row


def show(r: dict[str, Any]) -> None:
    print(f"\n{r['config']} / {r['spec']} / batch {r['batch']} {r['set'] or ''} ({r['nodes']} nodes a step): "
          f"single-step {r['single_ms']:.4f} ms/step host, {r['single_device_us']:.1f} µs device")
    print(f"  {'K':>3}  {'ms/step':>9}  {'× single':>8}  {'tokens/s':>9}  {'device µs/step':>14}  same tokens")
    for k, v in r["loop"].items():
        print(f"  {k:>3}  {v['ms_per_step']:>9.4f}  {v['speedup']:>8.2f}  {r['batch'] * 1e3 / v['ms_per_step']:>9.0f}"
              f"  {v['device_us']:>14.1f}  {v['same_tokens']}")
    if "overhead_us_per_iteration" in r:
        print(f"  loop overhead per step (WHILE K=64 − unrolled K=64, device): "
              f"{r['overhead_us_per_iteration']:.2f} µs at 4 steps per WHILE iteration, "
              f"{r['overhead_us_per_iteration_unroll1']:.2f} µs at 1 (body edges programmatic in the driver: "
              f"{r['body_programmatic_edges']}); WHILE K=64 − single-step graph: "
              f"{r['loop64_minus_single_us']:.2f} µs per step")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--specs", nargs="+", default=list(SPECS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--ks", nargs="+", type=int, default=list(KS))
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--set", action="append", default=[], metavar="DIM=V",
                    help="override a dim of every config (e.g. layer_kernel=2); batch and max_seq stay the tool's")
    args = ap.parse_args()
    overrides = parse_set(args.set)
    import cupy

    print(f"device: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    rows = []
    for config in args.configs:
        for spec in args.specs:
            for batch in args.batches:
                r = run(config, spec, batch, tuple(args.ks), args.steps, overrides)
                show(r)
                rows.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str))
    bad = [r for r in rows if not all(v["same_tokens"] for v in r["loop"].values())]
    for r in bad:
        print(f"WARNING: {r['config']}/{r['spec']}/batch {r['batch']}: a loop mode gave other tokens", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
