// dagbuild: the decode GEMM path's projections as plain kernel nodes (issue 15): Y = A W^T for a batch of rows,
// tensor cores, programmatic launch, the epilogue fused.
//
// Entries (wt = f16 | bf16 | f32; params const wt* a, const wt* w, <out>, i32 m, i32 n, i32 k):
//   gemm_store_<wt>  f32* c     c[r, j]  = sum_i a[r, i] w[j, i]                  (QKV, the LM head)
//   gemm_add_<wt>    f32* c     c[r, j] += sum_i a[r, i] w[j, i]                  (O and down: the residual)
//   gemm_silu_<wt>   wt* act    act[r, j] = wt(silu(g) * u), g, u = rows 2j, 2j+1 of the product
//                               (w_gate_up's rows interleave gate and up; n is 2 * ffn)
// a [m, k] row-major, w [n, k] row-major (nn.Linear's weight: no transposed copy), k % 8 == 0, a and w 16-byte
// aligned. grid [ceil_div(n, 64) * GT_SPLIT, ceil_div(m, 64)], block [256], dynamic shared memory: 2..7
// stages of GT_STAGE bytes (16 KiB at GT_ROW 128, 32 KiB at 256).
//
// Why not cuBLAS (a child graph a GEMM): a library kernel cannot start before its producer ends, and each
// bucket of a pool records 89 child graphs. Here a block issues its first weight tiles BEFORE
// griddepcontrol.wait (weights are never written by a graph), so at decode's few rows, where a projection is
// a stream of weight bytes, the stream starts while the previous kernel still runs; the activations are read
// after the wait. The SiLU*up of the gate/up projection and the residual adds are the epilogue.
//
// * Tile: 64 weight rows x 64 batch rows; blockIdx.x / GT_SPLIT picks the weight rows, blockIdx.y the batch
//   rows. K runs in k-tiles of GT_ROW bytes a row (128: 64 f16/bf16 or 32 f32; the spec builds 256) through a
//   cp.async ring: stage = the W tile (64 rows) then the A tile (64 rows), rows whose 16-byte chunks are
//   XOR-swizzled by row % 8, so ldmatrix's eight rows hit distinct banks. Rows past m or n and k past k are
//   zero-filled.
// * Split K (sm_90): the GT_SPLIT blocks of a thread-block cluster (__cluster_dims__(GT_SPLIT)) take
//   consecutive ranges of k-tiles; each leaves its 64 x 64 partial in shared memory and block `rank`
//   finishes rows [rank * 64 / GT_SPLIT, ...) of the tile, summing the partials of ranks 0, 1, ... in order
//   through distributed shared memory: deterministic, and a row's result never depends on the batch (its
//   sums do not mix rows). Without clusters (below sm_90, HIP) the rank-0 block does all of K.
// * Product: f16/bf16 on CUDA sm_80+: 8 warps = 4 (16 weight rows) x 2 (32 batch rows), ldmatrix.x4 +
//   mma.sync.m16n8k16, f32 sums; batch rows past m are skipped a 16-row group at a time. f32 weights (and
//   HIP): the same tiles, 16 x 16 threads of 4 x 4 outputs, f32 FMAs.
// Numerics: a is the weight type already (rmsnorm_cast / attention / the SiLU epilogue round it); products
// exact in f32, summed in f32 in k order within a split, the splits added in rank order.
//
// Measured (H100, tools/bench_gemm.py, 40-call PDL chains from DRAM; NOTES.md, 2026-12-06 evening): correct, and
// slower than cuBLAS except for the LM head at 16 rows (equal), so the spec keeps it off (tc_batch 0). A block
// streams ~10 GB/s whatever its ring depth (3, 6 or 13 stages: the same µs a call), faster with longer row runs
// a stage (GT_ROW 256 over 128: -30 %) and more blocks an SM; the weight rows as 128-byte bulk copies
// (cp.async.bulk, one a row) were 3x slower still. Not yet found: what bounds a block's stream.

#include "port.cuh"
#include "mma.cuh"
#include "llama_common.cuh"  // silu_f

