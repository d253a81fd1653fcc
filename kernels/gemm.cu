// dagbuild: the decode GEMM path's projections as plain kernel nodes (issue 15): Y = A W^T for a batch of rows,
// tensor cores, programmatic launch, the epilogue fused.
//
// Entries (wt = f16 | bf16 | f32; params const wt* a, const wt* w, <out>, i32 m, i32 n, i32 k):
//   gemm_store_<wt>  f32* c     c[r, j]  = sum_i a[r, i] w[j, i]                  (QKV, the LM head)
//   gemm_add_<wt>    f32* c     c[r, j] += sum_i a[r, i] w[j, i]                  (O and down: the residual)
//   gemm_silu_<wt>   wt* act    act[r, j] = wt(silu(g) * u), g, u = rows 2j, 2j+1 of the product
//                               (w_gate_up's rows interleave gate and up; n is 2 * ffn)
//   gemm_add_norm_<wt> (const wt* a, const wt* w, f32* c, i32 m, i32 n, i32 k, const wt* norm, wt* xn, f32* ssq):
//                               gemm_add, then the NEXT RMSNorm's operand from the new residual rows c:
//                               xn[r, j] = wt(c[r, j] * norm[j]) and ssq[r, p] = sum of c[r, j]^2 over the GT_SSQ
//                               columns j of part p (ceil_div(n, GT_SSQ) parts a row; split <= 4)
//   gemm_scaled_store_<wt>, gemm_scaled_silu_<wt>  (<as gemm_store / gemm_silu>, const f32* ssq, f32 eps): a is
//                               such an xn; row r's products scaled by rsqrt(sum_p ssq[r, p] / k + eps) before
//                               the epilogue: the RMSNorm with no node and no x staged (tc_norm 2 in the spec)
//   rms_partials_<wt> (const f32* x, const wt* norm, wt* xn, f32* ssq, i32 n): xn and ssq of x as gemm_add_norm
//                               writes them, for the first layer (grid [rows], block [256])
// a [m, k] row-major, w [n, k] row-major (nn.Linear's weight: no transposed copy), k % 8 == 0, a and w 16-byte
// aligned. grid [ceil_div(n, 64) * GT_SPLIT, ceil_div(m, 64)], block [256], dynamic shared memory: at least 2
// stages of (64 + 64) * GT_ROW bytes (16 KiB at GT_ROW 128, 32 KiB at 256); a block of fewer rows fits more.
// The scaled entries: the stages plus 256 bytes (the row scales). A launch with less traps.
//
// Why not cuBLAS (a child graph a GEMM): a library kernel cannot start before its producer ends, and each
// bucket of a pool records 89 child graphs. Here a block issues its first weight tiles BEFORE
// griddepcontrol.wait (weights are never written by a graph), so at decode's few rows, where a projection is
// a stream of weight bytes, the stream starts while the previous kernel still runs; the activations are read
// after the wait. The SiLU*up of the gate/up projection and the residual adds are the epilogue.
//
// * Tile: 64 weight rows x 64 batch rows; blockIdx.x / GT_SPLIT picks the weight rows, blockIdx.y the batch
//   rows. K runs in k-tiles of GT_ROW bytes a row (128: 64 f16/bf16 or 32 f32; the spec builds 256) through a
//   cp.async ring: stage = the W tile (64 rows) then the A tile (the block's batch rows rounded up to 16), rows
//   whose 16-byte chunks are XOR-swizzled by row % 8, so ldmatrix's eight rows hit distinct banks. Rows past m
//   or n and k past k are zero-filled. The first S k-tiles' W tiles (S: the stages that fit; at split 4 all of a
//   block's weights) are issued before griddepcontrol.wait, their A tiles right after it.
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
// Measured (H100, tools/bench_gemm.py, 40-call PDL chains from DRAM; NOTES.md, 2026-12-06): the first form's
// blocks streamed ~10 GB/s each whatever their ring depth because each warp issued ~350 instructions a k-tile,
// two thirds of them index arithmetic per 16-byte copy, at ~6.5 cycles each with two warps a scheduler (ncu);
// copies with fixed per-thread shares (GtCopy) and an unrolled epilogue made every projection 1.1-1.5x faster:
// at 16 rows on par with or ahead of cuBLAS (QKV 6.6 against 6.8 us, O 5.8 / 6.3, gate/up with SiLU 17.1 / 18.4
// plus cuBLAS's SiLU node, down 12.8 / 12.6, LM head 46.4 / 49.2), at 64 rows still behind (QKV 9.1 / 6.9, down
// 18.0 / 13.5). A 64-row x 256-byte W tile streams at most ~20 GB/s a block from DRAM where 40 blocks read a
// matrix (tools/bench_stream.py gives the same with no math; contiguous 16 KiB stages 80-99 GB/s a block), so
// projections with few tiles need the split to fill the card.

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
#define GT_ADD_NORM 3  // GT_ADD, then the next RMSNorm's operand (xn) and its sum-of-squares parts (ssq)
#define GT_SSQ 16      // columns a sum-of-squares part covers: 16 consecutive lanes of the epilogue, one row
#ifndef GT_SCALE_LATE
#define GT_SCALE_LATE 0  // gemm_scaled_*: 1 reads the rows' sums of squares after the last k-tile, not at the start
#endif

