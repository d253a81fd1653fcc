#!/usr/bin/env python3
"""Write an A/B copy of a spec: one kernel's compile options or one node's launch fields changed.

Every comparison in NOTES.md runs both sides in one device call, and a side that differs in a ``-D`` knob or a
node's launch shape is a spec copy. This writes that copy from the command line instead of by hand, with the
kernel sources made absolute (so the copy works from any folder, e.g. the git-excluded scratch/), and checks
that the result still loads as a spec:

  python3 tools/spec_variant.py -o scratch/trig0.yaml --option attn=-DATTN_TRIGGER=0
  python3 tools/spec_variant.py -o scratch/down1.yaml --node 'down_proj.{l}.shared=116736'
  python3 tools/spec_variant.py -o scratch/gemm1.yaml --node 'o_gemm.{l}.shared=tc_stages * 32768 + 18432'
  python3 tools/bench_batch.py --no-hf --spec scratch/trig0.yaml ...   # then the benchmarks take --spec

``--option KERNEL=OPT`` appends OPT to that kernel's options; ``--node ID.FIELD=VALUE`` sets FIELD (a YAML
value: a number, or a string holding an expression) on every node whose id is ID and which has that field,
inside repeats too (not in its variants; an id the GEMM path switches between a kernel and a child graph
changes its kernel forms). Comments of the original are not kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPEC = ROOT / "specs" / "llama_decode_fused.yaml"


class VariantError(ValueError):
    """A change that names no kernel or node of the spec, or a malformed argument."""


def _nodes_with_id(tree: Any, node_id: str) -> list[dict]:
    """Every node dict whose ``id`` is node_id, through ``nodes`` lists and repeats (variants are not nodes)."""
    found: list[dict] = []
    if isinstance(tree, dict):
        if tree.get("id") == node_id:
            found.append(tree)
        for key, value in tree.items():
            if key != "variants":
                found += _nodes_with_id(value, node_id)
    elif isinstance(tree, list):
        for item in tree:
            found += _nodes_with_id(item, node_id)
    return found


def variant(spec: dict, base_dir: Path, options: list[str], nodes: list[str]) -> dict:
    """A changed copy of the spec's data (the input is not modified)."""
    out = yaml.safe_load(yaml.safe_dump(spec))
    kernels = out.get("kernels") or {}
    for k in kernels.values():
        if isinstance(k, dict) and "source" in k and not Path(k["source"]).is_absolute():
            k["source"] = str((base_dir / k["source"]).resolve())
    for item in options:
        name, sep, opt = item.partition("=")
        if not sep or not opt.startswith("-"):
            raise VariantError(f"--option {item!r}: expected KERNEL=-DNAME=VALUE")
        if name not in kernels:
            raise VariantError(f"--option {item!r}: the spec has no kernel {name!r}")
        kernels[name]["options"] = [*kernels[name].get("options", []), opt]
    for item in nodes:
        target, sep, value = item.partition("=")
        node_id, dot, field = target.rpartition(".")
        if not sep or not dot or not node_id or not field:
            raise VariantError(f"--node {item!r}: expected ID.FIELD=VALUE")
        matches = _nodes_with_id(out.get("nodes"), node_id)
        if not matches:
            raise VariantError(f"--node {item!r}: the spec has no node with id {node_id!r}")
        having = [node for node in matches if field in node]  # e.g. not an id's child-graph form for `shared`
        if not having:
            raise VariantError(f"--node {item!r}: no node with id {node_id!r} has a field {field!r}")
        for node in having:
            node[field] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default=str(SPEC), help="the spec to copy (default: the fused decode spec)")
    ap.add_argument("-o", "--out", required=True, help="where to write the copy")
    ap.add_argument("--option", action="append", default=[], metavar="KERNEL=OPT",
                    help="append a compile option to a kernel (e.g. attn=-DATTN_TRIGGER=0)")
    ap.add_argument("--node", action="append", default=[], metavar="ID.FIELD=VALUE",
                    help="set a field of every node with that id (e.g. 'down_proj.{l}.shared=116736')")
    args = ap.parse_args(argv)
    from dagbuild.load import SpecError, load_spec

    src = Path(args.spec)
    try:
        data = variant(yaml.safe_load(src.read_text()), src.resolve().parent, args.option, args.node)
    except VariantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# {src.name} with {' '.join(args.option + args.node)} (tools/spec_variant.py)\n"
                   + yaml.safe_dump(data, sort_keys=False, width=120))
    try:
        load_spec(out)
    except SpecError as e:
        out.unlink()
        print(f"error: the copy does not load as a spec (not written): {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
