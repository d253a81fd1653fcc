#!/usr/bin/env python3
"""Llama decode latency, batch 1, one GPU: HF transformers vs dagbuild, against a memory-bandwidth floor.

Modes (ms per token, host-observed: write the token, run the step, wait, read the next token):
  (a) HF eager: LlamaForCausalLM forward per token with its DynamicCache, greedy argmax.
  (b) HF graph: a StaticCache decode step captured once with torch.cuda.graph and replayed (the token id and
      the position are copied into static tensors before each replay).
  (c) dagbuild eager: the plan's kernels launched one by one from Python (CuPy), then a sync.
  (d) dagbuild captured: the same launch sequence stream-captured once (CuPy), replayed per token.
  (e) dagbuild explicit: dagbuild's explicitly built graph (Executable.launch).
  (f), (g) the fused spec (specs/llama_decode_fused.yaml, five kernel nodes a layer) with plain and with
      programmatic edges; (h) the same spec with layer_kernel 1: one persistent kernel node a layer
      (kernels/llama_layer.cu); (i) layer_kernel 2: one such kernel node for the whole stack of layers.
  floor: bytes of weights read per token / the device-to-device copy bandwidth (bytes read + written per
      second, best of several copies of a 1 GiB buffer).

Both models are the same random model: an HF causal LM of the config's shape (fp16 for a dims YAML, tiny
included, so every mode reads the same bytes; an HF config.json brings its own class, dtype, RoPE scaling and
tied head), loaded into dagbuild with load_state_dict.
Then each distinct kernel of the explicit graph (grouped by node id prefix: q_proj, attn, lm_head, ...) is
timed alone on the device: L2 flushed, the stream held by a spin kernel while the launches queue, CUDA
events around one pass over all of that kind's nodes; GEMVs also get their achieved weight bandwidth.

  python3 tools/bench_decode.py                       # tiny config and the TinyLlama shape
  python3 tools/bench_decode.py --config specs/configs/tinyllama.yaml --steps 300 --json out.json
  python3 tools/bench_decode.py --spec specs/llama_decode_fused.yaml --config specs/configs/tinyllama.yaml
  python3 tools/bench_decode.py --config specs/configs/hf/llama-3.2-1b.json            # bf16, llama3 RoPE, tied
  python3 tools/bench_decode.py --config specs/configs/hf/llama-2-7b.json --layers 16  # f16, head_dim 128
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dagbuild.bench import copy_bandwidth, device_us_per_launch, launch_modes  # noqa: E402
from dagbuild.errors import SpecError  # noqa: E402
from dagbuild.executable import ExecOptions, Executable  # noqa: E402
from dagbuild.llama.config import from_hf, read_hf_config  # noqa: E402
from dagbuild.llama.decode import llama_plan  # noqa: E402
from dagbuild.llama.weights import (  # noqa: E402
    load_state_dict,
    matrix_bytes,
    random_hf_model,
    random_weights,
    tied_bound,
    weight_buffer_names,
)

DEFAULT_CONFIGS = ("specs/configs/llama_tiny.yaml", "specs/configs/tinyllama.yaml")
FUSED_SPEC = ROOT / "specs" / "llama_decode_fused.yaml"
#: weight matrices (packed ones too): a kernel reading one of them gets its achieved bandwidth reported
SPIN_SRC = r"""
extern "C" __global__ void dagbuild_spin(long long cycles) {
    long long t0 = clock64();
    while (clock64() - t0 < cycles) { }
}
"""


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def stats(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    return {"median_ms": statistics.median(s), "p99_ms": s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)],
            "mean_ms": statistics.fmean(s), "steps": len(s)}


def weight_bytes_per_token(plan) -> int:
    """Bytes of weights one batch-1 step reads: every weight buffer, but only one row of the embedding."""
    b = plan.buffers
    row = plan.dims["hidden"] * b["embed_tokens"].itemsize
    return sum(b[n].nbytes for n in weight_buffer_names(plan) if n != "embed_tokens") + row


def decode(prefill: Callable[[list[int]], int], step: Callable[[int, int], int], prompt: list[int], warmup: int,
           steps: int) -> tuple[list[int], list[float]]:
    """Greedy: prefill, then warmup + steps single-token steps; returns (tokens, ms of the timed steps)."""
    tok = prefill(prompt)
    out, times, pos = [tok], [], len(prompt)
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        tok = step(tok, pos)
        dt = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(dt)
        out.append(tok)
        pos += 1
    return out, times


# ---------------------------------------------------------------------------------------------------------
# HF modes
# ---------------------------------------------------------------------------------------------------------


def cache_kwarg(model) -> str:
    """The forward's KV-cache argument: ``cache`` from transformers 5.2x (``past_key_values`` deprecated)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def hf_eager(torch, model):
    state: dict[str, Any] = {}
    kw = cache_kwarg(model)

    @torch.no_grad()
    def prefill(prompt):
        out = model(input_ids=torch.tensor([prompt], device="cuda"), use_cache=True)
        state["past"] = returned_cache(out)
        return int(out.logits[0, -1].argmax())

    @torch.no_grad()
    def step(tok, pos):
        out = model(input_ids=torch.tensor([[tok]], device="cuda"), use_cache=True, **{kw: state["past"]})
        state["past"] = returned_cache(out)
        return int(out.logits[0, -1].argmax())

    return prefill, step


