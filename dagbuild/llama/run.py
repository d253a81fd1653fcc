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
    if "steps" in p.dims and "ring" in p.buffers:  # a looped plan (--tokens-per-launch, sampling)
        return run_loop_cli(p, args)
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
        gen = dec.generate([prompt] * rows, args.tokens, on_step=_progress if show else None)
    print(f"prompt ({len(prompt)} tokens): {prompt}")
    for r, toks in enumerate(gen.tokens):
        print(f"row {r}: {toks}")
    ms = gen.ms_per_token
    print(f"{ms:.3f} ms per token (median; p99 {gen.p99_ms:.3f}), {rows * 1e3 / ms:.1f} tokens/s "
          f"over {len(gen.decode_ms)} decode steps; prefill {sum(gen.prefill_ms):.1f} ms for "
          f"{len(gen.prefill_ms)} positions, one launch each")
    return 0


def run_loop_cli(p: Plan, args: Any) -> int:
    """``dagbuild run`` through the loop: K steps per launch, sampled on the device, rows stop at --eos."""
    from ..executable import Executable
    from . import weights
    from .loop import LoopDecoder
    from .sampling import Sampling

    prompt = [int(t) % p.dims["vocab"] for t in str(args.prompt).split(",") if t.strip()]
    rows = p.dims["batch"]
    samplings = [Sampling(args.temperature, args.top_k, args.top_p, args.seed + r) for r in range(rows)]
    t0 = time.perf_counter()
    with Executable(p) as exe:
        build_ms = (time.perf_counter() - t0) * 1e3
        if args.weights:
            weights.load_checkpoint(exe, args.weights)
            source = args.weights
        else:
            seed = args.random_weights if args.random_weights is not None else 0
            weights.random_weights(exe, seed)
            source = f"random weights (seed {seed})"
        dec = LoopDecoder(exe)
        how = "greedy" if samplings[0].greedy else (f"temperature {args.temperature}, top-k {args.top_k}, "
                                                    f"top-p {args.top_p}, seed {args.seed} + row")
        print(f"{p.name}: {len(p.nodes)} nodes ({exe.loop_mode} loop of {p.dims['steps']} steps) built in "
              f"{build_ms:.1f} ms; {source}; batch {rows}, wt={p.types.get('wt')}; {how}")
        gen = dec.generate([prompt] * rows, args.tokens, samplings, None if args.eos < 0 else args.eos)
    print(f"prompt ({len(prompt)} tokens): {prompt}")
    for r, toks in enumerate(gen.tokens):
        print(f"row {r}: {toks}")
    ms = gen.ms_per_step
    print(f"{ms:.3f} ms per step ({rows * 1e3 / ms:.1f} tokens/s at batch {rows}), {gen.steps} steps (prompt "
          f"included) in {len(gen.launch_ms)} launches of up to {p.dims['steps']}")
    return 0
