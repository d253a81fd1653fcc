"""``dagbuild run`` of a Llama decode spec: build, load weights, run the prompt, decode, report speed.

With ``--weights DIR`` the plan already carries the checkpoint's dims, dtype and consts (the CLI planned it
from config.json); here the prompt is tokenized (``--prompt TEXT``, through the chat template with
``--chat``) or taken as ids, the memory need is checked against the device's free memory, the graph is built
(a tied LM head shares the embedding table's buffer) and the checkpoint (or random weights) loaded. Then
either greedy decoding, one launch per token after the prompt ran through prefill graphs (the fused spec) or
the decode graph one position at a time, streaming text and stopping at the checkpoint's EOS ids; or, for a
looped plan (``--tokens-per-launch``, sampling, ``--eos``), K steps per launch sampled on the device.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from ..errors import DagbuildError
from ..plan import Plan, plan
from .decode import LlamaDecoder, _progress

DEFAULT_PROMPT_IDS = "1,15043,29892,590,1024,338,263,1243"


def run_cli(p: Plan, args: Any) -> int:
    from ..executable import Executable
    from . import weights
    from .config import read_hf_config
    from .footprint import check_fits, footprint

    if p.dims["cache_batch"] < p.dims["batch"]:
        p = plan(p.spec, {**p.dims, **p.types, **p.consts, "cache_batch": p.dims["batch"]})
    model = read_hf_config(weights.checkpoint_folder(args.weights)) if args.weights else None
    text = None
    if args.prompt is not None:
        from .text import Text

        text = Text(weights.checkpoint_folder(args.weights))
        prompt = text.encode(args.prompt, chat=args.chat)
        if not prompt:
            raise DagbuildError(f"--prompt {args.prompt!r} has no tokens")
    else:
        ids = args.prompt_ids if args.prompt_ids is not None else DEFAULT_PROMPT_IDS
        prompt = [int(t) for t in str(ids).split(",") if t.strip()]
        if model is not None:
            bad = [t for t in prompt if t >= p.dims["vocab"]]
            if bad:
                raise DagbuildError(f"--prompt-ids: token {bad[0]} is not below the vocabulary size {p.dims['vocab']}")
        else:
            prompt = [t % p.dims["vocab"] for t in prompt]  # the demo's ids fit any random vocabulary
    need = len(prompt) + args.tokens - 1
    if need > p.dims["max_seq"]:
        raise DagbuildError(f"the prompt ({len(prompt)} tokens) and --tokens {args.tokens} need {need} positions, "
                            f"but the graph is built for max_seq = {p.dims['max_seq']}: --set max_seq={need} "
                            "(or fewer --tokens)")
    tied = bool(model and model.tied)
    import cupy

    free, _ = cupy.cuda.runtime.memGetInfo()
    check_fits(footprint(p, tied), free, p.dims, name=f"graph {p.name!r}")
    stops = set(model.eos_ids) if model is not None else set()
    if "steps" in p.dims and "ring" in p.buffers:  # a looped plan (--tokens-per-launch, sampling)
        return run_loop_cli(p, args, prompt, tied, stops)
    _prepare_modules(p, args.prefill == "graph")
    t0 = time.perf_counter()
    with Executable(p, bound=weights.tied_bound(p) if tied else None) as exe:
        build_ms = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        source = _load_weights(exe, args)
        load_s = time.perf_counter() - t1
        dec = LlamaDecoder(exe)
        rows = p.dims["batch"]
        arch = f"{model.architecture}, " if model is not None else ""
        print(f"{p.name}: {len(p.nodes)} nodes in one graph, built in {build_ms:.1f} ms; "
              f"{source} loaded in {load_s:.2f} s; {arch}batch {rows}, wt={p.types.get('wt')}", flush=True)
        prefiller = _prefiller(exe, args.prefill)
        on_token = None
        if text is not None:
            from .text import Stream

            stream = Stream(text)
            sys.stdout.write(f"\n{args.prompt}" if not args.chat else "\n")

            def on_token(row: int, token: int) -> None:
                if row == 0 and token not in stops:
                    sys.stdout.write(stream.push(token))
                    sys.stdout.flush()

        show = text is None and not args.no_progress and args.tokens + len(prompt) > 32
        try:
            gen = dec.generate([prompt] * rows, args.tokens, on_step=_progress if show else None,
                               prefill=prefiller, stop_ids=stops, on_token=on_token)
        finally:
            if prefiller is not None:
                prefiller.close()
    if text is not None:
        print("\n")
    print(f"prompt ({len(prompt)} tokens): {prompt}")
    for r, toks in enumerate(gen.tokens):
        ended = " (EOS)" if toks and toks[-1] in stops else ""
        print(f"row {r}: {toks}{ended}")
    ms = gen.ms_per_token
    how = (f"prefill graphs ({len(gen.prefill_ms)} call)" if prefiller is not None else
           f"{len(gen.prefill_ms) + 1} decode-graph launches, one per position")
    print(f"{ms:.3f} ms per token (median; p99 {gen.p99_ms:.3f}), {rows * 1e3 / ms:.1f} tokens/s "
          f"over {len(gen.decode_ms)} decode steps; time to first token {gen.ttft_ms:.2f} ms for a "
          f"{len(prompt)}-token prompt through {how}")
    return 0


def _prepare_modules(p: Plan, prefill: bool) -> None:
    """On a machine that has not compiled them yet, the decode graph's kernel modules and (``prefill``) the
    prefill graphs' compile side by side before either is built: one after the other they took the sum."""
    from ..kernels import missing_images, prepare_images

    kernels = p.kernels_run()
    if not missing_images(kernels):
        return  # compiled before: so, most likely, were the prefill graphs' modules
    if prefill:
        from .prefill import DEFAULT_BUCKETS, prefill_overrides, prefill_spec

        try:
            dims = prefill_overrides(p)
            seq = max([b for b in DEFAULT_BUCKETS if b <= p.dims["max_seq"]] or [p.dims["max_seq"]])
            kernels += plan(prefill_spec(), {**dims, "seq": seq}).kernels_run()
        except DagbuildError:
            pass  # no prefill graphs for this plan: the prefiller says why when it is asked for
    prepare_images(kernels)