// byte offset of 16-byte chunk `c` of tile row `r` (XOR-swizzled: ldmatrix's eight rows hit distinct banks)
__device__ __forceinline__ int gt_swz(int r, int c) { return r * GT_ROW + ((c ^ (r & 7)) << 4); }

__device__ __forceinline__ void gt_cp_wait(int n) {
#if DB_CUDA
    mm_cp_wait(n);  // n <= 5: GT_MAX_STAGES 7
#else
    (void)n;  // HIP: the copies were synchronous
#endif
}

// Block `rank`'s partial tile (this block's own below sm_90, HIP, or without a split).
__device__ __forceinline__ const float* gt_partial(const float* c, int rank) {
#if MM_HAS_CLUSTER && GT_NSPLIT > 1
    return mm_remote_ptr(c, rank);
#else
    (void)rank;
    return c;
#endif
}

__device__ __forceinline__ void gt_cluster_sync() {
#if MM_HAS_CLUSTER && GT_NSPLIT > 1
    mm_cluster_sync();
#else
    __syncthreads();
#endif
}

// the last barrier: the other blocks have read this one's partial (each used what it loaded before arriving), so
// it may exit; no fence, which would wait for this thread's output stores
__device__ __forceinline__ void gt_cluster_done() {
#if MM_HAS_CLUSTER && GT_NSPLIT > 1
    mm_cluster_sync_relaxed();
#endif
}

// One thread's share of copying a tile's rows [r0, r0 + 64) of a [rows, k] matrix (zero past rows and k), one
// k-tile after another, through 16-byte cp.async. The share is fixed for the kernel: thread t copies chunk t % C
// of rows t / C + j * (GT_THREADS / C), j < PER; its row pointers advance a k-tile a copy (loop-carried, so the
// compiler keeps them instead of re-deriving them), so a chunk costs a compare, a select, an add and the copy.
// (The first form divided and multiplied per chunk: ~2/3 of the kernel's instructions, which bound each block
// at ~10 GB/s: ncu, H100, NOTES.md 2026-12-06.)
template <typename T>
struct GtCopy {
    static constexpr int C = GT_ROW / 16;                   // 16-byte chunks a tile row
    static constexpr int E = 16 / (int)sizeof(T);           // elements a chunk
    static constexpr int BK = GT_ROW / (int)sizeof(T);      // elements a k-tile row
    static constexpr int STEP = GT_THREADS / C;             // rows between a thread's chunks (a multiple of 8)
    static constexpr int PER = 64 * C / GT_THREADS;         // chunks a thread (64 tile rows)
    const T* base;      // the matrix (a valid address for the copies that only zero-fill)
    const T* src[PER];  // row j's chunk at the next k-tile
    int krem;           // elements of k left from the next k-tile's chunk on (<= 0: past k, zero-fill)
    int dst;            // byte offset of chunk j = 0 in a tile (swizzled; + j * STEP * GT_ROW for chunk j)
    unsigned live;      // bit j: row j exists (else its chunk is zero-filled)
    unsigned used;      // bit j: the product reads row j (< nr; else no copy at all)

    __device__ __forceinline__ void init(const T* m, int r0, int nr, int rows, int k, int kt) {
        const int r = (int)threadIdx.x / C, ch = (int)threadIdx.x % C;
        base = m;
        dst = gt_swz(r, ch);
        krem = k - (kt * BK + ch * E);
        live = used = 0u;
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            const int row = r + j * STEP;
            const bool ok = row < nr && r0 + row < rows;
            live |= (ok ? 1u : 0u) << j;
            used |= (row < nr ? 1u : 0u) << j;
            src[j] = m + (ok ? (size_t)(r0 + row) * (size_t)k + (size_t)(kt * BK + ch * E) : 0);
        }
    }
    // the next k-tile into `tile`
    __device__ __forceinline__ void issue(unsigned char* tile) {
        const bool kin = krem > 0;
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            if ((used >> j) & 1u) {
                const bool ok = kin && ((live >> j) & 1u);
                db_cp_async16(tile + dst + j * STEP * GT_ROW, ok ? src[j] : base, ok);
            }
            src[j] += BK;
        }
        krem -= BK;
    }
};

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