def static_cache(model, max_len: int, dtype, device: str = "cuda"):
    """transformers.StaticCache across versions: (config, max_batch_size, max_cache_len, device, dtype) up to
    4.45, batch_size from 4.46, (config, max_cache_len, **kwargs) with lazy allocation in 5.x."""
    from transformers import StaticCache

    sig = inspect.signature(StaticCache.__init__).parameters
    opaque = any(p.kind == p.VAR_KEYWORD for p in sig.values())
    attempts = []
    for batch_name in ("batch_size", "max_batch_size"):
        kw: dict[str, Any] = {"config": model.config, "max_cache_len": max_len}
        for name, value in ((batch_name, 1), ("device", device), ("dtype", dtype)):
            if name in sig or opaque:
                kw[name] = value
        attempts.append(kw)
    attempts.append({"config": model.config, "max_cache_len": max_len})
    error: Exception | None = None
    for kw in attempts:
        try:
            return StaticCache(**kw)
        except TypeError as e:
            error = e
    raise RuntimeError(f"cannot construct transformers.StaticCache: {error}")


def hf_graph(torch, model, max_len: int):
    """A StaticCache decode step captured with torch.cuda.graph. Positions are passed explicitly
    (position_ids, and cache_position where the forward takes it) so nothing syncs with the host inside.
    In transformers 5.2x the cache keeps its own fill level as a device tensor that every replay advances;
    it then agrees with `pos` because the capture's warm-up is undone by cache.reset() and a fresh prefill."""
    takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters
    cache_kw = cache_kwarg(model)
    cache = static_cache(model, max_len, next(model.parameters()).dtype)
    ids = torch.zeros((1, 1), dtype=torch.long, device="cuda")
    pos = torch.zeros((1,), dtype=torch.long, device="cuda")
    state: dict[str, Any] = {}

    def forward(x, p):
        kw = {"input_ids": x, cache_kw: cache, "use_cache": True, "position_ids": p.view(1, -1)}
        if takes_cache_position:
            kw["cache_position"] = p
        return model(**kw).logits

    @torch.no_grad()
    def prefill(prompt):
        n = len(prompt)
        x = torch.tensor([prompt], device="cuda")
        p = torch.arange(n, device="cuda")
        first = int(forward(x, p)[0, -1].argmax())
        if "graph" not in state:
            ids.fill_(first)
            pos.fill_(n)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    forward(ids, pos)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                state["next"] = forward(ids, pos)[0, -1].argmax()
            state["graph"] = g
            # the warm-up and the capture wrote K/V at position n: start over from a clean cache
            if hasattr(cache, "reset"):
                cache.reset()
            first = int(forward(x, p)[0, -1].argmax())
        return first

    def step(tok, p):
        ids.fill_(tok)
        pos.fill_(p)
        state["graph"].replay()
        return int(state["next"])

    return prefill, step


# ---------------------------------------------------------------------------------------------------------
# dagbuild modes
# ---------------------------------------------------------------------------------------------------------


def dagbuild_modes(cp, exe) -> dict[str, tuple[Callable, Callable]]:
    three = launch_modes(exe)
    launches = {"(c) dagbuild eager (CuPy launches)": three["eager"],
                "(d) dagbuild stream-captured graph": three["captured"],
                "(e) dagbuild explicit graph": three["explicit"]}
    modes = {name: dagbuild_modes_from(cp, exe, launch) for name, launch in launches.items()}
    modes["_keep"] = three  # its closures keep the captured graph alive
    return modes