def _load_weights(exe: Any, args: Any) -> str:
    """``--weights DIR`` (an HF checkpoint) or ``--random-weights SEED`` (seed 0 by default) into ``exe``;
    returns what was loaded, for the report."""
    from . import weights

    if args.weights:
        weights.load_checkpoint(exe, args.weights)
        return args.weights
    seed = args.random_weights if args.random_weights is not None else 0
    weights.random_weights(exe, seed)
    return f"random weights (seed {seed})"


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


def run_loop_cli(p: Plan, args: Any, prompt: list[int], tied: bool, stops: set[int]) -> int:
    """``dagbuild run`` through the loop: K steps per launch, sampled on the device, rows stop at --eos (or
    the checkpoint's first EOS id)."""
    from ..executable import Executable
    from . import weights
    from .loop import LoopDecoder
    from .sampling import Sampling

    rows = p.dims["batch"]
    samplings = [Sampling(args.temperature, args.top_k, args.top_p, args.seed + r) for r in range(rows)]
    t0 = time.perf_counter()
    with Executable(p, bound=weights.tied_bound(p) if tied else None) as exe:
        build_ms = (time.perf_counter() - t0) * 1e3
        source = _load_weights(exe, args)
        dec = LoopDecoder(exe)
        how = "greedy" if samplings[0].greedy else (f"temperature {args.temperature}, top-k {args.top_k}, "
                                                    f"top-p {args.top_p}, seed {args.seed} + row")
        print(f"{p.name}: {len(p.nodes)} nodes ({exe.loop_mode} loop of {p.dims['steps']} steps) built in "
              f"{build_ms:.1f} ms; {source}; batch {rows}, wt={p.types.get('wt')}; {how}")
        eos = args.eos if args.eos >= 0 else min(stops, default=None)
        gen = dec.generate([prompt] * rows, args.tokens, samplings, eos)
    print(f"prompt ({len(prompt)} tokens): {prompt}")
    for r, toks in enumerate(gen.tokens):
        print(f"row {r}: {toks}")
    ms = gen.ms_per_step
    print(f"{ms:.3f} ms per step ({rows * 1e3 / ms:.1f} tokens/s at batch {rows}), {gen.steps} steps (prompt "
          f"included) in {len(gen.launch_ms)} launches of up to {p.dims['steps']}")
    return 0
