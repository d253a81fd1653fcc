"""``dagbuild run specs/llama_decode.yaml``: build, load weights, decode greedily, report speed."""

from __future__ import annotations

import time
from typing import Any

from ..errors import DagbuildError
from ..plan import Plan
from .decode import LlamaDecoder, _progress


def run_cli(p: Plan, args: Any) -> int:
    from ..executable import Executable
    from ..plan import plan
    from . import weights

    if p.dims["cache_batch"] < p.dims["batch"]:
        p = plan(p.spec, {**p.dims, **p.types, "cache_batch": p.dims["batch"]})
    try:
        prompt = [int(t) for t in str(args.prompt).split(",") if t.strip()]
    except ValueError:
        raise DagbuildError(f"--prompt must be comma-separated token ids, got {args.prompt!r}") from None
    prompt = [t % p.dims["vocab"] for t in prompt]
    t0 = time.perf_counter()
    with Executable(p) as exe:
        build_ms = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        if args.weights:
            weights.load_checkpoint(exe, args.weights)
            source = args.weights
        else:
            seed = args.random_weights if args.random_weights is not None else 0
            weights.random_weights(exe, seed)
            source = f"random weights (seed {seed})"
        load_s = time.perf_counter() - t1
        dec = LlamaDecoder(exe)
        rows = p.dims["batch"]
        show = not args.no_progress and args.tokens + len(prompt) > 32
        print(f"{p.name}: {len(p.nodes)} nodes in one graph, built in {build_ms:.1f} ms; "
              f"{source} loaded in {load_s:.2f} s; batch {rows}, wt={p.types.get('wt')}")
        prefiller = _prefiller(exe, getattr(args, "prefill", "graph"))
        try:
            gen = dec.generate([prompt] * rows, args.tokens, on_step=_progress if show else None, prefill=prefiller)
        finally:
            if prefiller is not None:
                prefiller.close()
    print(f"prompt ({len(prompt)} tokens): {prompt}")
    for r, toks in enumerate(gen.tokens):
        print(f"row {r}: {toks}")
    ms = gen.ms_per_token
    how = (f"prefill graphs ({len(gen.prefill_ms)} call)" if prefiller is not None else
           f"{len(gen.prefill_ms) + 1} decode-graph launches, one per position")
    print(f"{ms:.3f} ms per token (median; p99 {gen.p99_ms:.3f}), {rows * 1e3 / ms:.1f} tokens/s "
          f"over {len(gen.decode_ms)} decode steps; time to first token {gen.ttft_ms:.2f} ms for a "
          f"{len(prompt)}-token prompt through {how}")
    return 0


def _prefiller(exe: Any, mode: str) -> Any:
    """Prefill graphs for ``exe`` when asked for and its spec pairs with them (the fused one), else None."""
    if mode != "graph":
        return None
    from .prefill import Prefiller, prefill_overrides

    try:
        prefill_overrides(exe.plan)
    except DagbuildError as e:
        print(f"prefill one position at a time: {e}")
        return None
    pf = Prefiller(exe)
    print(f"prefill graphs: {len(pf.buckets)} buckets (seq {', '.join(map(str, pf.buckets))}) built in "
          f"{pf.build_s:.2f} s over the decode graph's weights and KV cache")
    return pf
