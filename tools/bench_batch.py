#!/usr/bin/env python3
"""Batched decode, one run on one card: ms per step and tokens/s at batch 1..256, at two contexts.

For each context (default 128 and 2048 positions already in the cache) and batch B:
  dagbuild: the fused decode spec as an explicit GraphPool with one bucket per batch (the kernels each bucket's
      variants choose: the GEMV engine at batch 1, the MV engine from mv_batch, the MMA engine from mma_batch,
      batched attention from attn_batch; from gemm_batch each layer as cuBLAS GEMM child nodes);
      a step = write B tokens and positions, launch, wait, read B next tokens (host-observed).
  HF: LlamaForCausalLM (sdpa) with a StaticCache of batch B, one decode step captured by torch.cuda.graph and
      replayed (tokens and positions copied into static tensors first).
  floor: (weights + the KV bytes one step reads) / copy bandwidth, or the tensor-core time of the step's
      2 * params * B flops at the measured f16 GEMM rate, whichever is larger (the KV cache holds the model's
      type, f16, as HF's).
Both run the same random model of the config's shape (f16). Prints a table, writes JSON and a PNG of tokens/s
against batch (matplotlib; skipped with a message when absent).

  python3 tools/bench_batch.py [--config specs/configs/tinyllama.yaml] [--spec SPEC] [--batches 1,2,4,...]
                               [--contexts 128,2048] [--steps 30] [--json batch.json] [--png batch.png] [--no-hf]
                               [--set DIM=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dagbuild.bench import copy_bandwidth  # noqa: E402
from dagbuild.llama.weights import load_state_dict, random_hf_model, weight_buffer_names  # noqa: E402
from dagbuild.load import load_spec  # noqa: E402
from dagbuild.pool import GraphPool  # noqa: E402

SPEC = ROOT / "specs" / "llama_decode_fused.yaml"
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def median_ms(fn, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gemm_tflops(torch) -> float:
    """Achieved dense f16 GEMM rate (8192^3, torch.matmul): the tensor-core ceiling the floor uses."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (start.elapsed_time(end) * 1e-3) / 1e12


def dagbuild_steps(pool: GraphPool, batches, context: int, warmup: int, steps: int) -> dict[int, float]:
    out = {}
    for b in batches:
        exe = pool.get(batch=b)
        bufs = exe.buffers
        state = {"pos": context}

        def step(exe=exe, bufs=bufs, b=b, state=state):
            bufs["tokens_host"][:b] = 7
            bufs["pos_host"][:b] = state["pos"]
            state["pos"] += 1
            exe.launch(sync=True)
            return bufs["next_host"][:b].copy()

        out[b] = median_ms(step, warmup, steps)
    return out


def hf_step_ms(torch, model, batch: int, context: int, warmup: int, steps: int) -> float:
    """One StaticCache decode step of `batch` rows at `context`, captured with torch.cuda.graph and replayed."""
    import inspect

    from transformers import StaticCache

    max_len = context + warmup + steps + 8
    sig = inspect.signature(StaticCache.__init__).parameters
    kw: dict[str, Any] = {"config": model.config, "max_cache_len": max_len}
    for name, value in (("batch_size", batch), ("max_batch_size", batch), ("device", "cuda"),
                        ("dtype", torch.float16)):
        if name in sig or any(p.kind == p.VAR_KEYWORD for p in sig.values()):
            kw[name] = value
    try:
        cache = StaticCache(**kw)
    except TypeError:
        kw.pop("max_batch_size", None)
        cache = StaticCache(**kw)
    takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters
    cache_kw = "past_key_values" if "past_key_values" in inspect.signature(model.forward).parameters else "cache"
    ids = torch.full((batch, 1), 7, dtype=torch.long, device="cuda")
    pos = torch.full((1,), context, dtype=torch.long, device="cuda")

    def forward():
        kw2 = {"input_ids": ids, cache_kw: cache, "use_cache": True, "position_ids": pos.view(1, 1).expand(batch, 1)}
        if takes_cache_position:
            kw2["cache_position"] = pos
        return model(**kw2).logits[:, -1].argmax(-1)

    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            nxt = forward()
    host_ids = torch.full((batch, 1), 7, dtype=torch.long).pin_memory()
    state = {"p": context}

    def step():
        ids.copy_(host_ids, non_blocking=True)
        pos.fill_(state["p"])
        state["p"] += 1
        g.replay()
        return nxt.cpu()

    return median_ms(step, warmup, steps)  # the graph and cache are freed with this frame


