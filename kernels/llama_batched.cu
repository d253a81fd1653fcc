// dagbuild: batched decode kernels (issue 15): tensor-core projections that read each weight tile once per step
// for every batch row, and decode attention that reads each KV head once for its whole query group.
//
// One NVRTC module. It includes kernels/llama_fused.cu (the batch-1 kernels) for two things only: the epilogue
// jobs (QkvJob, SwigluJob, RowsJob: RoPE + KV append, SiLU*up, residual add / plain store), so both paths write
// exactly the same way, and the GEMV engine, which the _f32 entries below run (f32 weights have no tensor-core
// path here: fp32 models keep the batch-1 arithmetic at every batch, bit for bit).
//
// Entries (the params are those of the batch-1 entries, so a spec swaps kernel and launch shape by dims):
//   qkv_rope_mma_<wt>, gemv_res_mma_<wt>, gemv_norm_mma_<wt>, gate_up_silu_mma_<wt>   wt = f16 | bf16 | f32
//   (likewise _mv_ and _mvc_), attn_decode_batched_<wt> (params of attn_decode_<wt>), attn_qkv_<wt> and
//   attn_qkv_mma_<wt> (the GEMM path's attention: RoPE, KV append, cast)
// The KV caches hold wt (kernels/llama_common.cuh, Kv4): keys and values are rounded once, when appended, and
// computed on as floats.
// kernels/llama_batched.md has the launch table and the reasoning.

#include "llama_fused.cu"

// ------------------------------------------------------------------------------------------------------------
// The MMA engine: Y[b, row] = sum_k W[row, k] * x[b, k] for all batch rows, weights streamed once per row tile.
//
// * Tiles: a tile is MM_PAIRS row pairs (the jobs' pairs: RoPE partners, gate/up rows, rows 2g/2g+1) = MM_MT
//   weight rows. Shared row s of a tile holds pair (s / 16) * 8 + s % 8, its first row when s % 16 < 8, else its
//   second: so in an m16 MMA fragment a thread's rows gid and gid + 8 are the two rows of one pair, and the
//   epilogue has both values of its pair in registers (no shuffles, no staging).
// * Warps: 8 = 4 warp rows (32 weight rows: two m16 tiles) x 2 warp columns (NT n8 tiles each), a pass covers
//   PW = 16 * NT batch rows (NT = 1, 2, 4 by batch: 16, 32, 64 rows); larger batches run ceil(batch / 64)
//   passes per tile, re-reading the tile's weights from L2.
// * Clusters (sm_90): the MMA_CLUSTER blocks of a thread-block cluster split K; each reduces its partial sums
//   into the fragments of the warps it owns, reading the other blocks' partials from distributed shared memory
//   in rank order (deterministic), then runs the epilogue. Without clusters (cluster size 1) a block does all K.
//   Clusters loop over tiles: cluster c takes tiles c, c + nclusters, ...
// * Stages: items (tile, pass, k-tile of MM_KT) stream through a ring of S stages (S from the launch's dynamic
//   shared memory, 2..MM_MAX_STAGES): the weight k-tile (f16/bf16 rows, 16-byte cp.async) and the x k-tile (f32,
//   16-byte cp.async). The first S - 1 weight k-tiles are issued BEFORE griddepcontrol.wait (weights only), the
//   x k-tiles after it. Per item: the block converts x (times the RMSNorm weight when NORM, summing x^2 for the
//   norm) into an f16/bf16 buffer, then every warp runs ldmatrix + mma.sync.m16n8k16 (f32 accumulation).
// * Epilogue: y0, y1 of pair g for batch row b go to the job's epi (scaled by rsqrt(mean(x^2) + eps) when NORM),
//   exactly as the GEMV engine's epilogue; rows past npairs and batch rows past batch are not written.
// Numerics: activations are rounded to the weight type (f16: 11-bit, bf16: 8-bit significand) before the
// products, which are exact in f32; sums in f32 in mma order. The RMSNorm scale is applied to the f32 result.
// Shared memory (dynamic): [ssum PW floats (256 B)][red (clusters)][xh PW x MM_HLD][S x (W MM_MT x MM_WLD,
// x PW x MM_XLD)]. Requirements: k % 8 == 0; weights, norm, x 16-byte aligned; blockDim 256; dynamic shared
// memory for 2 stages at least (mm_smem_bytes); grid a multiple of the cluster size.
// ------------------------------------------------------------------------------------------------------------

#define MM_THREADS 256
#define MV_THREADS 512  // the MV engine's largest block (below): 256 or 512 threads
#define MM_MT 128
#define MM_PAIRS 64
#define MM_KT 64
#define MM_WLD (MM_KT + 8)  // halves per weight row in shared memory (144 B: ldmatrix rows hit distinct banks)
#define MM_HLD (MM_KT + 8)  // halves per converted x row
#define MM_XLD (MM_KT + 4)  // floats per staged f32 x row
#define MM_MAX_STAGES 6
#ifndef MMA_CLUSTER
#define MMA_CLUSTER 8  // blocks per cluster on sm_90 (the spec's grid must be a multiple: dim mma_cluster)
#endif
#ifndef MVC_CLUSTER
#define MVC_CLUSTER 4  // the MVC engine's blocks per cluster (the spec's grid must be a multiple: dim mvc_cluster)
#endif

#include "mma.cuh"  // MmaType, ldmatrix, mm_cp_wait, cluster helpers

#if MM_HAS_CLUSTER
#define MM_CLUSTER_ATTR __cluster_dims__(MMA_CLUSTER, 1, 1)
#define MVC_CLUSTER_ATTR __cluster_dims__(MVC_CLUSTER, 1, 1)
#else
#define MM_CLUSTER_ATTR
#define MVC_CLUSTER_ATTR
#endif

#if DB_CUDA  // the MMA engine is CUDA only (HIP: every entry runs the GEMV engine, below)

// Bytes of one ring stage and of the fixed part, for a pass of pw batch rows (host formula: llama_batched.md).
__device__ __forceinline__ unsigned int mm_stage_bytes(int pw) {
    return (unsigned int)(MM_MT * MM_WLD * 2 + pw * MM_XLD * 4);
}
__device__ __forceinline__ unsigned int mm_fixed_bytes(int pw, int nt, bool cluster) {
    return 256u + (cluster ? (unsigned int)(8 * 32 * 8 * nt * 4) : 0u) + (unsigned int)(pw * MM_HLD * 2);
}

template <typename T, int NT, bool NORM, typename Job>
__device__ __forceinline__ void mm_run(const Job& job, const T* w, const T* nw, const float* x, int k, int batch,
                                       float eps) {
    constexpr int PW = 16 * NT;                    // batch rows per pass
    constexpr int TPR = MM_THREADS / PW;           // converting threads per x row
    constexpr int KPT = MM_KT / TPR;               // k per converting thread (4, 8 or 16)
    extern __shared__ uint4 mm_smem[];
    unsigned char* smem = reinterpret_cast<unsigned char*>(mm_smem);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int wr = warp >> 1, wc = warp & 1;
    const MmCluster cl = mm_cluster();
    const bool clustered = cl.size > 1;
    const unsigned int dyn = db_dynamic_smem();
    const unsigned int fixed = mm_fixed_bytes(PW, NT, clustered);
    const int S = dyn > fixed ? min(MM_MAX_STAGES, (int)((dyn - fixed) / mm_stage_bytes(PW))) : 0;
    if (S < 2) __trap();  // the launch gave too little shared memory (see mm_smem_bytes)

    float* ssum = reinterpret_cast<float*>(smem);                                        // [PW] (<= 64)
    float* red = reinterpret_cast<float*>(smem + 256);                                   // [8][32][8 * NT]
    unsigned short* xh = reinterpret_cast<unsigned short*>(smem + fixed - PW * MM_HLD * 2);  // [PW][MM_HLD]
    unsigned char* ring = smem + fixed;

    const int ktiles = (k + MM_KT - 1) / MM_KT;
    const int per = (ktiles + cl.size - 1) / cl.size;
    const int kb = min(cl.rank * per, ktiles), ke = min(kb + per, ktiles);
    const int nk = max(ke - kb, 1);  // an empty range still runs one all-zero item (the cluster stays in step)
    const int npass = (batch + PW - 1) / PW;
    const int ntiles = (job.npairs + MM_PAIRS - 1) / MM_PAIRS;
    const int mine = cl.id < ntiles ? (ntiles - 1 - cl.id) / cl.count + 1 : 0;
    const int total = mine * npass * nk;

    auto decode = [&](int i, int& tile, int& pass, int& kt, bool& live) {
        const int per_tile = npass * nk;
        const int t = i / per_tile, rem = i - t * per_tile;
        pass = rem / nk;
        const int j = rem - pass * nk;
        tile = cl.id + t * cl.count;
        kt = kb + j;
        live = kt < ke;
    };
    auto issue_w = [&](int i) {
        if (i < total) {
            int tile, pass, kt;
            bool live;
            decode(i, tile, pass, kt, live);
            unsigned short* dst = reinterpret_cast<unsigned short*>(ring + (i % S) * mm_stage_bytes(PW));
#pragma unroll
            for (int q = 0; q < MM_MT * (MM_KT / 8) / MM_THREADS; ++q) {
                const int c = tid + q * MM_THREADS, s = c >> 3, ch = c & 7;
                const int g = tile * MM_PAIRS + (s >> 4) * 8 + (s & 7);
                const int kk = kt * MM_KT + ch * 8;
                const bool ok = live && g < job.npairs && kk < k;
                int r0 = 0, r1 = 0;
                if (g < job.npairs) job.rows(g, r0, r1);
                const T* src = ok ? w + (size_t)((s & 15) < 8 ? r0 : r1) * (size_t)k + kk : w;
                db_cp_async16(dst + s * MM_WLD + ch * 8, src, ok);
            }
        }
    };
    auto issue_x = [&](int i) {
        if (i < total) {
            int tile, pass, kt;
            bool live;
            decode(i, tile, pass, kt, live);
            float* dst = reinterpret_cast<float*>(ring + (i % S) * mm_stage_bytes(PW) + MM_MT * MM_WLD * 2);
#pragma unroll
            for (int q = 0; q < PW * (MM_KT / 4) / MM_THREADS; ++q) {
                const int c = tid + q * MM_THREADS, r = c >> 4, ch = c & 15;
                const int b = pass * PW + r, kk = kt * MM_KT + ch * 4;
                const bool ok = live && b < batch && kk < k;
                db_cp_async16(dst + r * MM_XLD + ch * 4, ok ? x + (size_t)b * (size_t)k + kk : x, ok);
            }
        }
    };

    // before the wait: weights only (the first S - 1 weight k-tiles); then the x k-tiles of the same items
    // (one commit group each; in the loop one group per item, so "item i landed" is always wait_group S - 2)
    for (int i = 0; i < S - 1; ++i) {
        issue_w(i);
        db_cp_commit();
    }
    PDL_WAIT();
    for (int i = 0; i < S - 1; ++i) {
        issue_x(i);
        db_cp_commit();
    }

    float acc[2][NT][4];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int j = 0; j < NT; ++j) acc[m][j][0] = acc[m][j][1] = acc[m][j][2] = acc[m][j][3] = 0.0f;
    float ss = 0.0f;  // this thread's share of sum(x^2) of its x row (NORM)
    const int xr = tid / TPR, xseg = tid % TPR;

    for (int i = 0; i < total; ++i) {
        int tile, pass, kt;
        bool live;
        decode(i, tile, pass, kt, live);
        mm_cp_wait(S - 2);  // item i has landed (this thread's copies)
        __syncthreads();    // ... everyone's; and item i - 1's slot and xh are free
        issue_w(i + S - 1);  // refill the slot of item i - 1: weights and x of item i + S - 1, one group
        issue_x(i + S - 1);
        db_cp_commit();
        // convert this item's x k-tile (times the norm weight) to the MMA type; sum x^2 for the norm
        {
            const float* xs = reinterpret_cast<const float*>(ring + (i % S) * mm_stage_bytes(PW) + MM_MT * MM_WLD * 2);
            const float* src = xs + xr * MM_XLD + xseg * KPT;
            unsigned int* dst = reinterpret_cast<unsigned int*>(xh + xr * MM_HLD + xseg * KPT);
#pragma unroll
            for (int e = 0; e < KPT; e += 2) {
                float a = src[e], c = src[e + 1];
                if constexpr (NORM) {
                    ss = fmaf(a, a, ss);
                    ss = fmaf(c, c, ss);
                    const int kk = kt * MM_KT + xseg * KPT + e;
                    if (live && kk < k) {  // k % 8 == 0: kk + 1 < k too
                        a *= to_float(db_ldg(nw + kk));
                        c *= to_float(db_ldg(nw + kk + 1));
                    }
                }
                dst[e / 2] = MmaType<T>::pack(a, c);
            }
        }
        __syncthreads();
        // the MMAs: warp (wr, wc) x its two m16 tiles x NT n8 tiles, 4 k16 steps
        {
            const unsigned short* ws = reinterpret_cast<const unsigned short*>(ring + (i % S) * mm_stage_bytes(PW));
#pragma unroll
            for (int ks = 0; ks < MM_KT / 16; ++ks) {
                unsigned int a[2][4];
#pragma unroll
                for (int m = 0; m < 2; ++m) {
                    const int row = wr * 32 + m * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                    mm_ldmatrix_x4(a[m], ws + row * MM_WLD + ks * 16 + (lane >> 4) * 8);
                }
#pragma unroll
                for (int j = 0; j < NT; j += 2) {
                    unsigned int b[4];
                    const int q = lane >> 3;
                    if (NT == 1) {
                        const int n = wc * NT * 8 + (lane & 7);
                        mm_ldmatrix_x2(b[0], b[1], xh + n * MM_HLD + ks * 16 + (q & 1) * 8);
                        b[2] = b[3] = 0u;
                    } else {
                        const int n = wc * NT * 8 + (j + (q >> 1)) * 8 + (lane & 7);
                        mm_ldmatrix_x4(b, xh + n * MM_HLD + ks * 16 + (q & 1) * 8);
                    }
#pragma unroll
                    for (int m = 0; m < 2; ++m) {
                        MmaType<T>::mma(acc[m][j], a[m], b[0], b[1]);
                        if (NT > 1) MmaType<T>::mma(acc[m][j + 1 < NT ? j + 1 : j], a[m], b[2], b[3]);
                    }
                }
            }
        }
        const bool last = (i + 1) % nk == 0;  // the (tile, pass)'s last k-tile on this block
        if (!last) continue;

        // sum(x^2) of each pass row over this block's k range -> ssum
        if constexpr (NORM) {
#pragma unroll
            for (int o = TPR / 2; o > 0; o >>= 1) ss += db_shfl_xor(ss, o);
            if (xseg == 0) ssum[xr] = ss;
            ss = 0.0f;
        }
        if (clustered) {  // partials out, cluster barrier, reduce in rank order
            float4* mine4 = reinterpret_cast<float4*>(red + (warp * 32 + lane) * 8 * NT);
#pragma unroll
            for (int m = 0; m < 2; ++m)
#pragma unroll
                for (int j = 0; j < NT; ++j)
                    mine4[m * NT + j] = make_float4(acc[m][j][0], acc[m][j][1], acc[m][j][2], acc[m][j][3]);
        }
        mm_cluster_sync();  // a plain __syncthreads without clusters (ssum)
        const bool reducer = warp % cl.size == cl.rank;
        if (reducer) {
            if (clustered) {
#pragma unroll
                for (int m = 0; m < 2; ++m)
#pragma unroll
                    for (int j = 0; j < NT; ++j) acc[m][j][0] = acc[m][j][1] = acc[m][j][2] = acc[m][j][3] = 0.0f;
                for (int r = 0; r < cl.size; ++r) {
                    const unsigned int base = mm_remote(red + (warp * 32 + lane) * 8 * NT, r);
#pragma unroll
                    for (int m = 0; m < 2; ++m)
#pragma unroll
                        for (int j = 0; j < NT; ++j) {
                            const float4 v = mm_ld_remote4(base + (unsigned int)((m * NT + j) * 16));
                            acc[m][j][0] += v.x;
                            acc[m][j][1] += v.y;
                            acc[m][j][2] += v.z;
                            acc[m][j][3] += v.w;
                        }
                }
            }
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int bl = wc * NT * 8 + j * 8 + 2 * tig + e;  // batch row within the pass
                    const int b = pass * PW + bl;
                    float scale = 1.0f;
                    if constexpr (NORM) {
                        float s2 = 0.0f;
                        for (int r = 0; r < cl.size; ++r) s2 += mm_ld_remote(mm_remote(ssum + bl, r));
                        scale = rsqrtf(s2 / (float)k + eps);
                    }
#pragma unroll
                    for (int m = 0; m < 2; ++m) {
                        const int g = tile * MM_PAIRS + (wr * 2 + m) * 8 + gid;
                        if (g < job.npairs && b < batch) {
                            const typename Job::Pre pre = job.pre(g, b);
                            job.epi(g, b, acc[m][j][e] * scale, acc[m][j][2 + e] * scale, pre);
                        }
                    }
                }
        }
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
            for (int j = 0; j < NT; ++j) acc[m][j][0] = acc[m][j][1] = acc[m][j][2] = acc[m][j][3] = 0.0f;
        if (clustered) mm_cluster_sync();  // every block has read every partial before they are overwritten
    }
    db_cp_wait<0>();  // no copy outlives the kernel (the tail groups are empty)
}

