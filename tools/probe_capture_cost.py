"""Where a cuBLAS child graph's recording time goes (issue 15: 5,340 of them in the fused spec's 67-bucket pool).

The pool build records each GEMM child body by stream capture. This splits a recording's host time: an empty
capture, one GEMM a capture (the same m, then a new m each time), 22 GEMMs in one capture, the GEMM call outside
capture, the child node's clone into a parent, and captures spread over threads (each with its own stream and
handle). µs a item, each an average over hundreds. H100 host, 2026-12-07: empty 1.1, one GEMM 21.7 (85.1 with a
new m each time), 11.1 a GEMM at 22 a capture, 13.9 outside capture, a clone 3.1; 16.3 µs a capture on 1 thread,
21.6 / 34.8 / 38.0 on 2 / 4 / 8 (the threads serialize and contend). Last, the pool's own pattern (the fused spec's
GEMMs above tc_batch, each its own capture): the first GEMM of each (m, n, k) costs milliseconds (cuBLAS's
heuristics, and the first load of each kernel it picks), a repeat ~26 µs. H100 host, one process: the 12 m of the
buckets rounded up to 64 rows took 0.254 s (4.7 ms a first), then the 60 exact m 0.498 s (1.5 ms a first, the
kernels already loaded); alone and cold, 30 exact m took 0.404 s (2.8 ms a first). Then whether that first cost
can be paid ahead, outside capture on other threads with their own handles (not yet run).

    python tools/probe_capture_cost.py [--threads 1,2,4,8] [--total 800]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _counts(text: str) -> list[int]:
    """--threads: positive integers, comma-separated."""
    return [_positive(t) for t in text.split(",")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=_counts, default=[1, 2, 4, 8], help="recording threads to try (comma-separated)")
    ap.add_argument("--total", type=_positive, default=800, help="captures per thread count")
    args = ap.parse_args()
    total = args.total

    import cupy as cp
    from cuda.bindings import driver as drv

    from dagbuild.backends.blas import Blas

    cp.zeros(1)  # the primary context, current on this thread
    ctx = drv.cuCtxGetCurrent()[1]
    relaxed = drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED
    n, k = 2560, 2048  # TinyLlama's packed QKV
    a = cp.zeros((64, k), cp.float16)
    w = cp.zeros((n, k), cp.float16)
    c = cp.zeros((64, n), cp.float16)
    ws = cp.zeros(4 << 20, cp.uint8)

    def gemm_args(m: int) -> dict[str, tuple[str, Any]]:
        return {"m": ("i32", m), "n": ("i32", n), "k": ("i32", k), "a": ("f16", a.data.ptr),
                "b": ("f16", w.data.ptr), "c": ("f16", c.data.ptr), "workspace": ("ws", (ws.data.ptr, ws.nbytes))}

    def stream() -> Any:
        return drv.cuStreamCreate(int(drv.CUstream_flags.CU_STREAM_NON_BLOCKING))[1]

    def capture(blas: Blas, s: Any, ms: list[int]) -> Any:
        assert int(drv.cuStreamBeginCapture(s, relaxed)[0]) == 0
        for m in ms:
            blas.gemm(int(s), gemm_args(m))
        err, g = drv.cuStreamEndCapture(s)
        assert int(err) == 0, err
        return g

    def timed(label: str, reps: int, fn: Callable[[], object], per: int = 1) -> None:
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        print(f"{label:56s} {(time.perf_counter() - t0) / reps / per * 1e6:8.1f} µs")

    blas, s = Blas(), stream()
    counter = iter(range(1 << 30))
    timed("empty capture (begin, end, destroy)", 300, lambda: drv.cuGraphDestroy(capture(blas, s, [])))
    timed("1 GEMM a capture, m = 16 (with destroy)", 300, lambda: drv.cuGraphDestroy(capture(blas, s, [16])))
    timed("1 GEMM a capture, a new m each time (1..64)", 300,
          lambda: drv.cuGraphDestroy(capture(blas, s, [1 + next(counter) % 64])))
    timed("22 GEMMs in one capture, per GEMM", 30, lambda: drv.cuGraphDestroy(capture(blas, s, [16] * 22)), per=22)
    s2 = stream()
    timed("the GEMM call outside capture (no sync)", 300, lambda: blas.gemm(int(s2), gemm_args(16)))
    drv.cuStreamSynchronize(s2)
    one = capture(blas, s, [16])
    print("nodes in a 1-GEMM capture:", drv.cuGraphGetNodes(one)[2])
    parent = drv.cuGraphCreate(0)[1]
    timed("cuGraphAddChildGraphNode (a clone of that graph)", 300,
          lambda: drv.cuGraphAddChildGraphNode(parent, None, 0, one))
    t0 = time.perf_counter()
    err, exe = drv.cuGraphInstantiate(parent, 0)
    print(f"instantiate a parent of 301 GEMM children: {(time.perf_counter() - t0) * 1e3:.1f} ms ({err})")
    drv.cuGraphExecDestroy(exe)
    drv.cuGraphDestroy(parent)
    drv.cuGraphDestroy(one)

    # the fused spec's GEMM path above tc_batch: per bucket, 22 layers of (qkv, o, gate_up, down) and lm_head, each
    # GEMM one capture, with its own weight and output pointers (as the pool records them)
    shapes = [("qkv", 2560, 2048, "f32", 0.0), ("o", 2048, 2048, "f32", 1.0), ("gate_up", 11264, 2048, "f32", 0.0),
              ("down", 2048, 5632, "f32", 1.0)]
    big = cp.zeros(33 << 20, cp.float16)  # 66 MiB: a weight slice per layer and shape, at offsets like the pool's
    act = cp.zeros((256, 5632), cp.float16)
    out = cp.zeros((256, 11264), cp.float32)
    wsb = cp.zeros(32 << 20, cp.uint8)

    def pool_gemm(name: str, m: int, n: int, k: int, ct: str, beta: float, layer: int,
                  ws: Any = wsb) -> dict[str, tuple[str, Any]]:
        w_off = (layer * 4 + [s[0] for s in shapes].index(name)) * (1 << 20) * 2 % (big.nbytes - n * k * 2)
        return {"m": ("i32", m), "n": ("i32", n), "k": ("i32", k), "a": ("f16", act.data.ptr),
                "b": ("f16", big.data.ptr + w_off - w_off % 256), "c": (ct, out.data.ptr), "beta": ("f32", beta),
                "workspace": ("ws", (ws.data.ptr, ws.nbytes))}

    buckets = [*range(40, 257, 8), *range(272, 769, 16)]  # the vLLM buckets above tc_batch 32
    # first the rows rounded up to a multiple of 64 (12 distinct m), then every bucket's own m (60; 12 of them are
    # then cached already)
    for label, ms in (("m rounded up to 64", sorted({-(-m // 64) * 64 for m in buckets})), ("exact m", buckets)):
        firsts, repeats, t_all = [], [], time.perf_counter()
        for m in ms:
            for layer in range(22):
                for name, n, k, ct, beta in shapes:
                    t0 = time.perf_counter()
                    assert int(drv.cuStreamBeginCapture(s, relaxed)[0]) == 0
                    blas.gemm(int(s), pool_gemm(name, m, n, k, ct, beta, layer))
                    err, g = drv.cuStreamEndCapture(s)
                    (firsts if layer == 0 else repeats).append(time.perf_counter() - t0)
                    drv.cuGraphDestroy(g)
        t_all = time.perf_counter() - t_all
        print(f"pool pattern, {label}: {len(ms)} m x 88 GEMMs {t_all:.3f} s; first of a (m, shape) "
              f"{sum(firsts) / len(firsts) * 1e6:.1f} µs, repeats {sum(repeats) / len(repeats) * 1e6:.1f} µs "
              f"(max {max(repeats) * 1e6:.0f})")

    # whether a new shape's first cost (cuBLAS's planning) can be paid ahead, outside capture and on other threads
    # with their own handles, so that the pool's captures then find it planned: three sets of 12 m that nothing
    # above used (odd m, at most the 256 rows that act and out hold: the warm-up runs them), first captured cold,
    # then each warmed by one GEMM outside capture (1 thread, then 4; each its own handle, stream and workspace)
    odd = list(range(41, 256, 2))
    for label, ms, warmers in (("cold", odd[0:12], 0), ("warmed on 1 thread", odd[12:24], 1),
                               ("warmed on 4 threads", odd[24:36], 4)):
        t_warm = time.perf_counter()
        if warmers:
            helpers = [(Blas(), stream(), cp.zeros(32 << 20, cp.uint8)) for _ in range(warmers)]
            cp.cuda.Device().synchronize()

            def warm(i: int, helpers: list = helpers, ms: list[int] = ms, warmers: int = warmers) -> None:
                drv.cuCtxSetCurrent(ctx)
                lib, st, w = helpers[i]
                for m in ms[i::warmers]:
                    for name, n, k, ct, beta in shapes:
                        lib.gemm(int(st), pool_gemm(name, m, n, k, ct, beta, 0, w))
                drv.cuStreamSynchronize(st)

            threads = [threading.Thread(target=warm, args=(i,)) for i in range(warmers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for lib, st, _ in helpers:
                lib.close()
                drv.cuStreamDestroy(st)
        t_warm = time.perf_counter() - t_warm
        t0 = time.perf_counter()
        for m in ms:
            for name, n, k, ct, beta in shapes:
                assert int(drv.cuStreamBeginCapture(s, relaxed)[0]) == 0
                blas.gemm(int(s), pool_gemm(name, m, n, k, ct, beta, 1))
                err, g = drv.cuStreamEndCapture(s)
                drv.cuGraphDestroy(g)
        t_cap = time.perf_counter() - t0
        print(f"first GEMMs of 12 new m x 4 shapes, {label}: warm-up {t_warm:.3f} s, then their captures "
              f"{t_cap:.3f} s ({t_cap / 48 * 1e6:.0f} µs each)")

    for workers in args.threads:
        recorders = [(Blas(), stream()) for _ in range(workers)]
        graphs: list[Any] = []

        def record(i: int, recorders: list = recorders, workers: int = workers, graphs: list = graphs) -> None:
            drv.cuCtxSetCurrent(ctx)
            lib, st = recorders[i]
            for j in range(i, total, workers):
                graphs.append(capture(lib, st, [1 + j % 64]))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=record, args=(i,)) for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        dt = time.perf_counter() - t0
        print(f"{total} 1-GEMM captures on {workers} thread(s): {dt:.3f} s ({dt / total * 1e6:.1f} µs each)")
        for g in graphs:
            drv.cuGraphDestroy(g)
        for lib, st in recorders:
            lib.close()
            drv.cuStreamDestroy(st)
    blas.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