def report(r: dict[str, Any]) -> str:
    lines = [f"{r['device']}: {r['config']} f16, copy {r['copy_gbps']:.0f} GB/s, f16 GEMM {r['tflops']:.0f} TFLOP/s, "
             f"weights {r['weight_bytes'] / 1e9:.2f} GB"]
    for ctx, rows in r["contexts"].items():
        lines.append(f"\ncontext {ctx}: ms per step (tokens/s)")
        lines.append(f"{'batch':>6} {'dagbuild':>20} {'HF + CUDA graph':>20} {'floor':>8} {'vs HF':>7} "
                     f"{'x floor':>8}")
        for row in rows:
            b, d, h = row["batch"], row["dagbuild_ms"], row.get("hf_ms")
            hf = f"{h:8.3f} ({b / h * 1e3:9.0f})" if h else f"{'-':>20}"
            vs = f"{h / d:6.2f}x" if h else f"{'-':>7}"
            lines.append(f"{b:>6} {d:8.3f} ({b / d * 1e3:9.0f}) {hf} {row['floor_ms']:8.3f} {vs} "
                         f"{d / row['floor_ms']:7.2f}x")
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"matplotlib is not installed: no {path} (pip install matplotlib)"
    fig, axes = plt.subplots(1, len(r["contexts"]), figsize=(6 * len(r["contexts"]), 4.5), squeeze=False)
    for ax, (ctx, rows) in zip(axes[0], r["contexts"].items(), strict=True):
        bs = [row["batch"] for row in rows]
        ax.plot(bs, [b / row["dagbuild_ms"] * 1e3 for b, row in zip(bs, rows, strict=True)], "o-", label="dagbuild")
        hf = [(b, b / row["hf_ms"] * 1e3) for b, row in zip(bs, rows, strict=True) if row.get("hf_ms")]
        if hf:
            ax.plot(*zip(*hf, strict=True), "s-", label="HF + torch.cuda.graph")
        ax.plot(bs, [b / row["floor_ms"] * 1e3 for b, row in zip(bs, rows, strict=True)], "k--", label="floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch (sequences per step)")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{r['config']} f16, context {ctx}, {r['device']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"wrote {path}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "specs" / "configs" / "tinyllama.yaml"))
    ap.add_argument("--spec", default=str(SPEC), help="the decode spec (default: the fused one)")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--contexts", default="128,2048")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--json", default="bench_batch.json")
    ap.add_argument("--png", default="bench_batch.png")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="DIM=VALUE",
                    help="override a spec dim (e.g. mv_batch=1 to run the MV engine at batch 1)")
    args = ap.parse_args(argv)
    batches = sorted({int(b) for b in args.batches.split(",")})
    contexts = [int(c) for c in args.contexts.split(",")]
    import cupy

    dims = {k: v for k, v in yaml.safe_load(Path(args.config).read_text()).items() if k != "wt"}
    max_seq = max(contexts) + args.warmup + args.steps + 8
    overrides = {**dims, "wt": "f16", "max_seq": max_seq, "cache_batch": max(batches)}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key.strip()] = int(value)
    torch = None
    if not args.no_hf:
        import torch  # noqa: F811

    copy = copy_bandwidth()
    r: dict[str, Any] = {"device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                         "config": Path(args.config).stem, "copy_gbps": copy["GBps"], "contexts": {},
                         "tflops": gemm_tflops(torch) if torch else 989.0}
    model = random_hf_model(dims, dtype="f16", seed=1, std=0.02, attn_implementation="sdpa") if torch else None
    t0 = time.perf_counter()
    with GraphPool(load_spec(args.spec), {"batch": batches}, overrides=overrides) as pool:
        r["pool_build_s"] = time.perf_counter() - t0
        big = pool.get(batch=max(batches))
        if model is not None:
            load_state_dict(big, model.state_dict())
        else:
            from dagbuild.llama.weights import random_weights

            random_weights(big, 1)
        plan = big.plan
        b = plan.buffers
        weight_bytes = sum(b[n].nbytes for n in weight_buffer_names(plan) if n != "embed_tokens")
        r["weight_bytes"] = weight_bytes
        d = plan.dims
        params = weight_bytes // b["lm_head"].itemsize
        for ctx in contexts:
            dag = dagbuild_steps(pool, batches, ctx, args.warmup, args.steps)
            rows = []
            for bb in batches:
                nodes = pool.get(batch=bb).plan.nodes  # the kernels this bucket's variants chose
                kv = bb * (ctx + 1) * d["layers"] * d["kv_heads"] * d["head_dim"] * 2 * b["k_cache"].itemsize
                tensor_ms = 2 * params * bb / (r["tflops"] * 1e12) * 1e3
                row = {"batch": bb, "dagbuild_ms": dag[bb],
                       "floor_ms": max((weight_bytes + kv) / (copy["GBps"] * 1e9) * 1e3, tensor_ms),
                       "kernels": sorted({n.op.kernel for n in nodes if hasattr(n.op, "kernel")})}
                if model is not None:
                    row["hf_ms"] = hf_step_ms(torch, model, bb, ctx, args.warmup, args.steps)
                    torch.cuda.empty_cache()
                rows.append(row)
                engines = [k for k in row["kernels"] if k.endswith(("_mv", "_mvc", "_mma", "_batched"))]
                if any(n.kind == "child" for n in nodes):
                    engines.append("cuBLAS GEMMs")
                print(f"context {ctx} batch {bb}: dagbuild {row['dagbuild_ms']:.3f} ms"
                      + (f", HF {row['hf_ms']:.3f} ms" if "hf_ms" in row else "")
                      + (f" ({', '.join(engines)})" if engines else ""), file=sys.stderr)
            r["contexts"][str(ctx)] = rows
    print(report(r))
    print(f"pool build ({len(batches)} buckets): {r['pool_build_s']:.2f} s")
    Path(args.json).write_text(json.dumps(r, indent=2))
    print(plot(r, Path(args.png)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