template <typename T, bool NORM, typename Job>
__device__ __forceinline__ void mm_gemm(const Job& job, const T* w, const T* nw, const float* x, int k, int batch,
                                        float eps) {
    if (batch > 32)
        mm_run<T, 4, NORM>(job, w, nw, x, k, batch, eps);
    else if (batch > 16)
        mm_run<T, 2, NORM>(job, w, nw, x, k, batch, eps);
    else
        mm_run<T, 1, NORM>(job, w, nw, x, k, batch, eps);
}

// ------------------------------------------------------------------------------------------------------------
// The MV engine (batch 2..64): a weight-stationary tensor-core GEMV. The weights are the MMA's A operand, the
// batch rows its n8 columns, so a warp streams weight rows exactly as the batch-1 GEMV engine does (lane-private
// cp.async ring, filled before griddepcontrol.wait) and one mma.sync does the work of 16 rows x 16 k x 8 batch
// rows: the step stays bound by the weight bytes up to ~64 rows, where the MMA engine's tiles pay off.
//
// * Tiles: a tile is 8 row pairs (the jobs' pairs). Lane (gid, tig) of a warp copies the pair tile * 8 + gid:
//   its first row as A-fragment row gid, its second as row gid + 8, so a thread's accumulators hold both rows of
//   one pair for two batch rows and the batch-1 epilogues run unchanged from registers.
// * K order: a ROUND is 32 k. In round r lane (gid, tig) copies 16 bytes of each of its rows at k = 32r + 8tig
//   and feeds them to two m16n8k16 steps (words 0,1 to the first, 2,3 to the second); the x fragment of batch row
//   n is the same 16 bytes of x row n (8tig + 4s .. + 3 for step s). The logical k order inside an MMA differs
//   from memory order identically for A and B, so the sums are those of the plain dot products.
// * Warps: the NW warps of a block (8 or 16) split K (warp w: rounds [w R / NW, (w + 1) R / NW)); blocks stride over tiles
//   (any grid is correct). After a tile's last round the warps' partials go through shared memory, warp j sums
//   n8 column j over the warps in order (deterministic) and runs the epilogue; two barriers per tile.
// * Ring: items of MV_U rounds (2 KB per warp), S stages (2..MV_MAX_STAGES, from what the launch's dynamic
//   shared memory leaves); the first S items are issued before griddepcontrol.wait, so the weights of a block's
//   first tile stream while the previous kernel finishes; items run on across tiles and passes.
// * x: after the wait the block stages its batch rows (PB = 8 NT of them, NT n8 columns: the largest power of two
//   up to 8 that covers the batch and fits) as f16/bf16 in shared memory, times the RMSNorm weight when NORM
//   (sum of x^2 in f32, the rsqrt applied to the f32 result as the MMA engine does), zero past k and past the
//   batch; rows are padded so the 16-byte fragment loads of a quarter warp hit distinct banks. Batches over PB
//   run in passes (each pass re-reads the weights).
// Shared memory (dynamic): [ring S x stage (64 B per thread)][red NT x NW x 512 B][ssum 256 B][xs PB x mv_xstride(k)].
// Requirements: k % 8 == 0; weights and x 16-byte aligned; blockDim 256 or 512; shared memory for S = 2 at NT = 1.
// ------------------------------------------------------------------------------------------------------------

#define MV_U 2                                          // rounds per ring item
#define MV_STAGE_BYTES(threads) (MV_U * 2 * (threads) * 16)  // one item of every warp: 16 KB at 256 threads
#define MV_MAX_STAGES 6
#define MV_MAX_NT 8

__device__ __forceinline__ int mv_kpad(int k) { return (k + 31) & ~31; }
// bytes per staged x row: k padded to a round, plus 64 B where that is a multiple of 128 (bank spread)
__device__ __forceinline__ unsigned int mv_xstride(int k) {
    const unsigned int b = 2u * (unsigned int)mv_kpad(k);
    return b % 128u == 0u ? b + 64u : b;
}
__device__ __forceinline__ unsigned int mv_fixed_bytes(int nt, int nw, int k) {
    return (unsigned int)(nt * nw) * 512u + 256u + 8u * (unsigned int)nt * mv_xstride(k);
}

// ---- pieces of the MV and MVC engines ---------------------------------------------------------------------

// One ring item: lane (gid, tig) copies 16 bytes of each of its pair's two rows w0, w1 (nullptr: a pair past the
// last, zeros) for the rounds r .. r + MV_U - 1 below r_end into its slot dst (zeros past k and past r_end). w is
// any valid address (the source of a zero fill). No commit.
template <typename T>
__device__ __forceinline__ void mv_copy_item(const T* w, const T* w0, const T* w1, int k, int r, int r_end, int tig,
                                             uint4* dst) {
#pragma unroll
    for (int u = 0; u < MV_U; ++u) {
        const int ru = r + u, e = ru * 32 + tig * 8;
        const bool ok = w0 != nullptr && ru < r_end && e < k;
        db_cp_async16(dst + (2 * u) * 32, ok ? w0 + e : w, ok);
        db_cp_async16(dst + (2 * u + 1) * 32, ok ? w1 + e : w, ok);
    }
}

// The MV engine's ring items of a warp, in issue order: tile t of `tiles` (tile number first + t * step; t wraps to
// 0 after the last, for the next pass), k item c of C (rounds r0 + c * MV_U .. below r_end). Counted on without
// divisions, the pair's weight rows worked out once a tile (element offsets: few registers). Why: the engine is
// bound by its warps' instruction latency (8 warps a SM), and Nsight Compute (H100, QKV at 64 rows) found over
// half of its instructions integer index arithmetic against 2 % HMMAs; this and mv_stage_x's counters took
// 5-17 % off its calls at 2-64 rows. (The MVC engine, off by default, keeps its per-item arithmetic: its
// registers are at the limit.)
struct MvGeom {
    int C, tiles, first, step, r0, r_end;
};
#define MV_NO_PAIR 0xffffffffu
struct MvStream {
    int left;  // items still to issue
    int t = 0, c = 0;
    unsigned int o0 = 0u, o1 = 0u;  // this lane's pair's rows (element offsets; o0 == MV_NO_PAIR: none, zeros)
    // the next item into `dst` (one commit group; empty once none is left)
    template <typename T, typename Job>
    __device__ __forceinline__ void issue(const Job& job, const T* w, int k, const MvGeom& m, int gid, int tig,
                                          uint4* dst) {
        if (left > 0) {
            if (c == 0) {  // a new tile: this lane's pair's rows
                const int g = (m.first + t * m.step) * 8 + gid;
                o0 = MV_NO_PAIR;
                o1 = 0u;
                if (g < job.npairs) {
                    int a, b;
                    job.rows(g, a, b);
                    o0 = (unsigned int)a * (unsigned int)k;
                    o1 = (unsigned int)b * (unsigned int)k;
                }
            }
            mv_copy_item(w, o0 != MV_NO_PAIR ? w + o0 : nullptr, w + o1, k, m.r0 + c * MV_U, m.r_end, tig, dst);
            --left;
            if (++c == m.C) {
                c = 0;
                if (++t == m.tiles) t = 0;
            }
        }
        db_cp_commit();
    }
};