#ifndef GT_SPLIT
#define GT_SPLIT 1  // blocks of a cluster splitting K (1, 2, 4 or 8; the spec's kernel options)
#endif
#define GT_THREADS 256
#define GT_BN 64          // weight rows a tile
#define GT_BM 64          // batch rows a tile
#ifndef GT_ROW
#define GT_ROW 128        // bytes of a tile row's k-tile (128 or 256): longer runs of each weight row a stage
#endif
#define GT_STAGE ((GT_BN + GT_BM) * GT_ROW)  // 16 KiB at 128-byte rows
#define GT_MAX_STAGES 7  // cp.async.wait_group takes an immediate: mm_cp_wait covers up to 5 = stages - 2
#define GT_CLD (GT_BN + 4)  // floats a row of the partial tile c[batch row][weight row] (conflict-free stores)

#if GT_SPLIT > 1 && MM_HAS_CLUSTER
#define GT_CLUSTER_ATTR __cluster_dims__(GT_SPLIT, 1, 1)
#define GT_NSPLIT GT_SPLIT
#else
#define GT_CLUSTER_ATTR
#define GT_NSPLIT 1
#endif

#define GT_STORE 0
#define GT_ADD 1
#define GT_SILU 2

// byte offset of 16-byte chunk `c` of tile row `r` (XOR-swizzled: ldmatrix's eight rows hit distinct banks)
__device__ __forceinline__ int gt_swz(int r, int c) { return r * GT_ROW + ((c ^ (r & 7)) << 4); }

__device__ __forceinline__ void gt_cp_wait(int n) {
#if DB_CUDA
    mm_cp_wait(n);  // n <= 5: GT_MAX_STAGES 7
#else
    (void)n;  // HIP: the copies were synchronous
#endif
}

// A partial tile's element in block `rank` of the cluster (this block's own below sm_90).
__device__ __forceinline__ float gt_partial(const float* p, int rank) {
#if MM_HAS_CLUSTER && GT_NSPLIT > 1
    return mm_ld_remote(mm_remote(p, rank));
#else
    (void)rank;
    return *p;
#endif
}

__device__ __forceinline__ void gt_cluster_sync() {
#if MM_HAS_CLUSTER && GT_NSPLIT > 1
    mm_cluster_sync();
#else
    __syncthreads();
#endif
}

// rows [r0, r0 + nr) of a [rows, k] matrix, k-tile kt, into a stage's tile (zero past rows / k): 16-byte
// cp.async by every thread
template <typename T>
__device__ __forceinline__ void gt_issue(unsigned char* tile, const T* src, int r0, int nr, int rows, int k, int kt) {
    constexpr int E = 16 / (int)sizeof(T), C = GT_ROW / 16;  // elements a chunk, chunks a row
    for (int c = threadIdx.x; c < nr * C; c += GT_THREADS) {
        const int r = c / C, ch = c % C, kk = kt * (GT_ROW / (int)sizeof(T)) + ch * E;
        const bool ok = r0 + r < rows && kk < k;
        db_cp_async16(tile + gt_swz(r, ch), src + (ok ? (size_t)(r0 + r) * (size_t)k + kk : 0), ok);
    }
}

// The k-tile product into the block's accumulators: tensor cores (f16/bf16, CUDA sm_80+) ...
template <typename T>
struct GtMath {
    static constexpr bool kMma = MM_HAS_MMA != 0;
    float acc[4][4];  // mma: n8 tile j of the warp's 32 batch rows; simt: [weight row][batch row] 4 x 4
};
template <>
struct GtMath<float> {
    static constexpr bool kMma = false;
    float acc[4][4];
};