// SCALE: a is xn of gemm_add_norm / rms_partials (x * norm, rounded to wt); row r's sums are scaled by
// rsqrt(sum_p ssq[r, p] / k + eps), the row scales read right after the wait (beside the A tiles' copies) into
// shared memory past the stages. GT_ADD_NORM: `norm` is the next RMSNorm's weight, read before the wait.
template <typename T, int EPI, typename O, bool SCALE = false>
__device__ __forceinline__ void gemm_impl(const T* a, const T* w, O* out, int m, int n, int k, const T* norm = nullptr,
                                          float eps = 0.0f, const float* ssq_in = nullptr, float* ssq_out = nullptr,
                                          T* xn = nullptr) {
    static_assert(EPI != GT_ADD_NORM || (GT_BN / GT_NSPLIT) % GT_SSQ == 0,
                  "gemm_add_norm: a block's columns of the tile must hold whole sum-of-squares parts (split <= 4)");
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
    // A stage: a k-tile's W tile (GT_BN rows) then its A tile (arows rows: 16 KiB less a stage at 16 rows than at
    // 64); SCALE: after the stages the rows' scales. Stages: what the launch's shared memory holds (>= 2; HIP,
    // where it is unknown: 2).
    const int stage = (GT_BN + arows) * GT_ROW;
    const int tail = SCALE ? GT_BM * 4 : 0;
    const int S = max(2, min(GT_MAX_STAGES, ((int)db_dynamic_smem() - tail) / stage));
#if DB_CUDA
    if (S * stage + tail > (int)db_dynamic_smem()) __trap();  // the launch's shared memory holds no 2 stages
#endif
    float* const rscale = reinterpret_cast<float*>(gt_smem + S * stage);  // SCALE: the rows' RMSNorm scales
    // GT_ADD_NORM: the norm weight of this thread's column in every turn of the epilogue (GT_THREADS is a multiple
    // of the block's weight rows), read before the wait (weights are never written by a graph)
    float gnorm = 0.0f;
    if constexpr (EPI == GT_ADD_NORM) {
        constexpr int brows = GT_BN / GT_NSPLIT;
        const int col = n0 + (GT_NSPLIT > 1 ? split : 0) * brows + (int)threadIdx.x % brows;
        if (col < n) gnorm = to_float(norm[col]);
    }
    GtCopy<T> wcp, acp;
    wcp.init(w, n0, GT_BN, n, k, kt0);
    acp.init(a, m0, arows, m, k, kt0);
    // Weights first, before the wait: the first S k-tiles' W tiles (all of a block's weights where nk <= S), a
    // group each; then, after it, their A tiles (one L2 round trip), a group each.
    for (int i = 0; i < S; ++i) {
        if (i < nk) wcp.issue(gt_smem + i * stage);
        db_cp_commit();
    }
    DB_GRID_WAIT();
    DB_TRACE_WAITED();
    for (int i = 0; i < S; ++i) {
        if (i < nk) acp.issue(gt_smem + i * stage + GT_BN * GT_ROW);
        db_cp_commit();
    }
    // SCALE: the rows' scales, 4 threads a row, each every 4th part (float4s where a row's parts allow), in order;
    // right after the wait (GT_SCALE_LATE 0: the loads beside the A tiles' copies) or after the last k-tile (1)
    auto row_scales = [&]() {
        const int r = (int)threadIdx.x >> 2, q = (int)threadIdx.x & 3;
        const int parts = (k + GT_SSQ - 1) / GT_SSQ;
        float s = 0.0f;
        if (r < mrows) {
            const float* p = ssq_in + (size_t)(m0 + r) * (size_t)parts;
            if ((parts & 3) == 0) {
#pragma unroll 4
                for (int i = 4 * q; i < parts; i += 16) {
                    const float4 v = *reinterpret_cast<const float4*>(p + i);
                    s += (v.x + v.y) + (v.z + v.w);
                }
            } else {
#pragma unroll 4
                for (int i = q; i < parts; i += 4) s += p[i];
            }
        }
        s += db_shfl_xor(s, 1);
        s += db_shfl_xor(s, 2);
        if (q == 0) rscale[r] = rsqrtf(s / (float)k + eps);
    };
    if constexpr (SCALE && !GT_SCALE_LATE) row_scales();
    GtMath<T> g;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) g.acc[i][j] = 0.0f;
    // Turn i refills the stage k-tile i - 1 left (free once every thread passed this turn's barrier) with k-tile
    // i - 1 + S, one group a turn (empty where there is none). Then k-tile j's last group is S + j + 1 at most,
    // and turn i starts with 2S + i groups issued: waiting until S - 2 are in flight lands k-tile i.
    unsigned char* cur = gt_smem;  // k-tile i's stage
    unsigned char* prev = gt_smem;  // k-tile i - 1's
    unsigned char* const last = gt_smem + (S - 1) * stage;
    for (int i = 0; i < nk; ++i) {
        gt_cp_wait(S - 2);
        __syncthreads();
        if (i >= 1 && i - 1 + S < nk) {
            wcp.issue(prev);
            acp.issue(prev + GT_BN * GT_ROW);
        }
        db_cp_commit();
        gt_product<T>(g, cur, cur + GT_BN * GT_ROW, mrows);
        if (i == 0) DB_TRACE_MARK(1);  // the first k-tile's product (blocktrace)
        prev = cur;
        cur = cur == last ? gt_smem : cur + stage;
    }
    gt_cp_wait(0);
    __syncthreads();  // every stage is free: the partial tile goes over them
    if constexpr (SCALE && GT_SCALE_LATE) row_scales();  // seen by the epilogue after the cluster barrier below
    float* c = reinterpret_cast<float*>(gt_smem);
    gt_spill<T>(g, c);
    gt_cluster_sync();  // every block's partial is in its shared memory
    DB_TRACE_MARK(2);   // the epilogue's start (blocktrace)
    constexpr int rows = GT_BN / GT_NSPLIT;  // this block's weight rows of the tile
    const int r0 = (GT_NSPLIT > 1 ? split : 0) * rows;
    // Thread t finishes elements t + it * GT_THREADS of this block's rows x GT_BM (those past mrows: none), a
    // compile-time count of turns, unrolled: the partials' loads (distributed shared memory) and the residual's
    // of every turn issue together instead of one dependent round trip a turn.
    const float* part[GT_NSPLIT];