// One landed ring item (src) against the staged x: words 0-1 / 2-3 of each round's 16 bytes feed two m16n8k16
// steps; xr is this lane's x row (gid) at round r, its n8 column j 8 * j rows further (xstride bytes a row).
template <typename T, int NT>
__device__ __forceinline__ void mv_mma_item(const uint4* src, const unsigned char* xr, unsigned int xstride, int r,
                                            int r_end, float (&acc)[NT][4]) {
#pragma unroll
    for (int u = 0; u < MV_U; ++u) {
        if (r + u >= r_end) break;  // warp-uniform
        const uint4 wa = src[(2 * u) * 32], wb = src[(2 * u + 1) * 32];
        const unsigned int a0[4] = {wa.x, wb.x, wa.y, wb.y};
        const unsigned int a1[4] = {wa.z, wb.z, wa.w, wb.w};
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const unsigned char* xj = xr + 64u * (unsigned int)u + (unsigned int)(8 * j) * xstride;
            const uint4 xv = *reinterpret_cast<const uint4*>(xj);
            MmaType<T>::mma(acc[j], a0, xv.x, xv.y);
            MmaType<T>::mma(acc[j], a1, xv.z, xv.w);
        }
    }
}

// x rows b0 .. b0 + 8 NT - 1, elements k0 .. k0 + kl of each (rows k apart in x), into xs as f16/bf16 (rows of
// xstride bytes, kp elements: zero past kl and past the batch), times the norm weight when NORM, and each row's
// sum of x^2 (in f32) into ssum. Warp w: rows w, w + NW, ...; 8 k per lane per iteration, G iterations' loads in
// flight (registers: 128 at two blocks per SM). Requires kp > 0.
template <typename T, int NT, bool NORM>
__device__ __forceinline__ void mv_stage_x(const float* x, const T* nw, int k, int k0, int kl, int kp, int batch,
                                           int b0, unsigned char* xs, unsigned int xstride, float* ssum) {
    constexpr int PB = 8 * NT, G = NORM ? 4 : 8;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, NW = (int)blockDim.x >> 5;
    const int IT = (kp + 255) / 256;      // iterations per row
    const int nrl = warp < PB ? (PB - 1 - warp) / NW + 1 : 0;  // this warp's rows warp + NW rl (none: NW > PB)
    float ss = 0.0f;
    int rl0 = 0, j0 = 0;  // (row, iteration) of the group's first load: counted on, never divided
    while (rl0 < nrl) {
        float4 va[G], vb[G];
        uint4 gv[G];
        int rl = rl0, j = j0;
#pragma unroll
        for (int u = 0; u < G; ++u) {
            const int e = j * 256 + lane * 8;
            const int b = b0 + warp + NW * rl;
            va[u] = vb[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            gv[u] = make_uint4(0u, 0u, 0u, 0u);
            if (rl < nrl && b < batch && e < kl) {
                const float4* p = reinterpret_cast<const float4*>(x + (size_t)b * (size_t)k + k0 + e);
                va[u] = db_ldcg(p);
                vb[u] = db_ldcg(p + 1);
                if constexpr (NORM) gv[u] = __ldg(reinterpret_cast<const uint4*>(nw + k0 + e));
            }
            if (++j == IT) {
                j = 0;
                ++rl;
            }
        }
        rl = rl0;  // the same (row, iteration) sequence again, for the uses
        j = j0;
#pragma unroll
        for (int u = 0; u < G; ++u) {
            const int e = j * 256 + lane * 8;
            if (rl >= nrl) break;  // warp-uniform
            float f[8] = {va[u].x, va[u].y, va[u].z, va[u].w, vb[u].x, vb[u].y, vb[u].z, vb[u].w};
            if constexpr (NORM) {
                float gf[8];
                WeightPack<T>::unpack(gv[u], gf);
#pragma unroll
                for (int q = 0; q < 8; ++q) {
                    ss = fmaf(f[q], f[q], ss);
                    f[q] *= gf[q];
                }
            }
            const int row = warp + NW * rl;
            if (e < kp) {
                uint4 h;
                h.x = MmaType<T>::pack(f[0], f[1]);
                h.y = MmaType<T>::pack(f[2], f[3]);
                h.z = MmaType<T>::pack(f[4], f[5]);
                h.w = MmaType<T>::pack(f[6], f[7]);
                *reinterpret_cast<uint4*>(xs + row * xstride + 2u * (unsigned int)e) = h;
            }
            if (j == IT - 1) {
                if constexpr (NORM) ss = db_warp_sum(ss);
                if (lane == 0) ssum[row] = ss;
                ss = 0.0f;
            }
            if (++j == IT) {
                j = 0;
                ++rl;
            }
        }
        rl0 = rl;  // the next group starts where this one ended (a break leaves rl >= nrl: it was the last)
        j0 = j;
    }
}

template <typename T, int NT, bool NORM, typename Job>
__device__ __forceinline__ void mv_run(const Job& job, const T* w, const T* nw, const float* x, int k, int batch,
                                       float eps, int S, unsigned char* smem) {
    constexpr int PB = 8 * NT;  // batch rows per pass
    constexpr int SLOT = MV_U * 2 * 32;  // uint4 cells of one warp's ring slot
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const unsigned int xstride = mv_xstride(k);
    uint4* ring = reinterpret_cast<uint4*>(smem) + warp * S * SLOT + lane;
    const int NW = (int)blockDim.x >> 5;
    const unsigned int ring_bytes = (unsigned int)S * MV_STAGE_BYTES(blockDim.x);
    float4* red = reinterpret_cast<float4*>(smem + ring_bytes);                      // [NW warps][NT][32 lanes]
    float* ssum = reinterpret_cast<float*>(smem + ring_bytes + NT * NW * 512);       // [PB]
    unsigned char* xs = smem + ring_bytes + NT * NW * 512 + 256;                     // [PB][xstride]

    const int R = mv_kpad(k) / 32;
    const int rb = warp * R / NW, re = (warp + 1) * R / NW;  // this warp's rounds
    const int C = (re - rb + MV_U - 1) / MV_U;              // items per tile (0 when k < 8 rounds)
    const int ntiles = (job.npairs + 7) / 8;
    const int mine = (int)blockIdx.x < ntiles ? (ntiles - 1 - (int)blockIdx.x) / (int)gridDim.x + 1 : 0;
    const int npass = (batch + PB - 1) / PB;
    // items (pass, tile t of mine, k item c of C) in order: tile blockIdx.x + t * gridDim.x
    const MvGeom geom{C, mine, (int)blockIdx.x, (int)gridDim.x, rb, re};
    MvStream items{npass * mine * C};
    for (int i = 0; i < S; ++i) items.issue(job, w, k, geom, gid, tig, ring + i * SLOT);  // weights, before the wait
    PDL_WAIT();

    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    int slot = 0;  // the slot of the next item to consume (the ring: item i in slot i % S)
    for (int p = 0; p < npass; ++p) {
        const int b0 = p * PB;
        mv_stage_x<T, NT, NORM>(x, nw, k, 0, k, mv_kpad(k), batch, b0, xs, xstride, ssum);  // (the previous pass's
        // readers of xs passed the tile's closing barrier)
        __syncthreads();
        for (int t = 0; t < mine; ++t) {
            const int tile = (int)blockIdx.x + t * (int)gridDim.x;
            const int g = tile * 8 + gid;
            // the epilogue's inputs, loaded while the tile streams (warp j runs batch column j's epilogue)
            const int bl = warp * 8 + 2 * tig;  // batch row (within the pass) of this lane's first column
            for (int c = 0; c < C; ++c) {
                mm_cp_wait(S - 1);  // this item has landed (groups complete in order)
                const int r = rb + c * MV_U;
                mv_mma_item<T, NT>(ring + slot * SLOT,
                                   xs + (unsigned int)gid * xstride + 2u * (unsigned int)(r * 32 + tig * 8), xstride,
                                   r, re, acc);
                items.issue(job, w, k, geom, gid, tig, ring + slot * SLOT);  // refill it: the item S ahead
                slot = slot + 1 == S ? 0 : slot + 1;
            }
            // the tile's partials: through shared memory, summed in warp order by warp j for column j
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                red[(warp * NT + j) * 32 + lane] = make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
                acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
            }
            __syncthreads();
            if (warp < NT && g < job.npairs) {
                float4 s = red[warp * 32 + lane];
#pragma unroll
                for (int ww = 1; ww < NW; ++ww) {
                    const float4 v = red[(ww * NT + warp) * 32 + lane];
                    s.x += v.x;
                    s.y += v.y;
                    s.z += v.z;
                    s.w += v.w;
                }
#pragma unroll 1  // (unrolled, the QKV epilogue's two rows spill beside the item stream's registers)
                for (int e = 0; e < 2; ++e) {
                    const int b = b0 + bl + e;
                    if (b < batch) {
                        const float scale = NORM ? rsqrtf(ssum[bl + e] / (float)k + eps) : 1.0f;
                        job.epi(g, b, (e ? s.y : s.x) * scale, (e ? s.w : s.z) * scale, job.pre(g, b));
                    }
                }
            }
            __syncthreads();  // red (and, after the last tile, xs) may be overwritten
        }
    }
    db_cp_wait<0>();  // no copy outlives the kernel (the tail groups are empty)
}

// ------------------------------------------------------------------------------------------------------------
// The MVC engine (batch 16 and up, sm_90): the MV engine with the K of every tile split over the MVC_CLUSTER
// blocks of a thread-block cluster. Why: every MV block stages all batch rows of x, a call moves
// grid * batch * k * 4 bytes of x out of L2 (6-8x the weights at 64 rows, kernels/llama_batched.md); here a
// block stages its k / c of them, and x no longer fits in fewer passes only at c times the k.
// * Cluster cl takes the tiles (8 row pairs, as MV) cl, cl + nclusters, ...; its block of rank r the rounds
//   [R r / c, R (r + 1) / c) of every tile (R: k in rounds of 32). Warp w takes whole tiles: tile w of each
//   group of NW tiles, over all of the block's rounds (splitting K over the warps as well would leave a warp a
//   round or two a tile, and a tile's reduction would cost more than its weights).
// * A group of NW tiles: each warp streams its tile through its lane-private cp.async ring (the MV engine's
//   items, running on across groups and passes; the first S issued before griddepcontrol.wait) and multiplies it
//   against the staged x slice; its accumulators go to shared memory; cluster barrier; fragment f (tile f / NT
//   of the group, n8 column f % NT) is summed by a warp of rank f % c over the c blocks' partials in rank order
//   through distributed shared memory (deterministic; the sum of x^2 likewise, NORM), and its epilogue runs
//   from registers as in the MV engine; cluster barrier (the partials and, after a pass, x may be overwritten).
// Shared memory: the MV engine's layout for a k of ceil(R / c) rounds. Requirements: as the MV engine, and a
// grid of whole clusters (any count: clusters stride over the tiles).
// ------------------------------------------------------------------------------------------------------------