template <typename T>
__device__ __forceinline__ void gt_product(GtMath<T>& g, const unsigned char* wt, const unsigned char* at,
                                           int mrows) {
    const int tid = threadIdx.x;
#if MM_HAS_MMA
    if constexpr (GtMath<T>::kMma) {
        const int lane = tid & 31, warp = tid >> 5, wn = warp & 3, wm = warp >> 2;
        if (wm * 32 >= mrows) return;  // warp-uniform: no batch rows here
#pragma unroll
        for (int ks = 0; ks < GT_ROW / 32; ++ks) {  // k16 steps of the k-tile
            unsigned int a[4];
            mm_ldmatrix_x4(a, wt + gt_swz(wn * 16 + (lane & 15), ks * 2 + (lane >> 4)));
#pragma unroll
            for (int j2 = 0; j2 < 2; ++j2) {
                if (wm * 32 + j2 * 16 >= mrows) break;
                unsigned int b[4];
                mm_ldmatrix_x4(b, at + gt_swz(wm * 32 + j2 * 16 + (lane & 7) + ((lane >> 4) << 3),
                                              ks * 2 + ((lane >> 3) & 1)));
                MmaType<T>::mma(g.acc[2 * j2], a, b[0], b[1]);
                MmaType<T>::mma(g.acc[2 * j2 + 1], a, b[2], b[3]);
            }
        }
        return;
    }
#endif
    // f32 FMAs: thread (tn, tm) holds weight rows 4 tn.. and batch rows 4 tm..
    constexpr int E = 16 / (int)sizeof(T), BK = GT_ROW / (int)sizeof(T);
    const int tn = tid & 15, tm = tid >> 4;
    if (tm * 4 >= mrows) return;
    for (int kk = 0; kk < BK; ++kk) {
        const int ch = kk / E, e = kk - ch * E;
        float wv[4], av[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            wv[i] = to_float(reinterpret_cast<const T*>(wt + gt_swz(4 * tn + i, ch))[e]);
            av[i] = to_float(reinterpret_cast<const T*>(at + gt_swz(4 * tm + i, ch))[e]);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) g.acc[i][j] = fmaf(wv[i], av[j], g.acc[i][j]);
    }
}

// The accumulators into the partial tile c[batch row * GT_CLD + weight row] (shared memory).
template <typename T>
__device__ __forceinline__ void gt_spill(const GtMath<T>& g, float* c) {
    const int tid = threadIdx.x;
#if MM_HAS_MMA
    if constexpr (GtMath<T>::kMma) {
        const int lane = tid & 31, warp = tid >> 5, wn = warp & 3, wm = warp >> 2, gid = lane >> 2, tig = lane & 3;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int col = wm * 32 + j * 8 + 2 * tig, row = wn * 16 + gid;
            c[col * GT_CLD + row] = g.acc[j][0];
            c[(col + 1) * GT_CLD + row] = g.acc[j][1];
            c[col * GT_CLD + row + 8] = g.acc[j][2];
            c[(col + 1) * GT_CLD + row + 8] = g.acc[j][3];
        }
        return;
    }
#endif
    const int tn = tid & 15, tm = tid >> 4;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) c[(4 * tm + j) * GT_CLD + 4 * tn + i] = g.acc[i][j];
}

