"""The decode GEMM path's GEMMs, one GPU, one run: kernels/gemm.cu against cuBLAS at Llama shapes and batches.

For each projection of TinyLlama (f16) and Llama-3.2-1B (bf16) -- QKV, O, gate/up (SiLU epilogue), down, LM
head -- and each batch of --batches: 40 calls a graph, rotating over enough weight copies (>= 3x the L2) that
every call reads its weights from DRAM; kernels/gemm.cu at each split (cluster size) of --splits, chained by
programmatic edges (each call's weight tiles stream in before the previous call ends, as in the decode graph),
and cuBLAS (cublasGemmEx, f32 compute, as the child graphs record it) captured in one stream. µs a call, and
% of the device-to-device copy bandwidth measured in the same run (weight bytes only). --norms adds each
projection's form with the RMSNorms riding on the GEMMs (the spec's tc_norm 2: gemm_scaled_* for QKV, gate/up and
the LM head, gemm_add_norm for O and down; column "k<split>n"); --define NAME=V compiles every module with -D.

    python tools/bench_gemm.py [--batches 16,32,64,128,256] [--splits 1,2,4,8] [--stages 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

MODELS = {  # name: (hidden, heads, kv_heads, head_dim, ffn, vocab), weight type
    "TinyLlama": ((2048, 32, 4, 64, 5632, 32000), "f16"),
    "Llama-3.2-1B": ((2048, 32, 8, 64, 8192, 128256), "bf16"),
}
CALLS = 40


def shapes(dims: tuple[int, ...]) -> dict[str, tuple[str, int, int]]:
    """projection: (epilogue, n, k)."""
    hidden, heads, kv, hd, ffn, vocab = dims
    return {"qkv": ("store", (heads + 2 * kv) * hd, hidden), "o": ("add", hidden, heads * hd),
            "gate_up": ("silu", 2 * ffn, hidden), "down": ("add", hidden, ffn), "lm_head": ("store", vocab, hidden)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="16,32,64,128,256", help="batch rows (comma-separated)")
    ap.add_argument("--splits", default="1,2,4,8", help="kernels/gemm.cu splits to run (1, 2, 4, 8)")
    ap.add_argument("--stages", default="3", help="ring stages a block (2..7; comma-separated: each a row)")
    ap.add_argument("--row", default="256", help="bytes of a tile row a stage, GT_ROW (128, 256; comma-separated)")
    ap.add_argument("--roles", default="qkv,o,gate_up,down,lm_head", help="projections (comma-separated)")
    ap.add_argument("--models", default=",".join(MODELS), help="models (comma-separated)")
    ap.add_argument("--norms", action="store_true", help="also the forms with the norms riding on the GEMMs")
    ap.add_argument("--define", action="append", default=[], metavar="NAME=V", help="compile with -DNAME=V too")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    splits = [int(s) for s in args.splits.split(",")]
    stages = [int(s) for s in args.stages.split(",")]
    rows = [int(r) for r in args.row.split(",")]
    if any(s not in (1, 2, 4, 8) for s in splits) or any(not 2 <= s <= 7 for s in stages) or \
            any(r not in (128, 256) for r in rows):
        ap.error("--splits must be among 1, 2, 4, 8, --stages 2..7, --row 128 or 256")
    configs = [(s, r, st) for r in rows for st in stages for s in splits if st * 128 * r <= 232448]

    import cupy as cp
    from bench_gemv import chain_graph, time_graph

    from dagbuild.backends import get_backend
    from dagbuild.backends.blas import Blas
    from dagbuild.bench import copy_bandwidth
    from dagbuild.kernels import load_module
    from dagbuild.sources import read_kernel_source

    be = get_backend("auto")
    src = read_kernel_source(ROOT / "kernels" / "gemm.cu")
    defines = tuple(f"-D{d}" for d in args.define)
    mods = {(s, r): load_module(src, f"gemm_k{s}", (f"-DGT_SPLIT={s}",) + ((f"-DGT_ROW={r}",) if r != 128 else ())
                                + defines)
            for s in splits for r in rows}
    blas = Blas()
    l2 = cp.cuda.runtime.getDeviceProperties(0)["l2CacheSize"]
    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    bw = copy_bandwidth()["GBps"]
    print(f"{name}: copy {bw:.0f} GB/s; µs a call (% of copy), {CALLS}-call chains from DRAM", flush=True)
    stream = cp.cuda.Stream(non_blocking=True)
    log = []
    for model in args.models.split(","):
        dims, wt = MODELS[model]
        dt = {"f16": cp.float16, "bf16": cp.uint16}[wt]
        for role, (epi, n, k) in shapes(dims).items():
            if role not in args.roles.split(","):
                continue
            wbytes = n * k * 2
            copies = max(2, -(-3 * l2 // wbytes))
            rs = cp.random.RandomState(1)
            weights = [(rs.standard_normal((n, k), dtype=cp.float32) / np.sqrt(k)).astype(cp.float16).view(dt)
                       for _ in range(copies)]
            for batch in batches:
                a = (rs.standard_normal((batch, k), dtype=cp.float32)).astype(cp.float16).view(dt)
                out = cp.zeros((batch, n // 2 if epi == "silu" else n), dt if epi == "silu" else cp.float32)
                # the riding norms' buffers: the consumers' row parts (k / 16 a row), the producers' next norm
                # weights, operand and parts (n / 16 a row)
                ssq_in = cp.ones((batch, -(-k // 16)), cp.float32)
                gnext = cp.ones(n, cp.float16).view(dt)
                xn = cp.zeros((batch, n), dt)
                ssq_out = cp.zeros((batch, -(-n // 16)), cp.float32)
                cells = []
                forms = [(s, r, st, False) for s, r, st in configs]
                if args.norms:
                    forms += [(s, r, st, True) for s, r, st in configs if epi != "add" or s <= 4]
                for s, r, st, normed in forms:
                    name = f"gemm_{'add_norm' if epi == 'add' else 'scaled_' + epi}" if normed else f"gemm_{epi}"
                    smem = st * 128 * r + (256 if normed and epi != "add" else 0)
                    fn = mods[(s, r)].get_function(f"{name}_{wt}")
                    fn.max_dynamic_shared_size_bytes = smem
                    grid = (-(-n // 64) * s, -(-batch // 64))
                    extra = []
                    if normed and epi == "add":
                        extra = [("ptr", int(b.data.ptr)) for b in (gnext, xn, ssq_out)]
                    elif normed:
                        extra = [("ptr", int(ssq_in.data.ptr)), ("f32", 1e-5)]
                    calls = [(int(fn.kernel.ptr), grid, (256,), smem,
                              [("ptr", int(a.data.ptr)), ("ptr", int(weights[i % copies].data.ptr)),
                               ("ptr", int(out.data.ptr)), ("i32", batch), ("i32", n), ("i32", k), *extra])
                             for i in range(CALLS)]
                    with stream:
                        graph, ex = chain_graph(be, calls, True, stream.ptr)
                        us = time_graph(cp, lambda ex=ex: be.launch(ex, stream.ptr), stream) * 1e3 / CALLS
                        be.exec_destroy(ex)
                        be.graph_destroy(graph)
                    stream.synchronize()
                    cells.append((f"k{s}" + "n" * normed + (f" r{r} s{st}" if len(configs) > len(splits) else ""), us))
                # cuBLAS: f32 output (the SiLU projection writes f32 gu, then a SiLU kernel)
                c32 = cp.zeros((batch, n), cp.float32)
                ws = cp.zeros(32 << 20, cp.uint8)
                with stream:
                    stream.begin_capture()
                    for i in range(CALLS):
                        blas.gemm(stream.ptr, {"a": (wt, a.data.ptr), "b": (wt, weights[i % copies].data.ptr),
                                               "c": ("f32", c32.data.ptr), "m": ("i32", batch), "n": ("i32", n),
                                               "k": ("i32", k), "beta": ("f32", 1.0 if epi == "add" else 0.0),
                                               "workspace": ("ptr", (ws.data.ptr, ws.nbytes))})
                    g = stream.end_capture()
                    us = time_graph(cp, lambda g=g: g.launch(stream), stream) * 1e3 / CALLS
                stream.synchronize()
                cells.append(("cuBLAS", us))
                row = " | ".join(f"{t} {u:7.2f} ({100 * wbytes / u / 1e3 / bw:3.0f}%)" for t, u in cells)
                print(f"{model:<13}{role:<8}{n:>7}x{k:<6}{batch:>5} | {row}", flush=True)
                for t, u in cells:
                    log.append({"model": model, "wt": wt, "role": role, "n": n, "k": k, "batch": batch, "kernel": t,
                                "us": u, "of_copy": wbytes / u / 1e3 / bw})
                del a, out, c32, ws, ssq_in, gnext, xn, ssq_out
            del weights
            cp.get_default_memory_pool().free_all_blocks()
    blas.close()
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "copy_GBps": bw, "rows": log}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