template <typename T, int NT, bool NORM, typename Job>
__device__ __forceinline__ void mvc_run(const Job& job, const T* w, const T* nw, const float* x, int k, int batch,
                                        float eps, int S, unsigned char* smem) {
    constexpr int PB = 8 * NT;
    constexpr int SLOT = MV_U * 2 * 32;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int NW = (int)blockDim.x >> 5;
    const MmCluster cl = mm_cluster();
    const int R = mv_kpad(k) / 32;
    const int kr0 = R * cl.rank / cl.size, kr1 = R * (cl.rank + 1) / cl.size;  // this block's rounds
    const int k0 = kr0 * 32, kl = max(0, min(k, kr1 * 32) - k0);              // its k: k0 .. k0 + kl
    const unsigned int xstride = mv_xstride((R + cl.size - 1) / cl.size * 32);
    uint4* ring = reinterpret_cast<uint4*>(smem) + warp * S * SLOT + lane;
    const unsigned int ring_bytes = (unsigned int)S * MV_STAGE_BYTES(blockDim.x);
    float4* part = reinterpret_cast<float4*>(smem + ring_bytes);                  // [NW tiles][NT][32 lanes]
    float* ssum = reinterpret_cast<float*>(smem + ring_bytes + NT * NW * 512);    // [PB]
    unsigned char* xs = smem + ring_bytes + NT * NW * 512 + 256;                  // [PB][xstride]

    const int C = (kr1 - kr0 + MV_U - 1) / MV_U;  // items per tile
    const int ntiles = (job.npairs + 7) / 8;
    const int mine = cl.id < ntiles ? (ntiles - 1 - cl.id) / cl.count + 1 : 0;  // this cluster's tiles
    const int groups = (mine + NW - 1) / NW;
    const int wt = mine > warp ? (mine - 1 - warp) / NW + 1 : 0;  // this warp's tiles (of groups 0 .. wt - 1)
    const int npass = (batch + PB - 1) / PB;
    const int total = npass * wt * C;  // this warp's items

    auto issue = [&](int i) {  // item i of this warp -> its slot i % S; one commit group per call
        if (i < total) {
            const int it = i % (wt * C), t = it / C, c = it - t * C;
            const int g = (cl.id + (t * NW + warp) * cl.count) * 8 + gid;
            int r0 = 0, r1 = 0;
            if (g < job.npairs) job.rows(g, r0, r1);
            mv_copy_item(w, g < job.npairs ? w + (size_t)r0 * k : nullptr, w + (size_t)r1 * k, k, kr0 + c * MV_U, kr1,
                         tig, ring + (i % S) * SLOT);
        }
        db_cp_commit();
    };

    for (int i = 0; i < S; ++i) issue(i);  // weights only, before the wait
    PDL_WAIT();

    float acc[NT][4];
    int i = 0;
    for (int p = 0; p < npass; ++p) {
        const int b0 = p * PB;
        // (the previous pass's readers of xs and ssum passed its last cluster barrier)
        if (kr1 == kr0)  // no rounds on this block (k under c rounds): its share of every sum is zero
            for (int r = threadIdx.x; r < PB; r += blockDim.x) ssum[r] = 0.0f;
        else  // (mv_stage_x needs kp > 0)
            mv_stage_x<T, NT, NORM>(x, nw, k, k0, kl, (kr1 - kr0) * 32, batch, b0, xs, xstride, ssum);
        __syncthreads();
        for (int q = 0; q < groups; ++q) {
#pragma unroll
            for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
            if (q < wt) {  // this warp's tile of group q
                for (int c = 0; c < C; ++c, ++i) {
                    mm_cp_wait(S - 1);  // item i has landed (groups complete in order)
                    const int r = kr0 + c * MV_U;
                    mv_mma_item<T, NT>(ring + (i % S) * SLOT,
                                       xs + (unsigned int)gid * xstride + 2u * (unsigned int)((r - kr0) * 32 + tig * 8),
                                       xstride, r, kr1, acc);
                    issue(i + S);  // refill the slot just consumed
                }
            }
#pragma unroll
            for (int j = 0; j < NT; ++j)
                part[(warp * NT + j) * 32 + lane] = make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
            mm_cluster_sync();  // every block's partials (and ssum) are visible to the cluster
            const int nfrag = min(NW, mine - q * NW) * NT;
            for (int f = cl.rank + cl.size * warp; f < nfrag; f += cl.size * NW) {
                const int tq = f / NT, j = f - tq * NT;
                float4 s = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                for (int r = 0; r < cl.size; ++r) {
                    const float4 v = mm_ld_remote4(mm_remote(part + (tq * NT + j) * 32 + lane, r));
                    s.x += v.x;
                    s.y += v.y;
                    s.z += v.z;
                    s.w += v.w;
                }
                const int g = (cl.id + (q * NW + tq) * cl.count) * 8 + gid;
                if (g < job.npairs) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int bl = j * 8 + 2 * tig + e, b = b0 + bl;  // batch row (within the pass)
                        if (b < batch) {
                            float scale = 1.0f;
                            if constexpr (NORM) {
                                float s2 = 0.0f;
                                for (int r = 0; r < cl.size; ++r) s2 += mm_ld_remote(mm_remote(ssum + bl, r));
                                scale = rsqrtf(s2 / (float)k + eps);
                            }
                            job.epi(g, b, (e ? s.y : s.x) * scale, (e ? s.w : s.z) * scale, job.pre(g, b));
                        }
                    }
                }
            }
            mm_cluster_sync();  // every block has read every partial before they are overwritten
        }
    }
    db_cp_wait<0>();  // no copy outlives the kernel (the tail groups are empty)
}

template <bool CLUSTER, typename T, int NT, bool NORM, typename Job>
__device__ __forceinline__ void mv_engine_nt(const Job& job, const T* w, const T* nw, const float* x, int k,
                                             int batch, float eps, int S, unsigned char* smem) {
    if constexpr (CLUSTER)
        mvc_run<T, NT, NORM>(job, w, nw, x, k, batch, eps, S, smem);
    else
        mv_run<T, NT, NORM>(job, w, nw, x, k, batch, eps, S, smem);
}

// NT: the fewest n8 columns (a power of two, <= MV_MAX_NT) covering the batch, halved until x fits beside a
// two-stage ring; the ring takes what is left (up to MV_MAX_STAGES stages). x is k wide for the MV engine, and for
// the MVC engine (CLUSTER) the largest k slice of a cluster's blocks (ceil(R / c) rounds).
template <bool CLUSTER, typename T, bool NORM, typename Job>
__device__ __forceinline__ void mv_engine(const Job& job, const T* w, const T* nw, const float* x, int k, int batch,
                                          float eps) {
    extern __shared__ uint4 mv_smem[];
    unsigned char* smem = reinterpret_cast<unsigned char*>(mv_smem);
    const unsigned int dyn = db_dynamic_smem();
    int xk = k;
    if constexpr (CLUSTER) {
        const int c = mm_cluster().size, R = mv_kpad(k) / 32;
        xk = (R + c - 1) / c * 32;
    }
    int nt = 1;
    while (nt < MV_MAX_NT && 8 * nt < batch) nt *= 2;
    const int warps = (int)blockDim.x >> 5;
    const unsigned int stage = MV_STAGE_BYTES(blockDim.x);
    while (nt > 1 && mv_fixed_bytes(nt, warps, xk) + 2u * stage > dyn) nt /= 2;
    const unsigned int fixed = mv_fixed_bytes(nt, warps, xk);
    const int S = dyn > fixed ? min(MV_MAX_STAGES, (int)((dyn - fixed) / stage)) : 0;
    if (S < 2) __trap();  // the launch gave too little shared memory (kernels/llama_batched.md: mv_shared)
    switch (nt) {
        case 1: mv_engine_nt<CLUSTER, T, 1, NORM>(job, w, nw, x, k, batch, eps, S, smem); break;
        case 2: mv_engine_nt<CLUSTER, T, 2, NORM>(job, w, nw, x, k, batch, eps, S, smem); break;
        case 4: mv_engine_nt<CLUSTER, T, 4, NORM>(job, w, nw, x, k, batch, eps, S, smem); break;
        default: mv_engine_nt<CLUSTER, T, 8, NORM>(job, w, nw, x, k, batch, eps, S, smem); break;
    }
}

#else  // HIP: no mma.sync; the batch-1 GEMV engine (correct at any grid and shared memory size)

template <typename T, bool NORM, typename Job>
__device__ __forceinline__ void mm_gemm(const Job& job, const T* w, const T* nw, const float* x, int k, int batch,
                                        float eps) {
    fw_gemv<T, NORM>(job, w, nw, x, k, batch, eps);
}
template <bool CLUSTER, typename T, bool NORM, typename Job>
__device__ __forceinline__ void mv_engine(const Job& job, const T* w, const T* nw, const float* x, int k, int batch,
                                          float eps) {
    fw_gemv<T, NORM>(job, w, nw, x, k, batch, eps);
}
#endif

// ---- the entries: f16/bf16 run the MMA engine (_mma) or the MV engine (_mv), f32 the GEMV engine ------------

#define ENGINE_MMA 0
#define ENGINE_MV 1
#define ENGINE_MVC 2
template <int ENGINE, typename T, bool NORM, typename Job>
__device__ __forceinline__ void tc_gemm(const Job& job, const T* w, const T* nw, const float* x, int k, int batch,
                                        float eps) {
    if constexpr (ENGINE == ENGINE_MV || ENGINE == ENGINE_MVC)
        mv_engine<ENGINE == ENGINE_MVC, T, NORM>(job, w, nw, x, k, batch, eps);
    else
        mm_gemm<T, NORM>(job, w, nw, x, k, batch, eps);
}

template <int ENGINE, typename T>
__device__ __forceinline__ void qkv_tc_impl(const T* w, const T* norm, const float* x, float* q, T* k_cache,
                                            T* v_cache, const int* pos, const float* bias, const float* inv_freq,
                                            int hidden, int heads, int kv_heads, int head_dim, int max_seq,
                                            int batch, float eps) {
    DB_TRACE_BLOCK();
    PDL_LAUNCH_DEPENDENTS();
    const QkvJob<T> job{q, k_cache, v_cache, pos, bias, inv_freq, heads, kv_heads, head_dim, max_seq,
                        (heads + 2 * kv_heads) * (head_dim / 2)};
    tc_gemm<ENGINE, T, true>(job, w, norm, x, hidden, batch, eps);
}

template <int ENGINE, typename T>
__device__ __forceinline__ void gate_up_tc_impl(const T* w, const T* norm, const float* x, float* act, int ffn,
                                                int hidden, int batch, float eps) {
    DB_TRACE_BLOCK();
    PDL_LAUNCH_DEPENDENTS();
    tc_gemm<ENGINE, T, true>(SwigluJob{act, ffn, ffn}, w, norm, x, hidden, batch, eps);
}

template <int ENGINE, typename T, bool NORM, bool ADD>
__device__ __forceinline__ void rows_tc_impl(const T* w, const T* norm, const float* x, float* y, int n, int k,
                                             int batch, float eps) {
    DB_TRACE_BLOCK();
    PDL_LAUNCH_DEPENDENTS();
    tc_gemm<ENGINE, T, NORM>(RowsJob<ADD>{y, n, (n + 1) / 2}, w, norm, x, k, batch, eps);
}

// NAME: mma | mv; ATTRS: launch bounds and (MMA) the cluster shape
#define DEFINE_TC(NAME, ENGINE, ATTRS, SUFFIX, T)                                                           \
    extern "C" __global__ void ATTRS qkv_rope_##NAME##_##SUFFIX(                                           \
        const T* w, const T* norm, const float* x, float* q, T* k_cache, T* v_cache, const int* pos,         \
        const float* bias, const float* inv_freq, int hidden, int heads, int kv_heads, int head_dim,         \
        int max_seq, int batch, float eps) {                                                                 \
        qkv_tc_impl<ENGINE, T>(w, norm, x, q, k_cache, v_cache, pos, bias, inv_freq, hidden, heads,         \
                               kv_heads, head_dim, max_seq, batch, eps);                                     \
    }                                                                                                       \
    extern "C" __global__ void ATTRS gate_up_silu_##NAME##_##SUFFIX(const T* w, const T* norm, const float* x, \
                                                                     float* act, int ffn, int hidden,         \
                                                                     int batch, float eps) {                  \
        gate_up_tc_impl<ENGINE, T>(w, norm, x, act, ffn, hidden, batch, eps);                               \
    }                                                                                                       \
    extern "C" __global__ void ATTRS gemv_res_##NAME##_##SUFFIX(const T* w, const float* x, float* y, int n,  \
                                                                 int k, int batch) {                          \
        rows_tc_impl<ENGINE, T, false, true>(w, nullptr, x, y, n, k, batch, 0.0f);                          \
    }                                                                                                       \
    extern "C" __global__ void ATTRS gemv_norm_##NAME##_##SUFFIX(const T* w, const T* norm, const float* x,  \
                                                                  float* y, int n, int k, int batch,         \
                                                                  float eps) {                               \
        rows_tc_impl<ENGINE, T, true, false>(w, norm, x, y, n, k, batch, eps);                              \
    }
#define MMA_ATTRS __launch_bounds__(MM_THREADS, 1) MM_CLUSTER_ATTR
#define MV_ATTRS __launch_bounds__(MV_THREADS, 1)  // 128 registers: two 256-thread blocks or one 512 per SM
DEFINE_TC(mma, ENGINE_MMA, MMA_ATTRS, f16, db_f16)
DEFINE_TC(mma, ENGINE_MMA, MMA_ATTRS, bf16, db_bf16)
DEFINE_TC(mv, ENGINE_MV, MV_ATTRS, f16, db_f16)
DEFINE_TC(mv, ENGINE_MV, MV_ATTRS, bf16, db_bf16)
#define MVC_ATTRS __launch_bounds__(MV_THREADS, 1) MVC_CLUSTER_ATTR
DEFINE_TC(mvc, ENGINE_MVC, MVC_ATTRS, f16, db_f16)
DEFINE_TC(mvc, ENGINE_MVC, MVC_ATTRS, bf16, db_bf16)