def explicit_mode(cp, exe) -> tuple[Callable, Callable]:
    """(prefill, step) through the explicit graph only (the fused spec's rows)."""
    return dagbuild_modes_from(cp, exe, exe.launch)


def dagbuild_modes_from(cp, exe, launch) -> tuple[Callable, Callable]:
    """(prefill, step) of greedy decoding where one step is ``launch()`` of the whole decode step."""
    stream = exe.stream
    th, ph, nh = exe.buffers["tokens_host"], exe.buffers["pos_host"], exe.buffers["next_host"]

    def step(tok, pos):
        th[0] = tok
        ph[0] = pos
        launch()
        stream.synchronize()
        return int(nh[0])

    def prefill(prompt):
        exe.synchronize()
        exe.buffers["k_cache"].fill(0)
        exe.buffers["v_cache"].fill(0)
        cp.cuda.Device().synchronize()
        nxt = 0
        for p, t in enumerate(prompt):
            nxt = step(t, p)
        return nxt

    return prefill, step


def graph_device_ms(cp, exe, reps: int = 50) -> float:
    """Device time per step of back-to-back explicit graph launches (no host round trip in between)."""
    for _ in range(3):
        exe.launch(exe.stream)
    return device_us_per_launch(exe, reps) / 1e3


def kernel_times(cp, exe, copy_gbps: float, min_launches: int = 100) -> list[dict[str, Any]]:
    """Device time of each kind of node, alone: per kind, `reps` passes over all its nodes, each pass after
    an L2 flush and behind a spin kernel (so the launches queue up and run back to back), timed by events."""
    s = exe.stream
    spin = cp.RawKernel(SPIN_SRC, "dagbuild_spin")
    start, end = cp.cuda.Event(), cp.cuda.Event()
    cycles = 2_000_000
    spin((1,), (1,), (np.int64(cycles),), stream=s)
    start.record(s)
    spin((1,), (1,), (np.int64(cycles),), stream=s)
    end.record(s)
    end.synchronize()
    cycles_per_us = cycles / (cp.cuda.get_elapsed_time(start, end) * 1e3)
    l2 = int(cp.cuda.Device().attributes.get("L2CacheSize", 50 << 20))
    flush = cp.empty(max(4 * l2, 256 << 20), dtype=cp.uint8)

    ids = [n.id for n in exe.plan.topological()]
    fns = exe.eager_steps()
    groups: dict[str, list[tuple[str, Callable]]] = {}
    for nid, fn in zip(ids, fns, strict=True):
        groups.setdefault(nid.split(".")[0], []).append((nid, fn))
    by_id = exe.plan.node_by_id
    rows = []
    for kind, items in groups.items():
        reps = max(3, math.ceil(min_launches / len(items)))
        pairs = [(cp.cuda.Event(), cp.cuda.Event()) for _ in range(reps)]
        for _, fn in items:  # warm (module load, first-launch costs)
            fn(s)
        for a, b in pairs:
            cp.cuda.runtime.memsetAsync(flush.data.ptr, 0, flush.nbytes, s.ptr)
            spin((1,), (1,), (np.int64(cycles_per_us * (30 * len(items) + 100)),), stream=s)
            a.record(s)
            for _, fn in items:
                fn(s)
            b.record(s)
        s.synchronize()
        total_ms = sum(cp.cuda.get_elapsed_time(a, b) for a, b in pairs)
        us = total_ms * 1e3 / (reps * len(items))
        n0 = by_id[items[0][0]]
        row: dict[str, Any] = {"kind": kind, "nodes": len(items), "kernel": getattr(n0.op, "kernel", n0.kind),
                               "us_per_node": us, "us_per_step": us * len(items)}
        wbytes = matrix_bytes(n0.op)
        if wbytes >= 1 << 20:  # a matrix-reading kernel (GEMV): its weight bandwidth
            row["weight_bytes"] = wbytes
            row["GBps"] = wbytes / (us * 1e-6) / 1e9
            row["of_copy_bw"] = row["GBps"] / copy_gbps
        rows.append(row)
    del flush
    return rows


