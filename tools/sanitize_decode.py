#!/usr/bin/env python3
"""A few decode steps of the tiny Llama graph, for compute-sanitizer:

  compute-sanitizer --tool memcheck  --error-exitcode 1 python3 tools/sanitize_decode.py
  compute-sanitizer --tool racecheck --error-exitcode 1 python3 tools/sanitize_decode.py
  compute-sanitizer --tool initcheck --error-exitcode 1 python3 tools/sanitize_decode.py

Tiny config, max_seq 64, random weights; a 4-token prompt and 3 new tokens through LlamaDecoder.generate
(7 launches of the one explicit graph), in a batch-2 graph whose second row is padding (position -1), so
the padding path runs too. CuPy's memory pools are switched off first: with them, every buffer would be a
slice of one big allocation and memcheck could not see a kernel running past the end of its buffer into the
next one. Exits 0 when the steps ran and the tokens are valid ids.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wt", default="f32", choices=("f32", "f16", "bf16"))
    ap.add_argument("--batch", type=int, default=2, help="graph batch (rows past the one prompt are padding)")
    ap.add_argument("--max-seq", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=3)
    ap.add_argument("--spec", default="specs/llama_decode.yaml",
                    help="decode spec (specs/llama_decode_fused.yaml: the programmatic graph)")
    ap.add_argument("--set", action="append", default=[], metavar="DIM=V",
                    help="override a dim (e.g. layer_kernel=1 with --batch 1)")
    args = ap.parse_args(argv)
    sets = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.set)}

    import cupy

    cupy.cuda.set_allocator(None)  # one cudaMalloc per buffer: memcheck sees every buffer's bounds
    cupy.cuda.set_pinned_memory_allocator(None)

    from dagbuild.executable import Executable
    from dagbuild.llama.decode import LlamaDecoder, llama_plan
    from dagbuild.llama.weights import random_weights

    dims = yaml.safe_load((ROOT / "specs" / "configs" / "llama_tiny.yaml").read_text())
    plan = llama_plan({**dims, "wt": args.wt, "max_seq": args.max_seq, "batch": args.batch, **sets}, ROOT / args.spec)
    prompt = [1, 17, 300, 42]
    with Executable(plan) as exe:
        random_weights(exe, seed=0)
        gen = LlamaDecoder(exe).generate([prompt], args.new_tokens)
        cupy.cuda.Device().synchronize()
    toks = gen.tokens[0]
    ok = len(toks) == args.new_tokens and all(0 <= t < plan.dims["vocab"] for t in toks)
    print(f"sanitize_decode: {plan.name} ({len(plan.analysis.programmatic)} programmatic edges) wt={args.wt} "
          f"batch={args.batch} max_seq={args.max_seq}: "
          f"{len(gen.prefill_ms) + len(gen.decode_ms)} graph launches, prompt {prompt} -> {toks}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