// f32 weights: the batch-1 GEMV engine (any grid, any dynamic shared memory), so fp32 rows match batch 1 exactly
#define DEFINE_TC_F32(NAME)                                                                                 \
    extern "C" __global__ void __launch_bounds__(FW_BLOCK, 1) qkv_rope_##NAME##_f32(                       \
        const float* w, const float* norm, const float* x, float* q, float* k_cache, float* v_cache,         \
        const int* pos, const float* bias, const float* inv_freq, int hidden, int heads, int kv_heads,       \
        int head_dim, int max_seq, int batch, float eps) {                                                   \
        qkv_rope_impl<float>(w, norm, x, q, k_cache, v_cache, pos, bias, inv_freq, hidden, heads, kv_heads, \
                             head_dim, max_seq, batch, eps);                                                 \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(FW_BLOCK, 1) gate_up_silu_##NAME##_f32(                   \
        const float* w, const float* norm, const float* x, float* act, int ffn, int hidden, int batch,       \
        float eps) {                                                                                         \
        gate_up_impl<float>(w, norm, x, act, ffn, hidden, batch, eps);                                      \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(FW_BLOCK, 1) gemv_res_##NAME##_f32(                       \
        const float* w, const float* x, float* y, int n, int k, int batch) {                                 \
        gemv_rows_impl<float, false, true>(w, nullptr, x, y, n, k, batch, 0.0f);                            \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(FW_BLOCK, 1) gemv_norm_##NAME##_f32(                      \
        const float* w, const float* norm, const float* x, float* y, int n, int k, int batch, float eps) {   \
        gemv_rows_impl<float, true, false>(w, norm, x, y, n, k, batch, eps);                                \
    }
DEFINE_TC_F32(mma)
DEFINE_TC_F32(mv)
DEFINE_TC_F32(mvc)

// ------------------------------------------------------------------------------------------------------------
// attn_decode_batched_<wt>: decode attention for many rows, one block per (row, kv head, split), the whole query
// group of the kv head in the block, so each K/V byte is read once per step (attn_decode reads it once per query
// head). Params as attn_decode_<wt> (caches of wt: float, f16 or bf16); grid [batch * kv_heads, splits], block
// [256]; heads / kv_heads <= AB_MAX_GROUP.
// Splits are sized by the real length: row b has L = min(pos[b] + 1, max_seq) keys, cut into
// nlive = min(splits, ceil_div(L, chunk)) splits of ceil_div(L, nlive) keys (chunk: the fewest keys worth a
// split); blocks past nlive return. K and V tiles of AB_TK keys go through shared memory as the cache holds them
// (wt: 16-byte cp.async, converted to f32 as they are read); pos is read before the wait and a live split copies
// its first tile's rows below p before it (row p and q after it). Warp w owns query heads w and w + 8:
// per tile, lane t scores key t against the head's q (its K row in 16-byte reads from shared memory, q broadcast),
// the warp's online softmax needs no shared memory, and p.V gives lane l dims l + 32 j (each key's p from its
// lane by shuffle, the V row read along the dims): per tile one barrier after the copies and one before the
// buffer is refilled, and every shared read conflict-free (ab_ld: rows of head_dim + 4 floats, or head_dim + 8
// or + 16 halves). A group of at most 4
// query heads at head_dim <= 64 gives each head two warps instead (tiles of 64 keys, 32 a warp, the two warps'
// (m, l, o) merged at the end), so half the warps do not idle (ab_warps_a_head). nlive == 1: the block writes
// out; else partials (o, m, l) per head to part_o/part_ml and the last block of the row's head group (a counter,
// counters[b * heads + first head], left at zero) combines them with attn_combine, as attn_decode. L <= 0:
// split 0 writes zeros.
//
// attn_qkv_<wt> (the GEMM path, batch >= gemm_batch): the same attention fed straight from the QKV GEMM's f32
// output, so RoPE, the KV append and the cast to the O GEMM's input type need no nodes of their own:
//   params  const f32* qkv, wt* k_cache, wt* v_cache, const i32* pos, const f32* bias, const f32* inv_freq,
//           f32* part_o, f32* part_ml, i32* counters, wt* out, i32 heads, i32 kv_heads, i32 head_dim,
//           i32 max_seq, i32 chunk, f32 scale
// Each block biases and ropes its heads' q rows from qkv ([batch, (heads + 2 * kv_heads) * head_dim], wqkv's
// row order) into shared memory as rope_kv_prefill (kernels/llama_prefill.cu) does, arithmetic for arithmetic.
// The block whose split holds the row's new key (the last split with keys; the position p < max_seq) ropes that key
// and biases its value, writes both, rounded to wt, into its shared tile in place of the cache rows it copied
// (nobody else reads row p this step), and subgroup 0's block stores them in the caches at p (rounded to wt once:
// the tile holds the very values a later step reads back from the cache). out [batch, heads * head_dim]
// is wt (rounded once from the f32 result). A position >= max_seq appends nothing (as rope_kv_prefill). Any
// group size: a group of more than AB_MAX_GROUP query heads takes ceil_div(group, AB_MAX_GROUP) blocks
// (subgroups; blockIdx.x = (row * kv_heads + kv head) * subgroups + subgroup), each reading the kv head; grid
// [batch * kv_heads * subgroups, splits].
// Requirements: head_dim % 8 == 0, <= 128; splits (gridDim.y) <= the third axis of part_o / part_ml; q, caches
// 16-byte aligned.
// ------------------------------------------------------------------------------------------------------------

#define AB_THREADS 256
#define AB_TK 32
#define AB_MAX_GROUP 16
#define AB_MAX_HD 128
#define AB_LD (AB_MAX_HD + 4)
#define AB_ALIGN16 __attribute__((aligned(16)))
// K/V tiles: rows of ab_ld<wt>(head_dim) cache elements (below), one K and one V tile of AB_TK * S keys in the float
// buffer kvs (sized for f32 tiles; f16/bf16 tiles take about half of it): a group of at most 4 query heads gives
// each head S = 2 warps where a 64-key f32 tile fits (head_dim <= 64, at every wt), each scoring its own AB_TK keys
// of every tile, merged at the end, so half the warps do not idle.
// H100, tools/bench_attn.py (attn_qkv_f16, TinyLlama heads, one run): single-buffered at 64 registers (4 blocks an
// SM) beat double-buffered tiles (another tile in flight, fewer blocks) at every batch and context measured.
#define AB_KV_FLOATS_64 (2 * (2 * AB_TK) * (64 + 4))  // K and V tiles of 2 * AB_TK keys at head_dim 64
#define AB_KV_FLOATS (AB_KV_FLOATS_64 > 2 * AB_TK * AB_LD ? AB_KV_FLOATS_64 : 2 * AB_TK * AB_LD)
// unrolling of the score and p.V loops (loads in flight a lane)
#ifndef AB_UNROLL
#define AB_UNROLL 2
#endif
// __launch_bounds__ minimum blocks per SM: 4 caps registers at 64, so 4 blocks of 256 threads fit an SM, as their
// 43 KiB of shared memory allow (H100, same run: 1.2-1.5x faster than 80 registers and 3 blocks)
#ifndef AB_MIN_BLOCKS
#define AB_MIN_BLOCKS 4
#endif

struct AbShared {
    AB_ALIGN16 float kvs[AB_KV_FLOATS];  // the K tile, then the V tile (cache elements); the combine's partials
    AB_ALIGN16 float qs[AB_MAX_GROUP * AB_MAX_HD];
    AB_ALIGN16 float kv_new[2 * AB_MAX_HD];  // QKV: the row's new key (roped), then its value (f32)
    int s_last;
};

// Elements a K/V tile row (cache element type K): 16-byte aligned rows (cp.async) of an odd number of 16-byte
// units, so the 16-byte reads of 8 lanes (8 keys, one chunk each) hit distinct banks: f32 head_dim + 4 floats;
// f16/bf16 head_dim + 8 halves, or + 16 where head_dim / 8 is odd. The V reads (a row along the dims) are
// conflict-free at any width.
template <typename K>
__device__ __forceinline__ int ab_ld(int hd) {
    if constexpr (sizeof(K) == 4) return hd + 4;  // head_dim % 8 == 0: an odd number of 16-byte units
    return hd + 8 + (hd & 8);                     // + 8 where head_dim / 8 is even, else + 16
}

// Pair i of a biased head row at position p, roped: (x1, x2) -> (y1, y2), as rope_kv_prefill
// (kernels/llama_prefill.cu), arithmetic for arithmetic.
__device__ __forceinline__ void ab_rope(float x1, float x2, float inv_freq, int p, float& y1, float& y2) {
    float sn, cs;
    rope_sincos((float)p * inv_freq, &sn, &cs);
    y1 = __fadd_rn(__fmul_rn(x1, cs), __fmul_rn(-x2, sn));
    y2 = __fadd_rn(__fmul_rn(x2, cs), __fmul_rn(x1, sn));
}
__device__ __forceinline__ void ab_rope_pair(const float* src, const float* bsrc, const float* inv_freq, int i,
                                             int half, int p, float& y1, float& y2) {
    ab_rope(src[i] + bsrc[i], src[i + half] + bsrc[i + half], inv_freq[i], p, y1, y2);
}

// The keys [start, end) that split s of a row at position p takes: L = min(p + 1, max_seq) keys over the live
// splits (chunk keys at least each, at most gridDim.y; a live split may have none). nlive is 0 for a padding row.
struct AbSplit {
    int p, nlive, start, end;
    bool live;
};
__device__ __forceinline__ AbSplit ab_keys(int p, int s, int max_seq, int chunk) {
    AbSplit sp{p, 0, 0, 0, false};
    const int L = min(p + 1, max_seq);
    if (L <= 0) return sp;
    sp.nlive = min((int)gridDim.y, (L + chunk - 1) / chunk);
    if (s >= sp.nlive) return sp;
    const int per = (L + sp.nlive - 1) / sp.nlive;
    sp.start = s * per;
    sp.end = min(L, sp.start + per);
    sp.live = true;
    return sp;
}

// A split that is not live: split 0 of a padding row writes the zeros of its nh heads from head0 of out (after the
// wait: earlier readers of out are done). Every thread of the block calls it; the block then returns.
template <typename O>
__device__ __forceinline__ void ab_not_live(const AbSplit& sp, int s, O* out, size_t head0, int nh, int hd) {
    if (sp.nlive == 0 && s == 0)
        for (int e = threadIdx.x; e < nh * hd; e += AB_THREADS) out[head0 * hd + e] = from_float<O>(0.0f);
}

// ab_keys at pos[b] after the wait; a split that is not live lands its copies (ab_not_live) before it returns.
template <typename O>
__device__ __forceinline__ AbSplit ab_split(const int* pos, int b, int s, int max_seq, int chunk, O* out,
                                            size_t head0, int nh, int hd) {
    const AbSplit sp = ab_keys(pos[b], s, max_seq, chunk);
    if (!sp.live) {
        db_cp_wait<0>();
        ab_not_live(sp, s, out, head0, nh, hd);
    }
    return sp;
}

// After a split's partials are stored: the last of the row's nlive splits to arrive (a counter, left at zero)
// combines them with attn_combine through `sbuf` (free shared memory). Every thread of the block calls it.
template <typename O>
__device__ __forceinline__ void ab_combine_last(const float* part_o, const float* part_ml, O* out, int* counter,
                                                size_t row0, int nh, int splits, int nlive, int hd, float* sbuf,
                                                int sbuf_floats, int& s_last) {
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) s_last = atomicAdd(counter, 1) == nlive - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    attn_combine(part_o, part_ml, out, row0, nh, splits, nlive, hd, sbuf, sbuf_floats);
    if (threadIdx.x == 0) *counter = 0;
}

// Warps a query head: 2 where the group has at most 4 heads (8 warps) and a 2 * AB_TK-key tile fits the buffer.
__device__ __forceinline__ int ab_warps_a_head(int group, int head_dim) {
    return 2 * group <= AB_THREADS / 32 && 2 * 2 * AB_TK * (head_dim + 4) <= AB_KV_FLOATS ? 2 : 1;
}