template <typename T, int EPI, typename O>
__device__ __forceinline__ void gemm_impl(const T* a, const T* w, O* out, int m, int n, int k) {
    extern __shared__ __align__(128) unsigned char gt_smem[];
    DB_TRACE_BLOCK();
    DB_GRID_TRIGGER();
    const int split = (int)blockIdx.x % GT_SPLIT;
    if (GT_NSPLIT == 1 && split != 0) return;  // no clusters: rank 0 does all of K
    const int n0 = ((int)blockIdx.x / GT_SPLIT) * GT_BN, m0 = (int)blockIdx.y * GT_BM;
    const int mrows = min(GT_BM, m - m0);
    const int arows = GtMath<T>::kMma ? (mrows + 15) / 16 * 16 : GT_BM;  // the A rows the product reads
    const int ktiles = (k * (int)sizeof(T) + GT_ROW - 1) / GT_ROW;
    const int kt0 = split * ktiles / GT_NSPLIT, nk = (split + 1) * ktiles / GT_NSPLIT - kt0;
    // stages: what the launch's shared memory holds (>= 2: the spec's `shared`; HIP, where it is unknown: 2)
    const int S = max(2, min(GT_MAX_STAGES, (int)(db_dynamic_smem() / GT_STAGE)));
    auto wtile = [&](int i) { return gt_smem + (i % S) * GT_STAGE; };
    auto atile = [&](int i) { return gt_smem + (i % S) * GT_STAGE + GT_BN * GT_ROW; };
    // weights first, before the wait: S - 1 k-tiles in flight (one group each)
    for (int i = 0; i < S - 1; ++i) {
        if (i < nk) gt_issue(wtile(i), w, n0, GT_BN, n, k, kt0 + i);
        db_cp_commit();
    }
    DB_GRID_WAIT();
    DB_TRACE_WAITED();
    for (int i = 0; i < S - 1; ++i) {
        if (i < nk) gt_issue(atile(i), a, m0, arows, m, k, kt0 + i);
        db_cp_commit();
    }
    GtMath<T> g;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) g.acc[i][j] = 0.0f;
    for (int i = 0; i < nk; ++i) {
        gt_cp_wait(S - 2);  // k-tile i has landed (the groups after it: S - 2)
        __syncthreads();    // ... for every thread, and stage (i - 1) % S is free
        const int nxt = i + S - 1;
        if (nxt < nk) {
            gt_issue(wtile(nxt), w, n0, GT_BN, n, k, kt0 + nxt);
            gt_issue(atile(nxt), a, m0, arows, m, k, kt0 + nxt);
        }
        db_cp_commit();
        gt_product<T>(g, wtile(i), atile(i), mrows);
    }
    gt_cp_wait(0);
    __syncthreads();  // every stage is free: the partial tile goes over them
    float* c = reinterpret_cast<float*>(gt_smem);
    gt_spill<T>(g, c);
    gt_cluster_sync();  // every block's partial is in its shared memory
    constexpr int rows = GT_BN / GT_NSPLIT;  // this block's weight rows of the tile
    const int r0 = (GT_NSPLIT > 1 ? split : 0) * rows;
    if (EPI == GT_SILU) {  // pairs (gate 2j, up 2j + 1)
        const int half_n = n / 2;
        for (int e = threadIdx.x; e < (rows / 2) * mrows; e += GT_THREADS) {
            const int pr = e % (rows / 2), col = e / (rows / 2), row = r0 + 2 * pr;
            float gv = 0.0f, uv = 0.0f;
            for (int q = 0; q < GT_NSPLIT; ++q) {
                gv += gt_partial(c + col * GT_CLD + row, q);
                uv += gt_partial(c + col * GT_CLD + row + 1, q);
            }
            const int j = (n0 + row) / 2;
            if (j < half_n) out[(size_t)(m0 + col) * half_n + j] = from_float<O>(silu_f(gv) * uv);
        }
    } else {
        for (int e = threadIdx.x; e < rows * mrows; e += GT_THREADS) {
            const int row = r0 + e % rows, col = e / rows;
            float v = 0.0f;
            for (int q = 0; q < GT_NSPLIT; ++q) v += gt_partial(c + col * GT_CLD + row, q);
            if (n0 + row < n) {
                O* dst = out + (size_t)(m0 + col) * n + n0 + row;
                if (EPI == GT_ADD)
                    *dst = from_float<O>(to_float(*dst) + v);
                else
                    *dst = from_float<O>(v);
            }
        }
    }
    gt_cluster_sync();  // the other blocks' reads of this one's partial are done before it exits
}

#define DEFINE_GEMM(SUFFIX, T)                                                                                 \
    extern "C" __global__ void GT_CLUSTER_ATTR __launch_bounds__(GT_THREADS)                                   \
        gemm_store_##SUFFIX(const T* a, const T* w, float* c, int m, int n, int k) {                           \
        gemm_impl<T, GT_STORE, float>(a, w, c, m, n, k);                                                       \
    }                                                                                                          \
    extern "C" __global__ void GT_CLUSTER_ATTR __launch_bounds__(GT_THREADS)                                   \
        gemm_add_##SUFFIX(const T* a, const T* w, float* c, int m, int n, int k) {                             \
        gemm_impl<T, GT_ADD, float>(a, w, c, m, n, k);                                                         \
    }                                                                                                          \
    extern "C" __global__ void GT_CLUSTER_ATTR __launch_bounds__(GT_THREADS)                                   \
        gemm_silu_##SUFFIX(const T* a, const T* w, T* act, int m, int n, int k) {                              \
        gemm_impl<T, GT_SILU, T>(a, w, act, m, n, k);                                                          \
    }
DEFINE_GEMM(f16, db_f16)
DEFINE_GEMM(bf16, db_bf16)
DEFINE_GEMM(f32, float)
