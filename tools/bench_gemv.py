"""GEMV variants at the TinyLlama decode shapes: device µs per call and bandwidth, one run, one GPU.

Each variant is launched 40 times inside one CuPy-captured graph, rotating over enough weight copies
(≥ 3× the L2 size) that every call reads its weights from DRAM; time = graph time / 40.

    python tools/bench_gemv.py [--wt f16] [--batches 1,4,8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"q/o_proj": (2048, 2048), "k/v_proj": (256, 2048), "gate/up": (5632, 2048), "down": (2048, 5632),
          "lm_head": (32000, 2048)}
ROWS = {"gemv": 4, "gemvw": 16}


def main() -> int:
    import cupy as cp

    ap = argparse.ArgumentParser()
    ap.add_argument("--wt", default="f16")
    ap.add_argument("--batches", default="1,4,8")
    args = ap.parse_args()
    mod = cp.RawModule(code=(ROOT / "kernels" / "llama.cu").read_text(), options=("--std=c++17",))
    dt = {"f16": np.float16, "f32": np.float32, "bf16": np.uint16}[args.wt]
    src = cp.empty(1 << 30, cp.uint8)
    dst = cp.empty_like(src)
    s, e = cp.cuda.Event(), cp.cuda.Event()
    s.record()
    for _ in range(5):
        cp.copyto(dst, src)
    e.record()
    e.synchronize()
    bw = 5 * 2 * src.nbytes / (cp.cuda.get_elapsed_time(s, e) * 1e-3)
    del src, dst
    l2 = cp.cuda.runtime.getDeviceProperties(0)["l2CacheSize"]
    print(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}: copy {bw / 1e9:.0f} GB/s (read+write); "
          f"wt={args.wt}; µs per call, GB/s of weights, % of copy bandwidth")
    stream = cp.cuda.Stream(non_blocking=True)
    for batch in [int(b) for b in args.batches.split(",")]:
        for name, (n, k) in SHAPES.items():
            wbytes = n * k * np.dtype(dt).itemsize
            copies = max(2, -(-3 * l2 // wbytes))
            ws = [cp.asarray((np.random.default_rng(i).standard_normal((n, k)) * 0.02).astype(np.float32)).astype(dt)
                  if args.wt != "bf16" else cp.random.randint(0, 2**15, (n, k)).astype(cp.uint16)
                  for i in range(copies)]
            x = cp.asarray(np.random.default_rng(9).standard_normal((batch, k)).astype(np.float32))
            row = []
            outs = {}
            for variant, rows in ROWS.items():
                y = cp.zeros((batch, n), cp.float32)
                fn = mod.get_function(f"{variant}_{args.wt}")
                grid = (-(-n // rows),)
                with stream:
                    for i in range(3):
                        fn(grid, (256,), (ws[i % copies], x, y, np.int32(n), np.int32(k), np.int32(batch)))
                    stream.begin_capture()
                    for i in range(40):
                        fn(grid, (256,), (ws[i % copies], x, y, np.int32(n), np.int32(k), np.int32(batch)))
                    g = stream.end_capture()
                    g.launch(stream)
                    s.record(stream)
                    for _ in range(5):
                        g.launch(stream)
                    e.record(stream)
                    e.synchronize()
                us = cp.cuda.get_elapsed_time(s, e) * 1e3 / 200
                outs[variant] = y.get()
                gbs = wbytes / us / 1e3
                row.append(f"{variant} {us:7.2f} µs {gbs:7.0f} GB/s {100 * gbs / (bw / 1e9):4.0f}%")
            agree = np.abs(outs["gemv"] - outs["gemvw"]).max() / max(np.abs(outs["gemv"]).max(), 1e-30)
            print(f"batch {batch:<3} {name:<9} {n:>5}x{k:<5} " + " | ".join(row) + f" | diff {agree:.1e}")
            del ws
    return 0


if __name__ == "__main__":
    sys.exit(main())