// QKV: q is the QKV GEMM's output (rope, bias and the KV append here); else q is the roped q [batch, heads,
// head_dim] and the caches hold key p already (bias and inv_freq unused, nothing written to the caches).
// S: warps a query head (ab_warps_a_head), a template argument so the one-warp form keeps its registers.
// K: the caches' element type (the tiles hold it; converted to f32 as read from shared memory).
template <typename K, typename O, bool QKV, int S>
__device__ __forceinline__ void attn_batched_impl(AbShared& sh, const float* q, K* k_cache, K* v_cache,
                                                  const int* pos, const float* bias, const float* inv_freq,
                                                  float* part_o, float* part_ml, int* counters, O* out, int heads,
                                                  int kv_heads, int head_dim, int max_seq, int chunk, float scale) {
    float* kvs = sh.kvs;
    float* qs = sh.qs;
    float* kv_new = sh.kv_new;
    int& s_last = sh.s_last;
    DB_TRACE_BLOCK();
    if (ATTN_BATCHED_TRIGGER == 0) PDL_LAUNCH_DEPENDENTS();
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int group = heads / kv_heads, subs = QKV ? (group + AB_MAX_GROUP - 1) / AB_MAX_GROUP : 1;
    const int bk = blockIdx.x / subs, sub = blockIdx.x - bk * subs;
    const int b = bk / kv_heads, kvh = bk - b * kv_heads, s = blockIdx.y;
    const int G = QKV ? min(AB_MAX_GROUP, group - sub * AB_MAX_GROUP) : group;  // query heads of this block
    const int h0 = kvh * group + sub * AB_MAX_GROUP;  // its first query head
    constexpr int VEC = 16 / (int)sizeof(K);  // cache elements a 16-byte copy (4 f32, 8 f16/bf16)
    const int hd = head_dim, half = hd / 2, ld = ab_ld<K>(hd);
    constexpr int TKE = AB_TK * S;  // keys a tile
    constexpr int NU = S == 1 ? 2 : 1;  // heads a warp
    // warp w: with S == 1 heads w and w + 8; else head w % G and keys [32 sl, 32 sl + 32) of each tile; a warp
    // past S slices (G not dividing 8) gets head G: none
    const int sl = S > 1 ? warp / G : 0, hw = S > 1 ? (sl < S ? warp - sl * G : G) : warp;
    const size_t kv_base = ((size_t)b * kv_heads + kvh) * (size_t)max_seq * (size_t)hd;
    const size_t qkv_width = (size_t)(heads + 2 * kv_heads) * hd;
    const float* qg = QKV ? q + (size_t)b * qkv_width + (size_t)h0 * hd : q + ((size_t)b * heads + h0) * hd;
    // K and V rows [t0, t0 + TKE) (rows past nt zero-filled) into ks/vs: 16-byte copies, no commit
    K* ks = reinterpret_cast<K*>(kvs);
    K* vs = ks + TKE * ld;
    // Without QKV (attn_decode_batched) pos, a step input, is read before the wait (kernels/llama_fused.md, the PDL
    // contract): a dead split leaves without waiting, and a live one copies its first tile's rows below p before
    // the wait; row p (the QKV node writes it) is copied after the wait, never twice (copy_tile issues nothing for
    // row `skip`). attn_qkv keeps pos after the wait: at 64 registers the early form spills.
    constexpr bool POS_EARLY = !QKV;
    auto copy_tile = [&](int t0, int nt, int skip) {
        for (int c = tid; c < TKE * (hd / VEC); c += AB_THREADS) {
            const int r = c / (hd / VEC), ch = c - r * (hd / VEC);
            if (POS_EARLY && t0 + r == skip) continue;
            const bool ok = r < nt;
            const size_t off = kv_base + (size_t)(t0 + (ok ? r : 0)) * hd + ch * VEC;
            db_cp_async16(ks + r * ld + ch * VEC, k_cache + off, ok);
            db_cp_async16(vs + r * ld + ch * VEC, v_cache + off, ok);
        }
    };
    auto copy_q = [&]() {
        if (!QKV)
            for (int c = tid; c < G * hd / 4; c += AB_THREADS) db_cp_async16(qs + 4 * c, qg + 4 * c, true);
    };
    // QKV: biased and roped rows (x1, x2) -> qs or kv_new, as rope_kv_prefill: pair i of head row `src`
    auto rope_pair = [&](const float* src, const float* bsrc, int i, int p, float* dst) {
        ab_rope_pair(src, bsrc, inv_freq, i, half, p, dst[i], dst[i + half]);
    };
    AbSplit sp;
    const bool early = POS_EARLY || s == 0;  // the first tile is in flight already (without POS_EARLY: split 0's)
    if constexpr (POS_EARLY) {
        sp = ab_keys(pos[b], s, max_seq, chunk);
        if (!sp.live && s != 0) return;
        const int nt0 = min(TKE, sp.end - sp.start);
        if (nt0 > 0) copy_tile(sp.start, nt0, sp.p);
        PDL_WAIT();
        if (!sp.live) {  // split 0 of a padding row
            ab_not_live(sp, s, out, (size_t)b * heads + h0, G, hd);
            return;
        }
        copy_q();
        if (sp.start <= sp.p && sp.p - sp.start < nt0)
            for (int c = tid; c < hd / VEC; c += AB_THREADS) {
                const int r = sp.p - sp.start;
                const size_t off = kv_base + (size_t)sp.p * hd + c * VEC;
                db_cp_async16(ks + r * ld + c * VEC, k_cache + off, true);
                db_cp_async16(vs + r * ld + c * VEC, v_cache + off, true);
            }
        db_cp_commit();
    } else {
        PDL_WAIT();
        // split 0 is live whenever the row is and starts at key 0: it copies q and its first tile together with
        // the pos load (one round trip; keys past the row's length are masked below)
        if (early) {
            copy_q();
            copy_tile(0, min(TKE, max_seq), -1);
        }
        db_cp_commit();
        sp = ab_split(pos, b, s, max_seq, chunk, out, (size_t)b * heads + h0, G, hd);
        if (!sp.live) return;
    }
    const int p = sp.p, nlive = sp.nlive, start = sp.start, end = sp.end;
    const int ntiles = (end - start + TKE - 1) / TKE;
    if (!early) {  // q and the first tile (split 0 has both in flight already)
        copy_q();
        copy_tile(start, min(TKE, end - start), -1);
    }
    db_cp_commit();
    // QKV: the block whose keys hold p (when p < max_seq: the last split with any keys) replaces the cache row
    // it copies with the new key and value, rounded to K as the cache stores them
    const bool append = QKV && p < max_seq && start <= p && p < end;
    if (QKV) {
        for (int idx = tid; idx < G * half; idx += AB_THREADS) {
            const int h = idx / half, i = idx - h * half;
            rope_pair(qg + (size_t)h * hd, bias + (size_t)(h0 + h) * hd, i, p, qs + h * hd);
        }
        if (append) {
            const float* krow = q + (size_t)b * qkv_width + (size_t)(heads + kvh) * hd;
            const float* kb = bias + (size_t)(heads + kvh) * hd;
            const size_t vo = (size_t)kv_heads * hd;  // v rows follow the k rows
            for (int i = tid; i < half; i += AB_THREADS) rope_pair(krow, kb, i, p, kv_new);
            for (int e = tid; e < hd; e += AB_THREADS) kv_new[AB_MAX_HD + e] = krow[vo + e] + kb[vo + e];
            __syncthreads();
            if (sub == 0)  // into the caches now: no block reads slot p this step (this one patches its tile)
                for (int e = tid; e < hd; e += AB_THREADS) {
                    kv_store(k_cache + kv_base + (size_t)p * hd + e, kv_new[e]);
                    kv_store(v_cache + kv_base + (size_t)p * hd + e, kv_new[AB_MAX_HD + e]);
                }
        }
    }

    // heads hw + 8 u of the warp: scores with one key a lane, p.V with dims lane + 32 j a lane
    float m_run[NU], l_run[NU];
    float o[NU][AB_MAX_HD / 32];
#pragma unroll
    for (int u = 0; u < NU; ++u) {
        m_run[u] = NEG_INF;
        l_run[u] = 0.0f;
    }
#pragma unroll
    for (int u = 0; u < NU; ++u)
#pragma unroll
        for (int j = 0; j < AB_MAX_HD / 32; ++j) o[u][j] = 0.0f;

    for (int it = 0; it < ntiles; ++it) {
        const int t0 = start + it * TKE, nt = min(TKE, end - t0);
        const int nw = min(AB_TK, nt - AB_TK * sl);  // this warp's keys of the tile (<= 0: none)
        // tile it is in flight (split 0's first tile: its rows past nt are masked like zeros)
        db_cp_commit();
        if (ATTN_BATCHED_TRIGGER == 1 && it == 0) PDL_LAUNCH_DEPENDENTS();
        db_cp_wait<0>();
        __syncthreads();
        if (QKV && append && p - t0 < nt) {  // the tile holds key p: the new key and value (block-uniform), as
            for (int e = tid; e < hd; e += AB_THREADS) {  // the cache holds them (rounded to K: from_float = kv_store)
                ks[(p - t0) * ld + e] = from_float<K>(kv_new[e]);
                vs[(p - t0) * ld + e] = from_float<K>(kv_new[AB_MAX_HD + e]);
            }
            __syncthreads();
        }
#pragma unroll
        for (int u = 0; u < NU; ++u) {
            const int h = hw + 8 * u;
            if (h >= G || nw <= 0) continue;  // warp-uniform
            // score of key 32 sl + lane: its K row (16 bytes a read, VEC elements as floats; rows ab_ld apart:
            // conflict-free) against q (a broadcast)
            float sc = NEG_INF;
            if (lane < nw) {
                const uint4* k16 = reinterpret_cast<const uint4*>(ks + (AB_TK * sl + lane) * ld);
                const float4* q4 = reinterpret_cast<const float4*>(qs + h * hd);
                float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma unroll AB_UNROLL
                for (int c = 0; c < hd / VEC; ++c) {
                    float kf[VEC];
                    WeightPack<K>::unpack(k16[c], kf);
#pragma unroll
                    for (int e = 0; e < VEC; e += 4) {
                        const float4 qv = q4[c * (VEC / 4) + e / 4];
                        a0 = fmaf(qv.x, kf[e], a0);
                        a1 = fmaf(qv.y, kf[e + 1], a1);
                        a2 = fmaf(qv.z, kf[e + 2], a2);
                        a3 = fmaf(qv.w, kf[e + 3], a3);
                    }
                }
                sc = scale * ((a0 + a1) + (a2 + a3));
            }
            // online softmax over the warp's keys (the tile has >= 1 key, so m_new is finite)
            const float m_new = fmaxf(m_run[u], db_warp_max(sc));
            const float pr = lane < nw ? expf(sc - m_new) : 0.0f;
            const float c = expf(m_run[u] - m_new);  // 0 on the first tile
            l_run[u] = l_run[u] * c + db_warp_sum(pr);
            m_run[u] = m_new;
            // p.V: every key's p from its lane, the V rows read along the dims (conflict-free); keys past nw are
            // skipped (vs may hold anything there)
#pragma unroll
            for (int j = 0; j < AB_MAX_HD / 32; ++j) o[u][j] *= c;
#pragma unroll AB_UNROLL
            for (int t = 0; t < nw; ++t) {
                const float pt = db_shfl(pr, t);
                const K* vrow = vs + (AB_TK * sl + t) * ld + lane;
#pragma unroll
                for (int j = 0; j < AB_MAX_HD / 32; ++j)
                    if (lane + 32 * j < hd) o[u][j] = fmaf(pt, to_float(vrow[32 * j]), o[u][j]);
            }
        }
        __syncthreads();  // the tile is rewritten by the next one
        if (it + 1 < ntiles) copy_tile(t0 + TKE, min(TKE, end - t0 - TKE), -1);
    }
    if (ATTN_BATCHED_TRIGGER == 2) PDL_LAUNCH_DEPENDENTS();
    if constexpr (S > 1) {  // slices 1.. hand (m, l, o) to slice 0 through the tile buffer (the loop ended on a
                            // barrier: it is free)
        float* mo = kvs + (sl * G + hw) * (hd + 2);
        if (sl > 0 && hw < G) {
            for (int j = 0; j < AB_MAX_HD / 32; ++j)
                if (lane + 32 * j < hd) mo[lane + 32 * j] = o[0][j];
            if (lane == 0) {
                mo[hd] = m_run[0];
                mo[hd + 1] = l_run[0];
            }
        }
        __syncthreads();
        if (sl == 0) {
            float M = m_run[0];
            for (int t = 1; t < S; ++t) M = fmaxf(M, kvs[(t * G + hw) * (hd + 2) + hd]);
            if (M != NEG_INF) {  // else no slice saw a key (an empty split): (-inf, 0, 0) as it is
                const float c0 = expf(m_run[0] - M);
                l_run[0] *= c0;
#pragma unroll
                for (int j = 0; j < AB_MAX_HD / 32; ++j) o[0][j] *= c0;
                for (int t = 1; t < S; ++t) {
                    const float* mt = kvs + (t * G + hw) * (hd + 2);
                    const float c = expf(mt[hd] - M);
                    l_run[0] = fmaf(c, mt[hd + 1], l_run[0]);
#pragma unroll
                    for (int j = 0; j < AB_MAX_HD / 32; ++j)
                        if (lane + 32 * j < hd) o[0][j] = fmaf(c, mt[lane + 32 * j], o[0][j]);
                }
                m_run[0] = M;
            }
        }
        __syncthreads();  // the combine below reuses the buffer
    }
    const int splits = gridDim.y;
#pragma unroll
    for (int u = 0; u < NU; ++u) {
        const int h = hw + 8 * u;
        if (h >= G || sl != 0) continue;
        const size_t row = (size_t)b * heads + h0 + h;
        if (nlive == 1) {
            const float inv = 1.0f / l_run[u];
#pragma unroll
            for (int j = 0; j < AB_MAX_HD / 32; ++j)
                if (lane + 32 * j < hd) out[row * hd + lane + 32 * j] = from_float<O>(o[u][j] * inv);
            continue;
        }
#pragma unroll
        for (int j = 0; j < AB_MAX_HD / 32; ++j)
            if (lane + 32 * j < hd) part_o[(row * splits + s) * hd + lane + 32 * j] = o[u][j];
        if (lane == 0) {
            part_ml[(row * splits + s) * 2 + 0] = m_run[u];
            part_ml[(row * splits + s) * 2 + 1] = l_run[u];
        }
    }
    if (nlive == 1) return;
    ab_combine_last(part_o, part_ml, out, counters + (size_t)b * heads + h0, (size_t)b * heads + h0, G, splits,
                    nlive, hd, kvs, AB_KV_FLOATS, s_last);
}

