#!/usr/bin/env python3
"""How fast one thread block can stream weights from DRAM, by access pattern: the facts behind the GEMM tiles.

Two tables, one GPU, one run (GB/s over all blocks, and per block; one block an SM: each asks for 200 KiB of
shared memory):
  contiguous   each block reads its own contiguous region through a ring of `depth` stages: 16-byte cp.async by
               256 threads (16 KiB stages), one thread's cp.async.bulk copies (16 or 4 KiB, mbarrier ring), or
               512 threads of ld.global (8 in flight each); for 16 to 132 blocks.
  tile         a GEMM's weight tile: 64 rows x `run` bytes a stage, rows `stride` bytes apart (a row-major
               [n, k] matrix: QKV 4096, down 11264), 16-byte cp.async, `inflight` bytes in flight a block.
The reads stream 512 MiB (600 MiB for tiles) of random bytes, far beyond L2; median of 5 launches after one.
NOTES.md (2026-12-06, H100): contiguous stages reach ~95 GB/s a block, the 64 x 256-byte tile ~20 GB/s a block
with 40 blocks (what bounded kernels/gemm.cu at few tiles).

  python3 tools/bench_stream.py [--only contiguous|tile]
"""

from __future__ import annotations

import argparse
import sys

SOURCE = r"""
__device__ __forceinline__ unsigned sa(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
#define WAIT_GROUP(n) asm volatile("cp.async.wait_group " #n ";" ::: "memory")
__device__ __forceinline__ void wait_group(int n) {  // an immediate operand: n <= 15
    switch (n) {
        case 0: WAIT_GROUP(0); break;   case 1: WAIT_GROUP(1); break;   case 2: WAIT_GROUP(2); break;
        case 3: WAIT_GROUP(3); break;   case 4: WAIT_GROUP(4); break;   case 5: WAIT_GROUP(5); break;
        case 6: WAIT_GROUP(6); break;   case 7: WAIT_GROUP(7); break;   case 8: WAIT_GROUP(8); break;
        case 9: WAIT_GROUP(9); break;   case 10: WAIT_GROUP(10); break; case 11: WAIT_GROUP(11); break;
        case 12: WAIT_GROUP(12); break; case 13: WAIT_GROUP(13); break; case 14: WAIT_GROUP(14); break;
        default: WAIT_GROUP(15); break;
    }
}
__device__ __forceinline__ void cp16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(sa(dst)), "l"(src) : "memory");
}
// contiguous: stage s of 16 KiB = 4 chunks of 16 bytes a thread; `depth` stages in flight
extern "C" __global__ void cpasync_stream(const char* src, long long per_block, int depth) {
    extern __shared__ __align__(128) unsigned char sm[];
    const char* base = src + (long long)blockIdx.x * per_block;
    const long long stages = per_block / 16384;
    for (long long s = 0; s < stages; ++s) {
        unsigned char* slot = sm + (s % depth) * 16384;
        for (int c = 0; c < 4; ++c) {
            const int off = (c * 256 + (int)threadIdx.x) * 16;
            cp16(slot + off, base + s * 16384 + off);
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
        wait_group(depth - 1);
    }
    wait_group(0);
}
__device__ __forceinline__ void bar_wait(unsigned long long* bar, unsigned parity) {
    unsigned done;
    do {
        asm volatile("{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
                     "selp.u32 %0, 1, 0, p;\n\t}" : "=r"(done) : "r"(sa(bar)), "r"(parity) : "memory");
    } while (!done);
}
// contiguous: thread 0 issues one cp.async.bulk of `chunk` bytes a stage, `depth` stages (mbarriers) in flight
extern "C" __global__ void bulk_stream(const char* src, long long per_block, int depth, int chunk) {
    extern __shared__ __align__(128) unsigned char sm[];
    __shared__ __align__(8) unsigned long long bar[16];
    const char* base = src + (long long)blockIdx.x * per_block;
    if ((int)threadIdx.x < depth)
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(sa(&bar[threadIdx.x])) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    __syncthreads();
    if (threadIdx.x != 0) return;
    const long long stages = per_block / chunk;
    for (long long s = 0; s < stages; ++s) {
        const int slot = (int)(s % depth);
        if (s >= depth) bar_wait(&bar[slot], (unsigned)((s / depth - 1) & 1));
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(sa(&bar[slot])), "r"(chunk)
                     : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     :: "r"(sa(sm + slot * chunk)), "l"(base + s * chunk), "r"(chunk), "r"(sa(&bar[slot])) : "memory");
    }
    for (long long s = stages > depth ? stages - depth : 0; s < stages; ++s)
        bar_wait(&bar[s % depth], (unsigned)((s / depth) & 1));
}
// contiguous: plain 16-byte loads, 8 in flight a thread, folded so they are not dropped
extern "C" __global__ void ldg_stream(const uint4* src, long long per_block, int* sink) {
    const uint4* base = src + (long long)blockIdx.x * (per_block / 16);
    const long long n = per_block / 16;
    unsigned acc = 0;
    for (long long i = threadIdx.x; i < n; i += 8 * blockDim.x) {
        uint4 v[8];
        for (int u = 0; u < 8; ++u) {
            const long long j = i + u * blockDim.x;
            v[u] = j < n ? __ldcs(base + j) : make_uint4(0, 0, 0, 0);
        }
        for (int u = 0; u < 8; ++u) acc ^= v[u].x ^ v[u].w;
    }
    if (acc == 0x12345678u) sink[0] = (int)acc;
}
// tile: 64 rows x `run` bytes a stage of this block's 64 rows (`stride` bytes apart), k-tile after k-tile
extern "C" __global__ void tile_stream(const char* src, int stride, int run, int ktiles, int inflight) {
    extern __shared__ __align__(128) unsigned char sm[];
    const char* base = src + (long long)blockIdx.x * 64 * stride;
    const int stage = 64 * run, depth = inflight / stage, per_row = run / 16;
    for (int s = 0; s < ktiles; ++s) {
        unsigned char* slot = sm + (s % depth) * stage;
        for (int c = threadIdx.x; c < 64 * per_row; c += 256) {
            const int r = c / per_row, ch = c - r * per_row;
            cp16(slot + c * 16, base + (long long)r * stride + (long long)s * run + ch * 16);
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
        wait_group(depth - 1);
        __syncthreads();
    }
    wait_group(0);
}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["contiguous", "tile"], help="one table only")
    args = ap.parse_args()

    import cupy as cp
    import numpy as np

    mod = cp.RawModule(code=SOURCE, options=("--std=c++17",))
    smem = 200 * 1024
    fns = {}
    for name in ("cpasync_stream", "bulk_stream", "ldg_stream", "tile_stream"):
        fns[name] = mod.get_function(name)
        fns[name].max_dynamic_shared_size_bytes = smem
    buf = cp.random.randint(0, 255, 600 << 20, dtype=cp.uint8)
    sink = cp.zeros(4, cp.int32)

    def seconds(name: str, grid: int, block: int, kargs: tuple, shared: int, reps: int = 5) -> float:
        """Median seconds of one launch of kernel ``name``, after one unmeasured launch."""
        times = []
        for i in range(reps + 1):
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record()
            fns[name]((grid,), (block,), kargs, shared_mem=shared)
            e1.record()
            e1.synchronize()
            if i:
                times.append(cp.cuda.get_elapsed_time(e0, e1) * 1e-3)
        return sorted(times)[len(times) // 2]

    def cell(label: str, nbytes: int, blocks: int, t: float) -> str:
        return f"{label} {nbytes / t / 1e9:5.0f} ({nbytes / blocks / t / 1e9:5.1f})"

    props = cp.cuda.runtime.getDeviceProperties(0)
    sms = props["multiProcessorCount"]
    print(f"{props['name'].decode()}: {sms} SMs; GB/s (GB/s a block)", flush=True)
    if args.only in (None, "contiguous"):
        total = 512 << 20
        for g in (16, 33, 66, sms):
            per = (total // g) // 65536 * 65536
            i64 = np.int64(per)
            cells = [cell(f"cp.async d{d}", per * g, g,
                          seconds("cpasync_stream", g, 256, (buf, i64, np.int32(d)), smem)) for d in (2, 4, 8, 12)]
            cells += [cell(f"bulk {c >> 10}K d{d}", per * g, g,
                           seconds("bulk_stream", g, 32, (buf, i64, np.int32(d), np.int32(c)), smem))
                      for c in (16384, 4096) for d in (4, 12)]
            cells.append(cell("ldg", per * g, g, seconds("ldg_stream", g, 512, (buf, i64, sink), smem)))
            print(f"contiguous, {g:3d} blocks | " + " | ".join(cells), flush=True)
    if args.only in (None, "tile"):
        for stride in (4096, 11264):
            for g in (40, sms):
                cells = [cell(f"{run}B/{infl >> 10}K", g * 64 * stride, g,
                              seconds("tile_stream", g, 256, (buf, np.int32(stride), np.int32(run),
                                                             np.int32(stride // run), np.int32(infl)), infl))
                         for run in (128, 256, 512, 1024) for infl in (65536, 131072) if 2 * 64 * run <= infl]
                print(f"tile, rows {stride} B apart, {g:3d} blocks | " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