# ---------------------------------------------------------------------------------------------------------
# one config
# ---------------------------------------------------------------------------------------------------------


def load_config(path: Path, args) -> tuple[dict[str, Any], Any, Any]:
    """(plan overrides, HF config object or None, ModelConfig or None) of a dims YAML (f16, default rope) or an
    HF config.json / checkpoint directory (its dims, consts, RoPE and tied head; wt from the config)."""
    if path.suffix == ".json" or path.is_dir():
        import transformers

        model = read_hf_config(path)
        data = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        if args.layers:
            data["num_hidden_layers"] = args.layers
            model = from_hf(data)
        hf = transformers.AutoConfig.for_model(data.pop("model_type", "llama"), **data)
        return {**model.overrides(), "wt": args.wt or model.wt}, hf, model
    dims = {k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "wt"}
    if args.layers:
        dims["layers"] = args.layers
    return {**dims, "wt": args.wt or "f16"}, None, None


def bench_config(cp, path: Path, args, copy: dict[str, float]) -> dict[str, Any]:
    overrides, hf_config, mconf = load_config(path, args)
    wt = overrides["wt"]
    dims = {k: v for k, v in overrides.items() if k != "wt"}
    seq = {"max_seq": args.max_seq} if args.max_seq else {}
    plan = llama_plan({**overrides, "batch": 1, **seq}, args.spec)
    tied = bool(mconf and mconf.tied)
    d = plan.dims
    prompt = np.random.default_rng(0).integers(0, d["vocab"], args.prompt_len).tolist()
    steps = min(args.steps, d["max_seq"] - args.prompt_len - args.warmup - 1)
    notes = []
    if steps < args.steps:
        notes.append(f"steps clamped to {steps} by max_seq = {d['max_seq']}")
    wbytes = weight_bytes_per_token(plan)
    floor_ms = wbytes / (copy["GBps"] * 1e9) * 1e3
    result: dict[str, Any] = {"config": str(path), "dims": d, "wt": wt, "prompt_len": len(prompt),
                              "warmup": args.warmup, "steps": steps, "weight_bytes_per_token": wbytes,
                              "floor_ms": floor_ms, "modes": {}, "tokens": {}, "notes": notes}
    torch = model = None
    if not args.no_hf:
        try:
            import torch
            import transformers

            result["transformers"] = transformers.__version__
            result["torch"] = torch.__version__
            model = random_hf_model(d, config=hf_config, dtype=wt, seed=args.seed, std=0.02,
                                    attn_implementation=args.attn)
            result["hf_attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        except Exception as e:  # no torch/transformers: dagbuild modes only
            notes.append(f"HF modes skipped: {type(e).__name__}: {e}")
            torch = model = None
    with Executable(plan, bound=tied_bound(plan) if tied else None) as exe:
        if model is not None:
            load_state_dict(exe, model.state_dict(), mconf)
        else:
            random_weights(exe, args.seed, rope=mconf.rope if mconf else None)
        runs: dict[str, tuple[Callable, Callable]] = {}
        modes = dagbuild_modes(cp, exe)
        runs.update({k: v for k, v in modes.items() if not k.startswith("_")})
        if model is not None:
            runs["(a) HF eager (DynamicCache)"] = hf_eager(torch, model)
            runs["(b) HF StaticCache + torch.cuda.graph"] = hf_graph(torch, model, d["max_seq"])
        # dagbuild first: a failed HF capture cannot disturb its numbers
        for name in sorted(runs, key=lambda k: ("HF" in k, k)):
            prefill, step = runs[name]
            try:
                toks, ms = decode(prefill, step, prompt, args.warmup, steps)
            except Exception as e:
                notes.append(f"{name} failed: {type(e).__name__}: {str(e)[:300]}")
                if torch is not None:
                    torch.cuda.synchronize()
                continue
            result["modes"][name] = {**stats(ms), "x_floor": statistics.median(ms) / floor_ms}
            result["tokens"][name] = toks
        result["explicit_graph_device_ms"] = graph_device_ms(cp, exe)
        if not args.no_kernels:
            result["kernels"] = kernel_times(cp, exe, copy["GBps"])
        del modes
    if FUSED_SPEC.is_file() and not args.no_fused:
        fplan = llama_plan({**dims, "wt": wt, "batch": 1, **seq}, spec_path=FUSED_SPEC)
        lplan = llama_plan({**dims, "wt": wt, "batch": 1, **seq, "layer_kernel": 1}, spec_path=FUSED_SPEC)
        result["fused_nodes"] = len(fplan.nodes)
        result["layer_kernel_nodes"] = len(lplan.nodes)
        splan = stack_plan({**dims, "wt": wt, "batch": 1, **seq})
        result["stack_kernel_nodes"] = len(splan.nodes)
        for name, opts, p in (("(f) dagbuild fused, plain edges", ExecOptions(programmatic=False), fplan),
                              ("(g) dagbuild fused + programmatic edges", ExecOptions(), fplan),
                              ("(h) dagbuild fused, one kernel a layer", ExecOptions(), lplan),
                              ("(i) dagbuild fused, one kernel for all layers", ExecOptions(), splan)):
            try:
                with Executable(p, opts, bound=tied_bound(p) if tied else None) as exe:
                    if model is not None:
                        load_state_dict(exe, model.state_dict(), mconf)
                    else:
                        random_weights(exe, args.seed, rope=mconf.rope if mconf else None)
                    toks, ms = decode(*explicit_mode(cp, exe), prompt, args.warmup, steps)
                    result["modes"][name] = {**stats(ms), "x_floor": statistics.median(ms) / floor_ms,
                                             "device_ms": graph_device_ms(cp, exe)}
                    result["tokens"][name] = toks
                    if "programmatic" in name and not args.no_kernels:
                        result["fused_kernels"] = kernel_times(cp, exe, copy["GBps"])
            except Exception as e:
                notes.append(f"{name} failed: {type(e).__name__}: {str(e)[:300]}")
    toks = result["tokens"]
    ours = [t for k, t in toks.items() if "dagbuild" in k]
    result["dagbuild_modes_agree"] = all(t == ours[0] for t in ours) if ours else None
    ref = toks.get("(a) HF eager (DynamicCache)")
    if ref is not None:
        result["agree_with_hf_eager"] = {k: next((i for i, (x, y) in enumerate(zip(t, ref, strict=False)) if x != y),
                                                 len(t)) for k, t in toks.items()}
    runs.clear()  # the HF CUDA graph holds a private memory pool
    if model is not None:
        del model
        torch.cuda.empty_cache()
    return result


def stack_plan(dims: dict[str, Any]) -> Any:
    """The fused spec with the whole stack in one kernel node and the deepest ring that fits (12 slots at
    TinyLlama's shapes, fewer for a wider ffn; a multiple of the kernel's four warp groups)."""
    for slots in (12, 8, 4):
        try:
            return llama_plan({**dims, "layer_kernel": 2, "stack_slots": slots}, spec_path=FUSED_SPEC)
        except SpecError as e:
            if "stack_slots" not in str(e) or slots == 4:
                raise
    raise AssertionError("unreachable")


def report(r: dict[str, Any], copy: dict[str, float], device: str) -> str:
    d = r["dims"]
    lines = [f"== {Path(r['config']).stem}: hidden {d['hidden']}, layers {d['layers']}, heads {d['heads']}/"
             f"{d['kv_heads']}, head_dim {d['head_dim']}, ffn {d['ffn']}, vocab {d['vocab']}, wt {r['wt']}, batch 1 "
             f"— {device} ==",
             f"weights read per token {r['weight_bytes_per_token'] / 1e6:.2f} MB; copy bandwidth "
             f"{copy['GBps']:.0f} GB/s (read + written) -> floor {r['floor_ms']:.4f} ms/token; "
             f"prompt {r['prompt_len']}, {r['warmup']} warm-up + {r['steps']} timed steps per mode", "",
             f"{'mode':<42} {'median ms':>10} {'p99 ms':>10} {'x floor':>9}"]
    for name in sorted(r["modes"]):
        m = r["modes"][name]
        lines.append(f"{name:<42} {m['median_ms']:>10.3f} {m['p99_ms']:>10.3f} {m['x_floor']:>9.1f}")
    lines.append(f"{'floor (weights / copy bandwidth)':<42} {r['floor_ms']:>10.4f} {'':>10} {1.0:>9.1f}")
    lines.append(f"explicit graph, device time back to back: {r['explicit_graph_device_ms']:.4f} ms/step "
                 f"({r['explicit_graph_device_ms'] / r['floor_ms']:.1f} x floor)")
    for name, m in sorted(r["modes"].items()):
        if "device_ms" in m:
            nodes = {"(h)": r.get("layer_kernel_nodes"), "(i)": r.get("stack_kernel_nodes")}.get(
                name[:3], r.get("fused_nodes"))
            lines.append(f"{name}: {nodes} nodes, device time back to back {m['device_ms']:.4f} "
                         f"ms/step ({m['device_ms'] / r['floor_ms']:.2f} x floor)")
    if r.get("dagbuild_modes_agree") is not None:
        lines.append(f"dagbuild modes produce identical tokens: {r['dagbuild_modes_agree']}")
    if "agree_with_hf_eager" in r:
        agree = ", ".join(f"{k.split(')')[0]})={v}" for k, v in r["agree_with_hf_eager"].items())
        lines.append(f"leading tokens equal to HF eager's (of {r['steps'] + r['warmup'] + 1}): {agree}")
    if "hf_attn_implementation" in r:
        lines.append(f"HF: transformers {r.get('transformers')}, torch {r.get('torch')}, "
                     f"attention {r['hf_attn_implementation']}")
    for n in r["notes"]:
        lines.append(f"note: {n}")
    for key, title in (("kernels", "unfused"), ("fused_kernels", "fused")):
        if not r.get(key):
            continue
        lines += ["", f"per-kernel device time, {title} graph (each kind alone, L2 flushed, back to back):",
                  f"{'kind':<14} {'kernel':<14} {'nodes':>5} {'us/node':>9} {'us/step':>9} {'GB/s':>8} {'of copy':>8}"]
        total = 0.0
        for k in r[key]:
            total += k["us_per_step"]
            bw = f"{k['GBps']:>8.0f} {k['of_copy_bw']:>7.0%}" if "GBps" in k else f"{'':>8} {'':>8}"
            lines.append(f"{k['kind']:<14} {k['kernel']:<14} {k['nodes']:>5} {k['us_per_node']:>9.2f} "
                         f"{k['us_per_step']:>9.1f} {bw}")
        lines.append(f"sum of kernel times {total / 1e3:.4f} ms/step vs explicit graph device time "
                     f"{r['explicit_graph_device_ms']:.4f} ms/step")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", action="append", help="dims YAML, or an HF config.json / checkpoint directory "
                    "(e.g. specs/configs/hf/llama-3.2-1b.json: its RoPE, consts and tied head too; repeatable); "
                    "default: " + " and ".join(DEFAULT_CONFIGS))
    ap.add_argument("--wt", choices=["f16", "bf16", "f32"], help="weight type (default: the HF config's dtype; "
                    "f16 for a dims YAML)")
    ap.add_argument("--layers", type=int, help="override the layer count (a 7B shape in fewer layers)")
    ap.add_argument("--max-seq", type=int, help="the graphs' max_seq (default: the config's, else the spec's 512)")
    ap.add_argument("--steps", type=int, default=200, help="timed decode steps per mode (default 200)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed decode steps per mode first (default 10)")
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attn", default="sdpa", help="HF attn_implementation (default sdpa)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF modes")
    ap.add_argument("--no-kernels", action="store_true", help="skip the per-kernel table")
    ap.add_argument("--no-fused", action="store_true", help="skip the fused spec's rows")
    ap.add_argument("--json", help="write all results to this file")
    ap.add_argument("--spec", default=None, help="decode spec (default specs/llama_decode.yaml; e.g. "
                    "specs/llama_decode_fused.yaml)")
    args = ap.parse_args(argv)
    import cupy as cp

    t0 = time.perf_counter()
    device = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    copy = copy_bandwidth()
    print(f"{device}: device-to-device copy {copy['GBps']:.0f} GB/s read + written (memcpy "
          f"{copy['memcpy_GBps']:.0f}, copy kernel {copy['kernel_GBps']:.0f}; best of 3x5 copies of 1 GiB)",
          flush=True)
    results = []
    for c in args.config or DEFAULT_CONFIGS:
        path = Path(c) if Path(c).is_file() else ROOT / c
        r = bench_config(cp, path, args, copy)
        results.append(r)
        print("\n" + report(r, copy, device), flush=True)
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "copy": copy, "results": results}, indent=1,
                                              default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