// The block's shared memory and its warps a head (a template argument of the body). K: the caches' type.
template <typename K, typename O, bool QKV>
__device__ __forceinline__ void attn_batched(const float* q, K* k_cache, K* v_cache, const int* pos,
                                             const float* bias, const float* inv_freq, float* part_o, float* part_ml,
                                             int* counters, O* out, int heads, int kv_heads, int head_dim, int max_seq,
                                             int chunk, float scale) {
    __shared__ AbShared sh;
    if (ab_warps_a_head(heads / kv_heads, head_dim) == 2)
        attn_batched_impl<K, O, QKV, 2>(sh, q, k_cache, v_cache, pos, bias, inv_freq, part_o, part_ml, counters,
                                        out, heads, kv_heads, head_dim, max_seq, chunk, scale);
    else
        attn_batched_impl<K, O, QKV, 1>(sh, q, k_cache, v_cache, pos, bias, inv_freq, part_o, part_ml, counters,
                                        out, heads, kv_heads, head_dim, max_seq, chunk, scale);
}

// nothing is written to the caches without QKV
#define DEFINE_ATTN_DECODE_BATCHED(SUFFIX, K)                                                                 \
    extern "C" __global__ void __launch_bounds__(AB_THREADS, AB_MIN_BLOCKS)                                  \
        attn_decode_batched_##SUFFIX(const float* q, const K* k_cache, const K* v_cache, const int* pos,      \
                                     float* part_o, float* part_ml, int* counters, float* out, int heads,     \
                                     int kv_heads, int head_dim, int max_seq, int chunk, float scale) {       \
        attn_batched<K, float, false>(q, const_cast<K*>(k_cache), const_cast<K*>(v_cache), pos, nullptr,      \
                                      nullptr, part_o, part_ml, counters, out, heads, kv_heads, head_dim,     \
                                      max_seq, chunk, scale);                                                 \
    }
DEFINE_ATTN_DECODE_BATCHED(f32, float)
DEFINE_ATTN_DECODE_BATCHED(f16, db_f16)
DEFINE_ATTN_DECODE_BATCHED(bf16, db_bf16)

#define DEFINE_ATTN_QKV(SUFFIX, T)                                                                              \
    extern "C" __global__ void __launch_bounds__(AB_THREADS, AB_MIN_BLOCKS)                                    \
        attn_qkv_##SUFFIX(const float* qkv, T* k_cache, T* v_cache, const int* pos, const float* bias,         \
                          const float* inv_freq, float* part_o, float* part_ml, int* counters, T* out,         \
                          int heads, int kv_heads, int head_dim, int max_seq, int chunk, float scale) {        \
        attn_batched<T, T, true>(qkv, k_cache, v_cache, pos, bias, inv_freq, part_o, part_ml, counters, out,   \
                                 heads, kv_heads, head_dim, max_seq, chunk, scale);                            \
    }
DEFINE_ATTN_QKV(f32, float)
DEFINE_ATTN_QKV(f16, db_f16)
DEFINE_ATTN_QKV(bf16, db_bf16)

// ------------------------------------------------------------------------------------------------------------
// attn_qkv_mma_<wt>: attn_qkv (same params, grid and results up to rounding) with the scores and p.V on tensor
// cores, for the f16/bf16 models of the GEMM path. Why: attn_qkv gives each query head a warp and scores a key a
// lane, ~300 dependent instructions a warp a 32-key tile (shared-memory K rows and V columns, shuffles) with one
// tile in flight: at 16-64 rows and short contexts it is a latency chain, a quarter of the step (H100). Here a warp
// takes 16 keys of a pass of AM_PASS = 128 keys for the whole query group at once: S = q K^T as m16n8k16 MMAs
// (the group's <= 16 query heads are the M rows, keys the N columns, head dims K), the online softmax on the
// accumulator fragments (a row's four threads a quad), and O += P V with P's fragments reused as the A operand.
// A pass is one round of 16-byte copies of the K and V rows (wt caches, kept in wt in shared memory: the K rows
// are the B operand of the scores as ldmatrix loads them, V's pairs of keys are packed into the B operand of P V
// from 16-bit reads), so a context of <= 128 keys is one DRAM round trip and one split (no combine). The new
// key and value are patched into the pass rounded to wt, as the cache holds them. After the last pass the
// eight warps' (m, l, o) are merged in key order through shared memory (deterministic), then the output or the
// split's partials and attn_combine, as attn_qkv.
// Numerics: q (roped in f32 as attn_qkv does) and P are rounded to wt before the products (f16: 11-bit, bf16:
// 8-bit significand; K and V are wt already, as the cache holds them), sums in f32; the output is rounded once to
// wt. f32 models, head dims other than 32, 64 and 128, and HIP run attn_qkv's arithmetic out of the same dynamic
// shared memory.
// Shared memory (dynamic, am_smem_bytes): [K pass AM_PASS x (hd + 8) wt][V pass AM_PASS x (hd + 8) wt]
// [q 16 x (hd + 8) wt][new key, value 2 hd f32], and at least AM_SCALAR_FLOATS floats (AbShared, for the f32
// path and the other head dims): 4 * max(136 * (head_dim + 8) + 2 * head_dim, 11264) bytes at least (a smaller
// launch traps; 45,056 at head_dim 64, 75,008 at 128). Rows of hd + 8 halves: the ldmatrix rows of K (8 keys
// an odd number of 16-byte units apart) and the 16-bit V reads (4 key pairs, 8 banks apart) are conflict-free.
// ------------------------------------------------------------------------------------------------------------

#define AM_KEYS 16                       // keys a warp a pass
#define AM_PASS (AM_KEYS * AB_THREADS / 32)  // keys a pass (128)

#define AM_SCALAR_FLOATS 11264  // attn_qkv's shared memory (AbShared) in floats, rounded up
static_assert(sizeof(AbShared) <= 4 * AM_SCALAR_FLOATS, "AM_SCALAR_FLOATS (and the spec's shared) must hold AbShared");

// the tensor-core form's bytes (wt K and V passes, q, the f32 new key and value) in floats: 136 (hd + 8) + 2 hd
__host__ __device__ constexpr int am_tc_floats(int hd) { return (2 * AM_PASS + 16) * (hd + 8) / 2 + 2 * hd; }
__host__ __device__ constexpr unsigned int am_smem_bytes(int hd) {
    return 4u * (unsigned int)(am_tc_floats(hd) > AM_SCALAR_FLOATS ? am_tc_floats(hd) : AM_SCALAR_FLOATS);
}