#pragma unroll
    for (int q = 0; q < GT_NSPLIT; ++q) part[q] = gt_partial(c, q);
    if (EPI == GT_SILU) {  // pairs (gate 2j, up 2j + 1)
        constexpr int pairs = rows / 2, turns = pairs * GT_BM / GT_THREADS;
        const int half_n = n / 2;
#pragma unroll
        for (int it = 0; it < turns; ++it) {
            const int e = (int)threadIdx.x + it * GT_THREADS, col = e / pairs, row = r0 + 2 * (e % pairs);
            float gv = 0.0f, uv = 0.0f;
#pragma unroll
            for (int q = 0; q < GT_NSPLIT; ++q) {
                gv += part[q][col * GT_CLD + row];
                uv += part[q][col * GT_CLD + row + 1];
            }
            if constexpr (SCALE) {
                const float rs = rscale[col];
                gv *= rs;
                uv *= rs;
            }
            const int j = (n0 + row) / 2;
            if (col < mrows && j < half_n) out[(size_t)(m0 + col) * half_n + j] = from_float<O>(silu_f(gv) * uv);
        }
    } else {
        constexpr int turns = rows * GT_BM / GT_THREADS;
#pragma unroll
        for (int it = 0; it < turns; ++it) {
            const int e = (int)threadIdx.x + it * GT_THREADS, col = e / rows, row = r0 + e % rows;
            float v = 0.0f;
#pragma unroll
            for (int q = 0; q < GT_NSPLIT; ++q) v += part[q][col * GT_CLD + row];
            if constexpr (SCALE) v *= rscale[col];
            const bool live = col < mrows && n0 + row < n;
            if constexpr (EPI == GT_ADD_NORM) {  // the residual, its norm operand, and a part's sum of squares
                float sq = 0.0f;
                if (live) {
                    const size_t o = (size_t)(m0 + col) * n + n0 + row;
                    const float xv = to_float(out[o]) + v;
                    out[o] = from_float<O>(xv);
                    xn[o] = from_float<T>(xv * gnorm);
                    sq = xv * xv;
                }
                // a part: GT_SSQ consecutive lanes, one batch row (rows is a multiple of GT_SSQ)
#pragma unroll
                for (int o = GT_SSQ / 2; o >= 1; o /= 2) sq += db_shfl_xor(sq, o);
                if (live && (int)threadIdx.x % GT_SSQ == 0)
                    ssq_out[(size_t)(m0 + col) * (size_t)((n + GT_SSQ - 1) / GT_SSQ) + (n0 + row) / GT_SSQ] = sq;
            } else if (live) {
                O* dst = out + (size_t)(m0 + col) * n + n0 + row;
                if (EPI == GT_ADD)
                    *dst = from_float<O>(to_float(*dst) + v);
                else
                    *dst = from_float<O>(v);
            }
        }
    }
    gt_cluster_done();  // the other blocks' reads of this one's partial are done before it exits
}