#if DB_CUDA
template <typename O, int HD>
__device__ __forceinline__ void attn_mma_impl(unsigned char* smem, const float* qkv, O* k_cache, O* v_cache,
                                              const int* pos, const float* bias, const float* inv_freq,
                                              float* part_o, float* part_ml, int* counters, O* out, int heads,
                                              int kv_heads, int max_seq, int chunk, float scale, int& s_last) {
    using MT = MmaType<O>;
    constexpr int LD = HD + 8, QLD = HD + 8, NT = HD / 8, KS = HD / 16, HALF = HD / 2;  // LD: K and V rows
    constexpr int C8 = HD / 8;  // 16-byte chunks a row
    static_assert(sizeof(O) == 2 && 4 * (256 + 128 * HD) <= 2 * 2 * AM_PASS * LD, "the merge fits the passes");
    O* ks = reinterpret_cast<O*>(smem);
    O* vs = ks + AM_PASS * LD;
    O* qh = vs + AM_PASS * LD;
    float* kv_new = reinterpret_cast<float*>(qh + 16 * QLD);
    DB_TRACE_BLOCK();
    if (ATTN_BATCHED_TRIGGER == 0) PDL_LAUNCH_DEPENDENTS();
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int group = heads / kv_heads, subs = (group + AB_MAX_GROUP - 1) / AB_MAX_GROUP;
    const int bk = blockIdx.x / subs, sub = blockIdx.x - bk * subs;
    const int b = bk / kv_heads, kvh = bk - b * kv_heads, s = blockIdx.y;
    const int G = min(AB_MAX_GROUP, group - sub * AB_MAX_GROUP);  // query heads of this block (<= 16: M rows)
    const int h0 = kvh * group + sub * AB_MAX_GROUP;
    const size_t kv_base = ((size_t)b * kv_heads + kvh) * (size_t)max_seq * HD;
    const size_t qkv_width = (size_t)(heads + 2 * kv_heads) * HD;
    const float* qg = qkv + (size_t)b * qkv_width + (size_t)h0 * HD;
    // K and V rows [t0, t0 + AM_PASS) (rows past nt zero-filled): 16-byte copies, no commit
    auto copy_pass = [&](int t0, int nt) {
#pragma unroll 1  // unrolled, the head_dim 128 form spills at 128 registers
        for (int c = tid; c < AM_PASS * C8; c += AB_THREADS) {
            const int r = c / C8, ch = c - r * C8;
            const bool ok = r < nt;
            const size_t off = kv_base + (size_t)(t0 + (ok ? r : 0)) * HD + ch * 8;
            db_cp_async16(ks + r * LD + ch * 8, k_cache + off, ok);
            db_cp_async16(vs + r * LD + ch * 8, v_cache + off, ok);
        }
    };
    // The rope's operands: this thread's q pairs u (item tid + 256 u: head h, pair i = tid % HALF, one frequency
    // for all) and, for threads < HALF / < HD, the new key's pair i and value element tid, all loaded together
    // right after the wait (one round trip: the branches on pos below would serialise loads under them).
    static_assert(AB_THREADS % HALF == 0 && (16 * HALF) % AB_THREADS == 0, "a thread's q pairs share pair i");
    constexpr int QI = 16 * HALF / AB_THREADS;
    const float* krow = qkv + (size_t)b * qkv_width + (size_t)(heads + kvh) * HD;
    const float* kbias = bias + (size_t)(heads + kvh) * HD;
    const size_t vo = (size_t)kv_heads * HD;  // v rows follow the k rows
    auto q_live = [&](int u) { return tid + u * AB_THREADS < G * HALF; };
    // pos, a step input, is read before the wait (kernels/llama_fused.md, the PDL contract): a dead split leaves
    // without waiting, and every live split copies its first pass before it: the cache rows below this step's
    // position were written by earlier launches, and row p, which this kernel writes after its wait, is patched
    // into the pass from registers (the rows past p are masked).
    const AbSplit sp = ab_keys(pos[b], s, max_seq, chunk);
    if (!sp.live && s != 0) return;
    if (sp.end > sp.start) copy_pass(sp.start, min(AM_PASS, sp.end - sp.start));
    PDL_WAIT();
    db_cp_commit();
    const float freq = inv_freq[tid % HALF];
    float qx1[QI], qx2[QI], kx1 = 0.0f, kx2 = 0.0f, vx = 0.0f;  // biased
#pragma unroll
    for (int u = 0; u < QI; ++u) {
        const int idx = tid + u * AB_THREADS, h = idx / HALF, i = idx - h * HALF;
        qx1[u] = qx2[u] = 0.0f;
        if (q_live(u)) {
            qx1[u] = qg[(size_t)h * HD + i] + bias[(size_t)(h0 + h) * HD + i];
            qx2[u] = qg[(size_t)h * HD + i + HALF] + bias[(size_t)(h0 + h) * HD + i + HALF];
        }
    }
    if (tid < HALF) {
        kx1 = krow[tid] + kbias[tid];
        kx2 = krow[tid + HALF] + kbias[tid + HALF];
    }
    if (tid < HD) vx = krow[vo + tid] + kbias[vo + tid];
    if (!sp.live) {  // split 0 of a padding row (nothing was copied)
        ab_not_live(sp, s, out, (size_t)b * heads + h0, G, HD);
        return;
    }
    const int p = sp.p, nlive = sp.nlive, start = sp.start, end = sp.end;
    const int npasses = end > start ? (end - start + AM_PASS - 1) / AM_PASS : 0;
    const bool append = p < max_seq && start <= p && p < end;
    // q of the block's heads, roped, as wt rows of the A operand (rows G..15 zero)
#pragma unroll
    for (int u = 0; u < QI; ++u) {
        const int idx = tid + u * AB_THREADS, h = idx / HALF, i = idx - h * HALF;
        float y1 = 0.0f, y2 = 0.0f;
        if (q_live(u)) ab_rope(qx1[u], qx2[u], freq, p, y1, y2);
        qh[h * QLD + i] = from_float<O>(y1);
        qh[h * QLD + i + HALF] = from_float<O>(y2);
    }
    if (append) {
        if (tid < HALF) ab_rope(kx1, kx2, freq, p, kv_new[tid], kv_new[tid + HALF]);
        if (tid < HD) kv_new[HD + tid] = vx;
        __syncthreads();
        if (sub == 0)  // into the caches now (rounded to wt): no block reads slot p this step (this one patches
            for (int e = tid; e < HD; e += AB_THREADS) {  // its pass)
                kv_store(k_cache + kv_base + (size_t)p * HD + e, kv_new[e]);
                kv_store(v_cache + kv_base + (size_t)p * HD + e, kv_new[HD + e]);
            }
    }
    DB_TRACE_MARK(1);  // q and the new key ready (blocktrace)

    // fragments: thread (r0 = lane / 4, cq = 2 * (lane % 4)) holds rows r0 and r0 + 8, columns cq, cq + 1
    const int r0 = lane >> 2, cq = (lane & 3) * 2, kw = warp * AM_KEYS;
    float o[NT][4];
#pragma unroll
    for (int t = 0; t < NT; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.0f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;
    for (int it = 0; it < npasses; ++it) {
        const int t0 = start + it * AM_PASS, nt = min(AM_PASS, end - t0);
        db_cp_commit();
        if (ATTN_BATCHED_TRIGGER == 1 && it == 0) PDL_LAUNCH_DEPENDENTS();
        db_cp_wait<0>();
        __syncthreads();
        if (append && p - t0 >= 0 && p - t0 < nt) {  // the pass holds key p: the new key and value, rounded to
            for (int e = tid; e < HD; e += AB_THREADS) {    // wt as the cache holds them (from_float = kv_store)
                ks[(p - t0) * LD + e] = from_float<O>(kv_new[e]);
                vs[(p - t0) * LD + e] = from_float<O>(kv_new[HD + e]);
            }
            __syncthreads();
        }
        const int nk = min(AM_KEYS, nt - kw);  // this warp's keys of the pass (<= 0: none; warp-uniform)
        if (nk > 0) {  // the pass's rows past nt are zero (the copies zero-fill them): P and V there are 0
            // S[16 heads][16 keys]: two n8 tiles of keys, HD / 16 k-steps of dims
            float sc[2][4];
#pragma unroll
            for (int j = 0; j < 2; ++j) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KS; ++kk) {
                unsigned int a[4], bk[4];
                mm_ldmatrix_x4(a, qh + (lane & 15) * QLD + kk * 16 + (lane >> 4) * 8);
                // B: matrix m = lane / 8 is keys kw + 8 (m / 2) .. + 7 (n8 tile j = m / 2) x dims kk * 16 +
                // 8 (m % 2) .. + 7 (b0, b1): a thread gets key kw + 8 j + r0, dims cq, cq + 1 (+ 8)
                mm_ldmatrix_x4(bk, ks + (kw + (lane & 7) + ((lane >> 4) << 3)) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
                for (int j = 0; j < 2; ++j) MT::mma(sc[j], a, bk[2 * j], bk[2 * j + 1]);
            }
            // online softmax over the warp's keys, rows r0 (elements 0, 1) and r0 + 8 (2, 3)
            float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float v = 8 * j + cq + (e & 1) < nk ? sc[j][e] * scale : NEG_INF;
                    sc[j][e] = v;
                    if (e < 2)
                        mx0 = fmaxf(mx0, v);
                    else
                        mx1 = fmaxf(mx1, v);
                }
            mx0 = fmaxf(mx0, db_shfl_xor(mx0, 1));
            mx0 = fmaxf(mx0, db_shfl_xor(mx0, 2));
            mx1 = fmaxf(mx1, db_shfl_xor(mx1, 1));
            mx1 = fmaxf(mx1, db_shfl_xor(mx1, 2));
            const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);  // finite: key kw is live
            const float c0 = expf(m0 - mn0), c1 = expf(m1 - mn1);    // 0 on the warp's first keys
            m0 = mn0;
            m1 = mn1;
            float pr[2][4];
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                pr[j][0] = expf(sc[j][0] - mn0);
                pr[j][1] = expf(sc[j][1] - mn0);
                pr[j][2] = expf(sc[j][2] - mn1);
                pr[j][3] = expf(sc[j][3] - mn1);
            }
            l0 = l0 * c0 + ((pr[0][0] + pr[0][1]) + (pr[1][0] + pr[1][1]));
            l1 = l1 * c1 + ((pr[0][2] + pr[0][3]) + (pr[1][2] + pr[1][3]));
            const unsigned int pa[4] = {MT::pack(pr[0][0], pr[0][1]), MT::pack(pr[0][2], pr[0][3]),
                                        MT::pack(pr[1][0], pr[1][1]), MT::pack(pr[1][2], pr[1][3])};
            // O[16 heads][HD] += P V: B = V rows kw + cq, +1 (b0) and +8, +9 (b1), column 8 t + r0 (wt bits,
            // the lower key in the low half)
            const unsigned short* vr = reinterpret_cast<const unsigned short*>(vs) + (kw + cq) * LD + r0;
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                o[t][0] *= c0;
                o[t][1] *= c0;
                o[t][2] *= c1;
                o[t][3] *= c1;
                const unsigned int b0 = (unsigned int)vr[8 * t] | (unsigned int)vr[LD + 8 * t] << 16;
                const unsigned int b1 = (unsigned int)vr[8 * LD + 8 * t] | (unsigned int)vr[9 * LD + 8 * t] << 16;
                MT::mma(o[t], pa, b0, b1);
            }
        }
        __syncthreads();  // the pass buffers are rewritten by the next pass (or the merge below)
        if (it + 1 < npasses) copy_pass(t0 + AM_PASS, min(AM_PASS, end - t0 - AM_PASS));
    }
    DB_TRACE_MARK(2);  // the passes done (blocktrace)
    if (ATTN_BATCHED_TRIGGER == 2) PDL_LAUNCH_DEPENDENTS();
    l0 += db_shfl_xor(l0, 1);
    l0 += db_shfl_xor(l0, 2);
    l1 += db_shfl_xor(l1, 1);
    l1 += db_shfl_xor(l1, 2);
    // the warps' (m, l, o) meet in key order: [m 8 x 16][l 8 x 16][o 8 x 16 x HD] over the K and V pass buffers
    float* mw = reinterpret_cast<float*>(smem);
    float* lw = mw + 128;
    float* ow = mw + 256;
    if ((lane & 3) == 0) {
        mw[warp * 16 + r0] = m0;
        mw[warp * 16 + r0 + 8] = m1;
        lw[warp * 16 + r0] = l0;
        lw[warp * 16 + r0 + 8] = l1;
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        *reinterpret_cast<float2*>(ow + (warp * 16 + r0) * HD + 8 * t + cq) = make_float2(o[t][0], o[t][1]);
        *reinterpret_cast<float2*>(ow + (warp * 16 + r0 + 8) * HD + 8 * t + cq) = make_float2(o[t][2], o[t][3]);
    }
    __syncthreads();
    const int splits = gridDim.y;
    for (int e = tid; e < G * HD; e += AB_THREADS) {
        const int h = e / HD, d = e - h * HD;
        float M = NEG_INF;
#pragma unroll
        for (int w = 0; w < AB_THREADS / 32; ++w) M = fmaxf(M, mw[w * 16 + h]);
        float num = 0.0f, den = 0.0f;
        if (M != NEG_INF)  // else an empty split: (-inf, 0, 0)
#pragma unroll
            for (int w = 0; w < AB_THREADS / 32; ++w) {
                const float mwh = mw[w * 16 + h];
                if (mwh == NEG_INF) continue;  // a warp with no keys
                const float c = expf(mwh - M);
                num = fmaf(c, ow[(w * 16 + h) * HD + d], num);
                den = fmaf(c, lw[w * 16 + h], den);
            }
        const size_t row = (size_t)b * heads + h0 + h;
        if (nlive == 1) {
            out[row * HD + d] = from_float<O>(num / den);
        } else {
            part_o[(row * splits + s) * HD + d] = num;
            if (d == 0) {
                part_ml[(row * splits + s) * 2 + 0] = M;
                part_ml[(row * splits + s) * 2 + 1] = den;
            }
        }
    }
    if (nlive == 1) return;
    // the combine's buffer: all of the dynamic shared memory (q and the new key are no longer read)
    ab_combine_last(part_o, part_ml, out, counters + (size_t)b * heads + h0, (size_t)b * heads + h0, G, splits,
                    nlive, HD, mw, (int)(am_smem_bytes(HD) / 4), s_last);
}
#endif

template <typename O>
__device__ __forceinline__ void attn_qkv_mma(const float* qkv, O* k_cache, O* v_cache, const int* pos,
                                             const float* bias, const float* inv_freq, float* part_o, float* part_ml,
                                             int* counters, O* out, int heads, int kv_heads, int head_dim,
                                             int max_seq, int chunk, float scale) {
    extern __shared__ __align__(16) unsigned char am_smem[];
    __shared__ int s_last;
#if DB_CUDA
    if (db_dynamic_smem() < am_smem_bytes(head_dim)) __trap();  // the spec's `shared` is too small
#endif
#if DB_CUDA && MM_HAS_MMA
    if constexpr (sizeof(O) == 2) {
        if (head_dim == 64)
            return attn_mma_impl<O, 64>(am_smem, qkv, k_cache, v_cache, pos, bias, inv_freq, part_o, part_ml,
                                        counters, out, heads, kv_heads, max_seq, chunk, scale, s_last);
        if (head_dim == 128)
            return attn_mma_impl<O, 128>(am_smem, qkv, k_cache, v_cache, pos, bias, inv_freq, part_o, part_ml,
                                         counters, out, heads, kv_heads, max_seq, chunk, scale, s_last);
        if (head_dim == 32)
            return attn_mma_impl<O, 32>(am_smem, qkv, k_cache, v_cache, pos, bias, inv_freq, part_o, part_ml,
                                        counters, out, heads, kv_heads, max_seq, chunk, scale, s_last);
    }
#endif
    AbShared& sh = *reinterpret_cast<AbShared*>(am_smem);
    if (ab_warps_a_head(heads / kv_heads, head_dim) == 2)
        attn_batched_impl<O, O, true, 2>(sh, qkv, k_cache, v_cache, pos, bias, inv_freq, part_o, part_ml, counters,
                                         out, heads, kv_heads, head_dim, max_seq, chunk, scale);
    else
        attn_batched_impl<O, O, true, 1>(sh, qkv, k_cache, v_cache, pos, bias, inv_freq, part_o, part_ml, counters,
                                         out, heads, kv_heads, head_dim, max_seq, chunk, scale);
}

#define DEFINE_ATTN_QKV_MMA(SUFFIX, T)                                                                             \
    extern "C" __global__ void __launch_bounds__(AB_THREADS, 2)                                                   \
        attn_qkv_mma_##SUFFIX(const float* qkv, T* k_cache, T* v_cache, const int* pos, const float* bias,         \
                              const float* inv_freq, float* part_o, float* part_ml, int* counters, T* out,         \
                              int heads, int kv_heads, int head_dim, int max_seq, int chunk, float scale) {        \
        attn_qkv_mma<T>(qkv, k_cache, v_cache, pos, bias, inv_freq, part_o, part_ml, counters, out, heads,        \
                        kv_heads, head_dim, max_seq, chunk, scale);                                                \
    }
DEFINE_ATTN_QKV_MMA(f32, float)
DEFINE_ATTN_QKV_MMA(f16, db_f16)
DEFINE_ATTN_QKV_MMA(bf16, db_bf16)