// gemm_add_norm exists where a block finishes whole sum-of-squares parts (split <= 4)
#if GT_BN / GT_NSPLIT >= GT_SSQ
#define DEFINE_GEMM_ADD_NORM(SUFFIX, T)                                                                        \
    extern "C" __global__ void GT_CLUSTER_ATTR __launch_bounds__(GT_THREADS) gemm_add_norm_##SUFFIX(           \
        const T* a, const T* w, float* c, int m, int n, int k, const T* norm, T* xn, float* ssq) {             \
        gemm_impl<T, GT_ADD_NORM, float>(a, w, c, m, n, k, norm, 0.0f, nullptr, ssq, xn);                      \
    }
#else
#define DEFINE_GEMM_ADD_NORM(SUFFIX, T)
#endif
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
    }                                                                                                          \
    DEFINE_GEMM_ADD_NORM(SUFFIX, T)                                                                            \
    extern "C" __global__ void GT_CLUSTER_ATTR __launch_bounds__(GT_THREADS) gemm_scaled_store_##SUFFIX(       \
        const T* a, const T* w, float* c, int m, int n, int k, const float* ssq, float eps) {                  \
        gemm_impl<T, GT_STORE, float, true>(a, w, c, m, n, k, nullptr, eps, ssq);                              \
    }                                                                                                          \
    extern "C" __global__ void GT_CLUSTER_ATTR __launch_bounds__(GT_THREADS) gemm_scaled_silu_##SUFFIX(        \
        const T* a, const T* w, T* act, int m, int n, int k, const float* ssq, float eps) {                    \
        gemm_impl<T, GT_SILU, T, true>(a, w, act, m, n, k, nullptr, eps, ssq);                                 \
    }

// rms_partials_<wt>: xn and ssq of the f32 rows x as gemm_add_norm's epilogue writes them (the same lanes a part,
// the same shuffle order), for the first layer's QKV GEMM: thread t of a turn takes column t, GT_SSQ lanes a part.
template <typename T>
__device__ __forceinline__ void rms_partials_impl(const float* x, const T* norm, T* xn, float* ssq, int n) {
    DB_TRACE_BLOCK();
    DB_GRID_TRIGGER();
    DB_GRID_WAIT();
    const size_t r = blockIdx.x;
    const int parts = (n + GT_SSQ - 1) / GT_SSQ;
    const int turns = (n + (int)blockDim.x - 1) / (int)blockDim.x;  // the same count for every thread
    for (int it = 0; it < turns; ++it) {
        const int j = (int)threadIdx.x + it * (int)blockDim.x;
        float sq = 0.0f;
        if (j < n) {
            const float xv = x[r * (size_t)n + j];
            xn[r * (size_t)n + j] = from_float<T>(xv * to_float(norm[j]));
            sq = xv * xv;
        }
#pragma unroll
        for (int o = GT_SSQ / 2; o >= 1; o /= 2) sq += db_shfl_xor(sq, o);
        if (j < n && j % GT_SSQ == 0) ssq[r * (size_t)parts + j / GT_SSQ] = sq;
    }
}
#define DEFINE_RMS_PARTIALS(SUFFIX, T)                                                                         \
    extern "C" __global__ void __launch_bounds__(GT_THREADS)                                                   \
        rms_partials_##SUFFIX(const float* x, const T* norm, T* xn, float* ssq, int n) {                       \
        rms_partials_impl<T>(x, norm, xn, ssq, n);                                                             \
    }

DEFINE_GEMM(f16, db_f16)
DEFINE_GEMM(bf16, db_bf16)
DEFINE_GEMM(f32, float)
DEFINE_RMS_PARTIALS(f16, db_f16)
DEFINE_RMS_PARTIALS(bf16, db_bf16)
DEFINE_RMS_PARTIALS(f32, float)
