// dagbuild: fused Llama decode-step kernels for programmatic dependent launch (issue 8).
//
// One translation unit, compiled as one module by NVRTC (cupy.RawModule(code=..., options=("--std=c++17",))).
// Every entry point is extern "C" __global__ so its name is its PTX .entry. Weight-reading kernels come as
// name_f32 / name_f16 / name_bf16 (weights float / db_f16 / db_bf16, made by macros), as do the kernels that
// touch the KV cache, which holds the weight type (llama_common.cuh, kv_store / kv_unpack4: rounded once when
// appended, as HF's cache); activations and every accumulation are float32. kernels/llama_fused.md has the
// launch table; the unfused kernels stay in kernels/llama.cu.
//
// A decode layer is 5 nodes: qkv_rope (RMSNorm + packed QKV GEMV + RoPE + KV append), attn_decode (split
// attention with an in-kernel combine), gemv_res (O projection + residual), gate_up_silu (RMSNorm + packed
// gate/up GEMV + SiLU*up), gemv_res (down projection + residual).
//
// Programmatic dependent launch (PDL). Every kernel executes griddepcontrol.launch_dependents first (so the
// next kernel of the graph may be scheduled as soon as every block of this one is resident) and
// griddepcontrol.wait before it reads anything another node writes and before its first global write.
// Before the wait a kernel reads only weights (never written by the graph): the GEMVs issue their first
// weight loads into registers before the wait, so their weight traffic overlaps the previous kernel's tail.
// Without a programmatic edge the wait returns at once, so every kernel is correct with plain edges too. The
// launch trigger is not a memory fence; the wait carries a "memory" clobber so the compiler keeps loads of
// produced data after it. Produced data (activations, positions, the KV cache) is read with plain or L2
// loads, never through the read-only (ld.global.nc) path: it is written while this grid may already run.

#include "port.cuh"
#include "llama_common.cuh"  // WeightPack, rope_sincos, silu_f, argmax_merge

#define NEG_INF DB_NEG_INF
// griddepcontrol.launch_dependents / .wait on CUDA sm_90+, no-ops elsewhere (HIP has no programmatic launch)
#define PDL_LAUNCH_DEPENDENTS() DB_GRID_TRIGGER()
#define PDL_WAIT()         \
    do {                   \
        DB_GRID_WAIT();    \
        DB_TRACE_WAITED(); \
    } while (0)

// ------------------------------------------------------------------------------------------------------------
// Small helpers: to_float, db_shfl_xor, db_warp_sum/max, db_block_sum/max in kernels/port.cuh; WeightPack,
// rope_sincos, silu_f, argmax_merge in kernels/llama_common.cuh (shared with kernels/llama.cu)
// ------------------------------------------------------------------------------------------------------------

// ------------------------------------------------------------------------------------------------------------
// The GEMV engine: a warp streams a list of weight-row PAIRS (row0, row1) through a shared-memory ring.
//
// * Work: warp gw = blockIdx.x * nwarps + warp owns pairs gw, gw + W, gw + 2W, ... (W = all warps of the grid),
//   so any grid is correct; the spec sizes it. A pair's k is cut into ITEMS of FW_U 16-byte packs per lane per
//   row (FW_U * warpSize packs: 2 KB of f16 per row per item); items run in order over all the warp's pairs,
//   so the next pair's weights are in flight while this one is reduced and written.
// * Weights: item i is copied global -> shared with cp.async into slot i % FW_STAGES of the warp's ring, each
//   lane into its own 16-byte cells, so a lane reads back only what it copied: no barrier for the ring. The
//   first FW_STAGES items are issued BEFORE griddepcontrol.wait (weights only: 8 KB per warp, a whole
//   2048-wide f16 row pair), so they stream while the previous kernel finishes; each consumed slot is refilled
//   at once with item i + FW_STAGES. The RMSNorm weight (NORM) is copied into shared memory before the wait too.
// * After the wait, ONE round trip for the produced data: the block stages the x rows of its batch chunk in
//   shared memory (all threads, 16-byte loads), while each warp loads its first pair's epilogue input (the
//   residual, the position) into registers; then one barrier. Every later read of x and of the norm weight is
//   a shared-memory read, so the dependent chain after the wait is: x, FMAs, shuffles, epilogue store.
// * Math: fp32 FMAs of both rows against x (scaled by the norm weight when NORM: y = rsqrt(mean(x^2) + eps) *
//   sum_i w[i] * g[i] * x[i]; each warp sums x^2 itself), for up to NB batch rows at once (NB = 1, 2 or 4,
//   dispatched at run time; larger batches stream the pairs again per 4-row chunk, from L2). Shuffle
//   reductions (every lane gets the sums); lane bb runs the epilogue for batch row b0 + bb. Deterministic.
// * Shared memory (dynamic): [ring FW_RING(threads)][norm weight k * sizeof(T) (NORM)][x NB * k floats]. A
//   launch with less skips what does not fit, in that order from the back: x and the norm weight are then read
//   from global memory (through L1), and without room for the ring the weights too (correct, slower).
// Requirements: k % 8 == 0; weights, norm and x 16-byte aligned; blockDim.x a multiple of warpSize, <= 256;
// batch * k < 2^33.
// ------------------------------------------------------------------------------------------------------------

#define FW_BLOCK 256
#ifndef FW_MIN_BLOCKS
#define FW_MIN_BLOCKS 2  // __launch_bounds__ minimum blocks per SM: caps registers at 65536 / (256 * this)
#endif
#define FW_U 4
// ring slots a warp (items in flight). The spec builds gemv_res (O and down) with 3: the down projection's 5632-wide
// rows are 6 items a pair, so a third slot issues half of a warp's pair before the wait instead of a third (H100,
// TinyLlama batch 1, ms a step at contexts 128 / 512 / 2048: 1.113 / 1.207 / 1.229 -> 1.100 / 1.203 / 1.197;
// down 11.65 -> 10.25 us a layer, gate/up +0.6; 4 slots were no better). The others keep 2.
#ifndef FW_STAGES
#define FW_STAGES 2
#endif
#define FW_MAX_NB 4
// 1: only the 1-row chunk's code (the fused spec's batch-1 forms, gemv_one_row): a smaller kernel that runs batch 1
// faster (H100, one run: 8.4 % off a step at context 128, 4.5 % at 2048; Nsight Compute shows no instruction-fetch
// stalls either way, so why is not known).
#ifndef FW_ONE_ROW
#define FW_ONE_ROW 0
#endif
// x staging of the GEMVs without a norm (o_proj, down): float4 loads in flight per thread. At 2, a 256-thread
// block stages 2048 floats (k = 2048, batch 1) in one round trip but the down projection's 5632 in three (H200
// blocktrace: x staged 2.5 µs after the wait, against ~1 µs for k = 2048). 6 makes it one and, by ptxas, still
// fits gemv_res in 124 registers without spills (the norm GEMVs would spill, so they keep 2), but gained nothing
// (H100, batch 1, contexts 128 and 2048: within 0.6 % of 2), so the default stays 2.
#ifndef FW_X_INFLIGHT
#define FW_X_INFLIGHT 2
#endif
// ring bytes of a block of `threads` threads (64 KB at 256 with 2 slots, 96 KB with 3)
#define FW_RING(threads) (FW_STAGES * FW_U * 2 * (threads) * 16)

// acc0/acc1[bb] += dot(row pack p, x pack p of batch row bb) (x scaled by the norm weight g when NORM); ss[bb]
// += x^2 when NORM. x (rows xrow[bb] floats apart... as offsets in float4) and g are generic pointers: shared
// memory when staged, global memory (produced data: plain loads, never .nc) when not.
template <typename T, int NB, bool NORM>
__device__ __forceinline__ void fw_fma(const uint4& wa, const uint4& wb, const uint4* g4, const float4* x4,
                                       const int (&xoff)[NB], int p, float (&acc0)[NB], float (&acc1)[NB],
                                       float (&ss)[NB]) {
    constexpr int VEC = WeightPack<T>::VEC;
    float f0[VEC], f1[VEC], g[VEC];
    WeightPack<T>::unpack(wa, f0);
    WeightPack<T>::unpack(wb, f1);
    if constexpr (NORM) WeightPack<T>::unpack(g4[p], g);
#pragma unroll
    for (int bb = 0; bb < NB; ++bb) {
        float xf[VEC];
#pragma unroll
        for (int c = 0; c < VEC / 4; ++c) {
            const float4 t = x4[xoff[bb] + p * (VEC / 4) + c];
            xf[4 * c + 0] = t.x;
            xf[4 * c + 1] = t.y;
            xf[4 * c + 2] = t.z;
            xf[4 * c + 3] = t.w;
        }
        if constexpr (NORM) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                ss[bb] = fmaf(xf[e], xf[e], ss[bb]);
                xf[e] *= g[e];
            }
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            acc0[bb] = fmaf(f0[e], xf[e], acc0[bb]);
            acc1[bb] = fmaf(f1[e], xf[e], acc1[bb]);
        }
    }
}

// One batch chunk (rows b0 .. b0 + NB - 1; rows >= batch are computed on a clamped copy and not written) of
// the warp's pairs. Job: npairs; rows(g, &r0, &r1): the pair's weight rows; Pre, pre(g, b): the epilogue's
// input for batch row b (loaded early); epi(g, b, y0, y1, pre): write batch row b's outputs. Every thread of
// the block calls it (it has barriers); `first`: the kernel's first chunk (the PDL wait is in it).
template <typename T, int NB, bool NORM, typename Job>
__device__ __forceinline__ void fw_chunk(const Job& job, const T* w, const T* nw, const float* x, int k, int batch,
                                         int b0, bool first, float eps, unsigned char* smem, unsigned int dyn) {
    constexpr int VEC = WeightPack<T>::VEC;
    constexpr int S = FW_STAGES;
    const int ws = warpSize, lane = threadIdx.x % ws, warp = threadIdx.x / ws;
    const int nthreads = blockDim.x, nwarps = nthreads / ws;
    const int gw = blockIdx.x * nwarps + warp, W = gridDim.x * nwarps;
    const int P = k / VEC;                            // packs per row
    const int C = (P + FW_U * ws - 1) / (FW_U * ws);  // items per pair
    const int mine = gw < job.npairs ? (job.npairs - 1 - gw) / W + 1 : 0;
    const int total = mine * C;
    const int slot = FW_U * 2 * ws;  // uint4 cells per ring slot
    const unsigned int ring_bytes = FW_RING(nthreads);
    const unsigned int g_bytes = NORM ? (unsigned int)k * (unsigned int)sizeof(T) : 0u;
    const unsigned int x_bytes = (unsigned int)(NB * k) * 4u;
    const bool staged = dyn >= ring_bytes;
    const bool g_staged = NORM && dyn >= ring_bytes + g_bytes;
    const bool x_staged = dyn >= ring_bytes + g_bytes + x_bytes;
    uint4* ring = reinterpret_cast<uint4*>(smem) + warp * S * slot;
    uint4* gs = reinterpret_cast<uint4*>(smem + ring_bytes);
    float4* xs = reinterpret_cast<float4*>(smem + ring_bytes + g_bytes);

    auto item_rows = [&](int i, const uint4*& w0, const uint4*& w1, int& g, int& c) {
        const int t = i / C;
        c = i - t * C;
        g = gw + t * W;
        int r0, r1;
        job.rows(g, r0, r1);
        w0 = reinterpret_cast<const uint4*>(w + (size_t)r0 * (size_t)k);
        w1 = reinterpret_cast<const uint4*>(w + (size_t)r1 * (size_t)k);
    };
    auto issue = [&](int i) {  // item i -> slot i % S; one commit group per call (empty past the end)
        if (staged && i < total) {
            const uint4 *w0, *w1;
            int g, c;
            item_rows(i, w0, w1, g, c);
            uint4* dst = ring + (i % S) * slot;
#pragma unroll
            for (int u = 0; u < FW_U; ++u) {
                const int p = c * FW_U * ws + u * ws + lane;
                const bool in = p < P;
                db_cp_async16_once(dst + (2 * u) * ws + lane, in ? w0 + p : w0, in);
                db_cp_async16_once(dst + (2 * u + 1) * ws + lane, in ? w1 + p : w1, in);
            }
        }
        db_cp_commit();
    };

    // before the wait: the norm weight (one group, first chunk only), then the ring's first S items
    if (first && g_staged) {
        const uint4* nw4 = reinterpret_cast<const uint4*>(nw);
        for (int e = threadIdx.x; e < (int)(g_bytes / 16); e += nthreads) db_cp_async16(gs + e, nw4 + e, true);
    }
    db_cp_commit();
#pragma unroll
    for (int i = 0; i < S; ++i) issue(i);
    if (first) PDL_WAIT();

    // one round trip for produced data: this warp's first epilogue input, and the block's x rows
    typename Job::Pre pre{};
    if (mine > 0 && lane < NB && b0 + lane < batch) pre = job.pre(gw, b0 + lane);
    const float4* x4 = reinterpret_cast<const float4*>(x);
    const int k4 = k / 4;
    int xoff[NB];
    if (x_staged) {
        __syncthreads();  // the previous chunk's readers of xs are done
        // XI loads in flight per thread: each pass is one dependent L2 round trip
        constexpr int XI = NORM ? 2 : FW_X_INFLIGHT;
        for (int e0 = threadIdx.x; e0 < NB * k4; e0 += XI * nthreads) {
            float4 t[XI];
#pragma unroll
            for (int j = 0; j < XI; ++j) {
                const int e = e0 + j * nthreads;
                if (e < NB * k4) {
                    const int r = e / k4;
                    t[j] = db_ldcg(x4 + (size_t)min(b0 + r, batch - 1) * k4 + (e - r * k4));
                }
            }
#pragma unroll
            for (int j = 0; j < XI; ++j) {
                if (e0 + j * nthreads < NB * k4) xs[e0 + j * nthreads] = t[j];
            }
        }
#pragma unroll
        for (int bb = 0; bb < NB; ++bb) xoff[bb] = bb * k4;
    } else {
#pragma unroll
        for (int bb = 0; bb < NB; ++bb) xoff[bb] = min(b0 + bb, batch - 1) * k4;
    }
    db_cp_wait<S>();  // the norm weight's group has landed (the ring's S groups may still be in flight)
    __syncthreads();  // ... and every thread's share of it, and of x, is visible to the block
    if (first) DB_TRACE_MARK(1);
    const float4* xsrc = x_staged ? xs : x4;
    const uint4* gsrc = g_staged ? gs : reinterpret_cast<const uint4*>(nw);

    float acc0[NB], acc1[NB], ss[NB];
#pragma unroll
    for (int bb = 0; bb < NB; ++bb) acc0[bb] = acc1[bb] = ss[bb] = 0.0f;
    for (int i = 0; i < total; ++i) {
        const uint4 *w0, *w1;
        int g, c;
        item_rows(i, w0, w1, g, c);
        if (c == 0 && i > 0 && lane < NB && b0 + lane < batch) pre = job.pre(g, b0 + lane);
        if (staged) {
            db_cp_wait<S - 1>();  // item i's group has landed (groups complete in order)
            const uint4* src = ring + (i % S) * slot;
#pragma unroll
            for (int u = 0; u < FW_U; ++u) {  // one pack pair at a time: shared loads are short, registers few
                const int p = c * FW_U * ws + u * ws + lane;
                if (p < P) fw_fma<T, NB, NORM>(src[(2 * u) * ws + lane], src[(2 * u + 1) * ws + lane], gsrc, xsrc,
                                               xoff, p, acc0, acc1, ss);
            }
        } else {
#pragma unroll
            for (int u = 0; u < FW_U; ++u) {
                const int p = c * FW_U * ws + u * ws + lane;
                if (p < P) fw_fma<T, NB, NORM>(__ldg(w0 + p), __ldg(w1 + p), gsrc, xsrc, xoff, p, acc0, acc1, ss);
            }
        }
        issue(i + S);  // refill the slot just consumed (its values were used above: no write-after-read race)
        if (c == C - 1) {  // the pair is complete: reduce, epilogue, reset
            DB_TRACE_MARK(2);
            float y0 = 0.0f, y1 = 0.0f, s2 = 0.0f;
#pragma unroll
            for (int bb = 0; bb < NB; ++bb) {
                const float t0 = db_warp_sum(acc0[bb]), t1 = db_warp_sum(acc1[bb]);
                const float t2 = NORM ? db_warp_sum(ss[bb]) : 0.0f;
                if (lane == bb) {
                    y0 = t0;
                    y1 = t1;
                    s2 = t2;
                }
                acc0[bb] = acc1[bb] = ss[bb] = 0.0f;
            }
            if (lane < NB && b0 + lane < batch) {
                if constexpr (NORM) {
                    const float r = rsqrtf(s2 / (float)k + eps);
                    y0 *= r;
                    y1 *= r;
                }
                job.epi(g, b0 + lane, y0, y1, pre);
            }
        }
    }
    db_cp_wait<0>();  // no copy outlives the kernel (the tail groups are empty)
}

// Every batch row, in chunks of up to FW_MAX_NB rows, through the block's dynamic shared memory.
template <typename T, bool NORM, typename Job>
__device__ __forceinline__ void fw_gemv(const Job& job, const T* w, const T* nw, const float* x, int k, int batch,
                                        float eps) {
    extern __shared__ uint4 fw_smem[];
    unsigned char* smem = reinterpret_cast<unsigned char*>(fw_smem);
    const unsigned int dyn = db_dynamic_smem();
#if FW_ONE_ROW  // the batch-1 form: only the 1-row chunk's code, a row at a time (any batch is right, above 1 slow)
    for (int b0 = 0; b0 < batch; ++b0) fw_chunk<T, 1, NORM>(job, w, nw, x, k, batch, b0, b0 == 0, eps, smem, dyn);
    return;
#endif
    for (int b0 = 0; b0 < batch; b0 += FW_MAX_NB) {
        const int nb = min(FW_MAX_NB, batch - b0);  // uniform across the grid
        const bool first = b0 == 0;
        if (nb > 2)
            fw_chunk<T, 4, NORM>(job, w, nw, x, k, batch, b0, first, eps, smem, dyn);
        else if (nb == 2)
            fw_chunk<T, 2, NORM>(job, w, nw, x, k, batch, b0, first, eps, smem, dyn);
        else
            fw_chunk<T, 1, NORM>(job, w, nw, x, k, batch, b0, first, eps, smem, dyn);
    }
}

// ------------------------------------------------------------------------------------------------------------
// qkv_rope_<wt>: RMSNorm + packed QKV projection + RoPE + KV append.     grid [any], block [256],
//                                                                          dynamic shared memory (the engine)
// w = wqkv [(heads + 2*kv_heads) * head_dim, hidden]: the rows of wq, then wk, then wv (HF order: head h's
// head_dim rows contiguous). A warp owns the RoPE pair of rows (h*head_dim + i, h*head_dim + i + head_dim/2),
// so rotate_half's partners are in one warp's registers: q rows are rotated into q [batch, heads*head_dim];
// k rows are rotated and written to k_cache [cache_batch, kv_heads, max_seq, head_dim] (wt, rounded once) at
// slot pos[b]; v rows are stored to v_cache there. RoPE as rope_append in llama.cu (f32, no FMA contraction):
// the epilogue adds bias[row] (the Q/K/V bias, Qwen2; zeros otherwise; [(heads + 2*kv_heads) * head_dim], wqkv's row
// order) and rotates by p * inv_freq[i] (inv_freq [head_dim/2]: HF's, after any rope scaling, computed on the
// host). Both are loaded with the position right after the wait (the epilogue's Pre). Rows whose pos is outside [0, max_seq) (padding:
// pos < 0) write no KV (q is still written).
// Requirements: head_dim even; hidden % 8 == 0; as the GEMV engine.
// ------------------------------------------------------------------------------------------------------------

// Pair g = (head h, i < head_dim/2): rows h*head_dim + i and h*head_dim + i + head_dim/2 of wqkv. K: the KV
// cache's element type (the model's weight type; kv_store rounds once).
template <typename K>
struct QkvJob {
    float* q;
    K* k_cache;
    K* v_cache;
    const int* pos;
    const float* bias;
    const float* inv_freq;
    int heads, kv_heads, head_dim, max_seq, npairs;
    struct Pre {  // loaded with x, right after the wait: the row's position, the pair's biases and frequency
        int p;
        float ba, bc, f;
    };
    __device__ __forceinline__ Pre pre(int g, int b) const {
        const int half = head_dim / 2, h = g / half, i = g - h * half, r = h * head_dim + i;
        return Pre{pos[b], bias[r], bias[r + half], inv_freq[i]};
    }
    __device__ __forceinline__ void rows(int g, int& r0, int& r1) const {
        const int half = head_dim / 2, h = g / half;
        r0 = h * head_dim + (g - h * half);
        r1 = r0 + half;
    }
    __device__ __forceinline__ void epi(int g, int b, float a, float c, const Pre& e) const {
        const int half = head_dim / 2, h = g / half, i = g - h * half;
        const int p = e.p;
        a += e.ba;
        c += e.bc;
        const bool cache_ok = p >= 0 && p < max_seq;
        if (h >= heads + kv_heads) {
            if (cache_ok) {
                const int hv = h - heads - kv_heads;
                K* dst = v_cache + (((size_t)b * kv_heads + hv) * (size_t)max_seq + p) * (size_t)head_dim;
                kv_store(dst + i, a);
                kv_store(dst + i + half, c);
            }
            return;
        }
        float s, co;
        rope_sincos((float)p * e.f, &s, &co);
        const float o1 = __fadd_rn(__fmul_rn(a, co), __fmul_rn(-c, s));
        const float o2 = __fadd_rn(__fmul_rn(c, co), __fmul_rn(a, s));
        if (h < heads) {
            float* dst = q + ((size_t)b * heads + h) * (size_t)head_dim;
            dst[i] = o1;
            dst[i + half] = o2;
        } else if (cache_ok) {
            K* dst = k_cache + (((size_t)b * kv_heads + (h - heads)) * (size_t)max_seq + p) * (size_t)head_dim;
            kv_store(dst + i, o1);
            kv_store(dst + i + half, o2);
        }
    }
};

template <typename T>
__device__ __forceinline__ void qkv_rope_impl(const T* w, const T* norm, const float* x, float* q, T* k_cache,
                                              T* v_cache, const int* pos, const float* bias,
                                              const float* inv_freq, int hidden, int heads, int kv_heads,
                                              int head_dim, int max_seq, int batch, float eps) {
    DB_TRACE_BLOCK();
    PDL_LAUNCH_DEPENDENTS();
    const QkvJob<T> job{q, k_cache, v_cache, pos, bias, inv_freq, heads, kv_heads, head_dim, max_seq,
                        (heads + 2 * kv_heads) * (head_dim / 2)};
    fw_gemv<T, true>(job, w, norm, x, hidden, batch, eps);
}

#define DEFINE_QKV(SUFFIX, T)                                                                               \
    extern "C" __global__ void __launch_bounds__(FW_BLOCK, FW_MIN_BLOCKS)                                   \
        qkv_rope_##SUFFIX(const T* w, const T* norm, const float* x, float* q, T* k_cache,                  \
                          T* v_cache, const int* pos, const float* bias, const float* inv_freq,         \
                          int hidden, int heads, int kv_heads, int head_dim, int max_seq, int batch,        \
                          float eps) {                                                                      \
        qkv_rope_impl<T>(w, norm, x, q, k_cache, v_cache, pos, bias, inv_freq, hidden, heads, kv_heads,     \
                         head_dim, max_seq, batch, eps);                                                    \
    }
DEFINE_QKV(f32, float)
DEFINE_QKV(f16, db_f16)
DEFINE_QKV(bf16, db_bf16)

// ------------------------------------------------------------------------------------------------------------
// gate_up_silu_<wt>: RMSNorm + packed gate/up projection + SiLU(gate) * up.   grid [any], block [256]
// w = w_gate_up [2*ffn, hidden] with rows interleaved: row 2j = w_gate[j], row 2j+1 = w_up[j], so one warp
// owns both rows of output j: act[b, j] = silu(gate) * up, act [batch, ffn].
// Requirements: hidden % 8 == 0; as the GEMV engine.
// ------------------------------------------------------------------------------------------------------------

// Pair j: rows 2j (gate) and 2j + 1 (up) of w_gate_up.
struct SwigluJob {
    float* act;
    int ffn, npairs;
    using Pre = int;  // nothing
    __device__ __forceinline__ int pre(int, int) const { return 0; }
    __device__ __forceinline__ void rows(int j, int& r0, int& r1) const {
        r0 = 2 * j;
        r1 = 2 * j + 1;
    }
    __device__ __forceinline__ void epi(int j, int b, float g, float u, int) const {
        act[(size_t)b * ffn + j] = silu_f(g) * u;
    }
};

template <typename T>
__device__ __forceinline__ void gate_up_impl(const T* w, const T* norm, const float* x, float* act, int ffn,
                                             int hidden, int batch, float eps) {
    DB_TRACE_BLOCK();
    PDL_LAUNCH_DEPENDENTS();
    fw_gemv<T, true>(SwigluJob{act, ffn, ffn}, w, norm, x, hidden, batch, eps);
}

#define DEFINE_GATE_UP(SUFFIX, T)                                                                           \
    extern "C" __global__ void __launch_bounds__(FW_BLOCK, FW_MIN_BLOCKS)                                   \
        gate_up_silu_##SUFFIX(const T* w, const T* norm, const float* x, float* act, int ffn, int hidden,   \
                              int batch, float eps) {                                                       \
        gate_up_impl<T>(w, norm, x, act, ffn, hidden, batch, eps);                                          \
    }
DEFINE_GATE_UP(f32, float)
DEFINE_GATE_UP(f16, db_f16)
DEFINE_GATE_UP(bf16, db_bf16)

// ------------------------------------------------------------------------------------------------------------
// gemv_res_<wt>: y[b, j] += sum_i w[j, i] * x[b, i]      (O and down projections: the residual add into x)
// gemv_norm_<wt>: y[b, j] = rsqrt(mean(x[b]^2) + eps) * sum_i w[j, i] * norm[i] * x[b, i]   (final norm +
//                 LM head)                                                        grid [any], block [256]
// A warp owns rows (2g, 2g+1) (the second clamped to n-1 for loads, never written past n).
// Requirements: k % 8 == 0; as the GEMV engine. y must not alias x.
// ------------------------------------------------------------------------------------------------------------

// Pair g: rows 2g and 2g + 1 (the second clamped to n - 1 for loads, never written past n).
template <bool ADD>
struct RowsJob {
    float* y;
    int n, npairs;
    using Pre = float2;  // the residual y[b, 2g], y[b, 2g + 1] (ADD)
    __device__ __forceinline__ float2 pre(int g, int b) const {
        if (!ADD) return make_float2(0.0f, 0.0f);
        const float* src = y + (size_t)b * n + 2 * g;
        return make_float2(src[0], 2 * g + 1 < n ? src[1] : 0.0f);
    }
    __device__ __forceinline__ void rows(int g, int& r0, int& r1) const {
        r0 = 2 * g;
        r1 = min(2 * g + 1, n - 1);
    }
    __device__ __forceinline__ void epi(int g, int b, float a, float c, const float2& r) const {
        float* dst = y + (size_t)b * n + 2 * g;
        dst[0] = ADD ? r.x + a : a;
        if (2 * g + 1 < n) dst[1] = ADD ? r.y + c : c;
    }
};

template <typename T, bool NORM, bool ADD>
__device__ __forceinline__ void gemv_rows_impl(const T* w, const T* norm, const float* x, float* y, int n, int k,
                                               int batch, float eps) {
    DB_TRACE_BLOCK();
    PDL_LAUNCH_DEPENDENTS();
    fw_gemv<T, NORM>(RowsJob<ADD>{y, n, (n + 1) / 2}, w, norm, x, k, batch, eps);
}

#define DEFINE_GEMV_ROWS(SUFFIX, T)                                                                         \
    extern "C" __global__ void __launch_bounds__(FW_BLOCK, FW_MIN_BLOCKS)                                   \
        gemv_res_##SUFFIX(const T* w, const float* x, float* y, int n, int k, int batch) {                  \
        gemv_rows_impl<T, false, true>(w, nullptr, x, y, n, k, batch, 0.0f);                                \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(FW_BLOCK, FW_MIN_BLOCKS)                                   \
        gemv_norm_##SUFFIX(const T* w, const T* norm, const float* x, float* y, int n, int k, int batch,    \
                           float eps) {                                                                     \
        gemv_rows_impl<T, true, false>(w, norm, x, y, n, k, batch, eps);                                    \
    }
DEFINE_GEMV_ROWS(f32, float)
DEFINE_GEMV_ROWS(f16, db_f16)
DEFINE_GEMV_ROWS(bf16, db_bf16)

// ------------------------------------------------------------------------------------------------------------
// attn_combine: the last live split of `nh` consecutive (row, head) rows row0 .. row0 + nh - 1 merges their
// nlive partials: out[row, e] = sum_t exp(m_t - M) o_t[e] / sum_t exp(m_t - M) l_t, M = max_t m_t (t in split
// order, so the result is deterministic). part_o [rows, splits, hd], part_ml [rows, splits, 2].
// The partials go through `sbuf` (shared memory, 16-byte aligned, sbuf_floats floats): every (m, l) and the
// first chunk of o partials in ONE round trip, further chunks one round trip each (their sums kept in sbuf), so
// a long context's combine is a few round trips, not one per split. Without room for one split's o partials
// each thread reads them from L2 as it goes. Every thread of the block calls it (it has barriers). `out` is f32,
// or the weight type where the GEMM path's O projection reads it (rounded once, from the f32 result).
// ------------------------------------------------------------------------------------------------------------

template <typename O>
__device__ __forceinline__ void attn_combine(const float* part_o, const float* part_ml, O* out, size_t row0,
                                             int nh, int splits, int nlive, int hd, float* sbuf, int sbuf_floats) {
    const int tid = threadIdx.x, nthreads = blockDim.x, hd4 = hd / 4;
    const int n_ml = nh * nlive * 2, n_out = nh * hd;
    const int lead = (n_ml + n_out + 3) & ~3;  // [(m, l) of every split][running sums][a chunk of o partials]
    const int per_chunk = sbuf_floats > lead ? (sbuf_floats - lead) / n_out : 0;  // splits per chunk
    if (per_chunk == 0) {
        for (int e = tid; e < n_out; e += nthreads) {
            const int h = e / hd, d = e - h * hd;
            const float* ml = part_ml + (row0 + h) * splits * 2;
            const float* po = part_o + (row0 + h) * splits * hd + d;
            float M = NEG_INF;
            for (int t = 0; t < nlive; ++t) M = fmaxf(M, db_ldcg(ml + 2 * t));
            float num = 0.0f, den = 0.0f;
            for (int t = 0; t < nlive; ++t) {
                const float wgt = expf(db_ldcg(ml + 2 * t) - M);
                num = fmaf(wgt, db_ldcg(po + (size_t)t * hd), num);
                den = fmaf(wgt, db_ldcg(ml + 2 * t + 1), den);
            }
            out[(row0 + h) * hd + d] = from_float<O>(num / den);
        }
        return;
    }
    float* sml = sbuf;
    float* snum = sbuf + n_ml;
    float* so = sbuf + lead;
    for (int t0 = 0; t0 < nlive; t0 += per_chunk) {  // uniform across the block
        const int tn = min(per_chunk, nlive - t0);
        if (t0 == 0) {
#pragma unroll 4
            for (int e = tid; e < n_ml; e += nthreads) {
                const int ht = e >> 1, h = ht / nlive, t = ht - h * nlive;
                sml[e] = db_ldcg(part_ml + ((row0 + h) * splits + t) * 2 + (e & 1));
            }
        }
#pragma unroll 4
        for (int e = tid; e < nh * tn * hd4; e += nthreads) {
            const int ht = e / hd4, c = e - ht * hd4, h = ht / tn, t = ht - h * tn;
            reinterpret_cast<float4*>(so)[e] =
                db_ldcg(reinterpret_cast<const float4*>(part_o + ((row0 + h) * splits + t0 + t) * hd) + c);
        }
        __syncthreads();
        const bool last = t0 + tn >= nlive;
        for (int e = tid; e < n_out; e += nthreads) {  // element e is this thread's in every chunk
            const int h = e / hd, d = e - h * hd;
            const float* m = sml + h * nlive * 2;
            float M = NEG_INF;
            for (int t = 0; t < nlive; ++t) M = fmaxf(M, m[2 * t]);
            float num = t0 == 0 ? 0.0f : snum[e];
            for (int t = 0; t < tn; ++t) num = fmaf(expf(m[2 * (t0 + t)] - M), so[(h * tn + t) * hd + d], num);
            if (!last) {
                snum[e] = num;
                continue;
            }
            float den = 0.0f;
            for (int t = 0; t < nlive; ++t) den = fmaf(expf(m[2 * t] - M), m[2 * t + 1], den);
            out[(row0 + h) * hd + d] = from_float<O>(num / den);
        }
        if (!last) __syncthreads();  // the next chunk rewrites so
    }
}

// ------------------------------------------------------------------------------------------------------------
// attn_decode_<wt>: split-sequence decode attention with the combine in the same kernel; the caches hold wt
// (a lane loads 4 elements of a key row at once: 16 bytes of f32, 8 of f16/bf16).
//                                           grid [batch*heads, G], block [256]
// Block (b*heads + h, s) covers keys [s*len, min((s+1)*len, L)), L = min(pos[b] + 1, max_seq), of kv head
// h / (heads / kv_heads), where len = chunk * ceil_div(L, chunk * G): whole chunks a split, as few as keep the
// splits within the grid's G (the split length follows the context, which the graph cannot know: at most G
// splits of one chunk each while they fit, then longer splits). Only the live splits, nlive = ceil_div(L, len),
// do work; the others return after reading pos, before the wait. A context of at most ATTN_SHORT_TILES tiles
// runs as one split (nlive = 1, keys [0, L)): more splits would only add the combine's round trips (H100,
// TinyLlama batch 1 at 129 keys: one split of two tiles beats two of one). A decode step's attention is a
// latency chain (a few KB per head at short contexts), so it is built to take few dependent round trips after
// the wait:
// * pos is a step input (written before the step's first kernel starts), so every live split issues its first
//   tile's K and V before the wait (ATTN_UNROLL keys per lane group: 128 keys per tile at head_dim 64 and 256
//   threads) except row p, which qkv_rope writes: that row and q are loaded after it. At positions below one
//   tile (and chunk), attention is one round trip after the wait (kernels/llama_fused.md: the PDL contract's
//   exceptions).
// * Per tile: scores by lane groups of LPK lanes per key (shuffle sums: every lane of the group holds the same
//   bits), written once to shared memory; one barrier; every warp then reduces the tile's max and sum of exp
//   itself (lanes over keys, shuffles: the same bits in every warp) and each thread accumulates p * V for its
//   own keys (online softmax across tiles). The key groups' p.V partials are summed through shared memory.
// * nlive == 1: the block writes out = o / l itself (no scratch, no counter).
// * nlive > 1: each live block writes its (o, m, l) to part_o/part_ml, fences, and bumps counters[b*heads+h];
//   the block that brings it to nlive combines the partials (attn_combine: one round trip per chunk of them)
//   into out and resets the counter to 0 for the next launch. counters must be zero before the first launch (a
//   fresh buffer is).
// * L <= 0 (padding row, pos < 0): split 0 writes zeros.
// out [batch, heads*head_dim]; part_o [batch, heads, splits, head_dim]; part_ml [batch, heads, splits, 2].
// Requirements: head_dim % 4 == 0, 4 <= head_dim <= 4 * warpSize; kv_heads divides heads; chunk >= 1;
// blockDim.x a multiple of warpSize, <= 256; q, part_o and out 16-byte aligned, caches 4 * sizeof(wt)-aligned.
// ------------------------------------------------------------------------------------------------------------

#define ATTN_BLOCK 256
#ifndef ATTN_UNROLL
#define ATTN_UNROLL 8  // keys per lane group whose K and V loads are in flight together
#endif
#ifndef ATTN_SHORT_TILES
#define ATTN_SHORT_TILES 2  // a context of at most this many tiles runs as one split: no combine (0: by len alone)
#endif
// When the attention kernels let the next kernel launch (whose blocks then prefetch its weights, sharing DRAM
// with attention's K/V loads): 0 at the start, 1 once the first tile's K/V loads are issued, 2 after the tiles.
// attn_decode: 0. Its live splits issue their first tile's K/V before the wait, so those requests are ahead of
// o_proj's 8 MB weight prefetch either way, and o_proj's blocks get their slots sooner (H100, TinyLlama batch 1,
// two rounds, ms a step, 1 -> 0: context 128 1.096 / 1.098 -> 1.076 / 1.078, 2048 1.315 / 1.319 -> 1.237 / 1.245;
// with K/V loaded after the wait, 1 was the faster: H200, -1.6 %). attn_decode_batched and attn_qkv
// (kernels/llama_batched.cu): ATTN_BATCHED_TRIGGER, 0 by default; the fused spec builds attn_qkv with 1 (H100, 16
// rows before our own O GEMM: -2.5 % a step; 2 was +1 %).
#ifndef ATTN_TRIGGER
#define ATTN_TRIGGER 0
#endif
#ifndef ATTN_BATCHED_TRIGGER
#define ATTN_BATCHED_TRIGGER 0
#endif
// Where attn_decode stamps its block-trace mark 2 (tools/blocktrace.py; no code without -DDB_BLOCKTRACE): 0 once
// the key groups' partials are summed, 1 after the first tile's softmax max/sum, 2 after its p.V, 3 after the
// barrier that follows.
#ifndef ATTN_MARK2
#define ATTN_MARK2 0
#endif
// A timing ablation of attn_decode (tools/device_check.sh stage attnskip; 0 by default, and then no code), with wrong
// results: ATTN_SKIP 1, a live split writes q as its output right after the wait; 2, it runs its first tile only.
#ifndef ATTN_SKIP
#define ATTN_SKIP 0
#endif

// The K/V of a lane group's keys of the tile at t0 (nt keys; key u of the group is t0 + u * n_sg + sg, its lane
// sc4 the key's float4 sc4) into kv/vv, zero past nt: one round trip. `first`: kv/vv hold the tile already (loaded
// before the wait); `second`: kv2/vv2 do.
template <typename R>
__device__ __forceinline__ void attn_tile_kv(const R* kc4, const R* vc4, int d4, int t0, int nt, int sg, int sc4,
                                             int n_sg, bool first, bool second, R (&kv)[ATTN_UNROLL],
                                             R (&vv)[ATTN_UNROLL], const R (&kv2)[ATTN_UNROLL],
                                             const R (&vv2)[ATTN_UNROLL]) {
    const R zr{};
#pragma unroll
    for (int u = 0; u < ATTN_UNROLL; ++u) {
        const int kk = u * n_sg + sg;
        const bool in = kk < nt && sc4 < d4;
        if (first) {
            if (!in) kv[u] = vv[u] = zr;
        } else if (second) {
            kv[u] = in ? kv2[u] : zr;
            vv[u] = in ? vv2[u] : zr;
        } else {
            kv[u] = vv[u] = zr;
            if (in) {
                kv[u] = db_ldcg(kc4 + (size_t)(t0 + kk) * d4 + sc4);
                vv[u] = db_ldcg(vc4 + (size_t)(t0 + kk) * d4 + sc4);
            }
        }
    }
}

// The unscaled scores q.k of a lane group's keys, summed over the group's lpk lanes by shuffles (every lane of
// the group holds the same bits).
template <typename K, typename R>
__device__ __forceinline__ void attn_tile_scores(const float4& qv, const R (&kv)[ATTN_UNROLL], int lpk,
                                                 float (&dot)[ATTN_UNROLL]) {
#pragma unroll
    for (int u = 0; u < ATTN_UNROLL; ++u) {
        const float4 kf = kv_unpack4<K>(kv[u]);
        dot[u] = qv.x * kf.x + qv.y * kf.y + qv.z * kf.z + qv.w * kf.w;
    }
    for (int o = lpk >> 1; o > 0; o >>= 1) {
#pragma unroll
        for (int u = 0; u < ATTN_UNROLL; ++u) dot[u] += db_shfl_xor(dot[u], o);
    }
}

// Online softmax of one query over keys [start, end) of one KV head (kc, vc: its rows, 4 * d4 elements), by every
// thread of the block (it has barriers). Lane group sg = tid / lpk (lpk: a power of two >= d4) holds keys
// u * n_sg + sg of each tile of ATTN_UNROLL * n_sg keys in kv/vv, its lane sc4 the head's float4 sc4 (qv: that
// float4 of the query). On entry kv/vv hold the first tile's keys when `preloaded` (those past its end are zeroed
// here). Per tile: scores by lane groups (shuffle sums: every lane of the group holds the same bits), written once
// to sp; one barrier; every warp reduces the tile's max and sum of exp itself (the same bits in every warp) and
// each thread accumulates p * V for its own keys (online softmax across tiles); the key groups' p.V partials are
// summed through sacc. Returns o = sum_j exp(s_j - m) v_j (unnormalised; in threads tid < d4) and m, l (every
// thread). sp: ATTN_UNROLL * blockDim floats, sacc: blockDim float4s (shared). `trigger`: launch dependents once
// the first tile's loads are issued; `mark`: block-trace mark 1 once the first tile is scored.
template <typename K, typename R = typename Kv4<K>::raw>
__device__ __forceinline__ float4 attn_span(const float4& qv, const K* kc, const K* vc, int d4, int start, int end,
                                            float scale, bool preloaded, bool trigger, bool mark,
                                            R (&kv)[ATTN_UNROLL], R (&vv)[ATTN_UNROLL], float* sp, float4* sacc,
                                            float& m, float& l) {
    const int tid = threadIdx.x, nthreads = blockDim.x, ws = warpSize, lane = tid % ws;
    int lpk = 1;
    while (lpk < d4) lpk <<= 1;
    const int sg = tid / lpk, sc4 = tid % lpk, n_sg = nthreads / lpk;
    const int tile = ATTN_UNROLL * n_sg;
    const float4 zero4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    const R* kc4 = reinterpret_cast<const R*>(kc);  // a key row is d4 packs of 4 elements
    const R* vc4 = reinterpret_cast<const R*>(vc);
    m = NEG_INF;
    l = 0.0f;
    float4 acc = zero4;
    for (int t0 = start; t0 < end; t0 += tile) {
        const int nt = min(tile, end - t0);
        attn_tile_kv<R>(kc4, vc4, d4, t0, nt, sg, sc4, n_sg, preloaded && t0 == start, false, kv, vv, kv, vv);
        if (trigger && t0 == start) PDL_LAUNCH_DEPENDENTS();
        float dot[ATTN_UNROLL];
        attn_tile_scores<K, R>(qv, kv, lpk, dot);
#pragma unroll
        for (int u = 0; u < ATTN_UNROLL; ++u) {
            const int kk = u * n_sg + sg;
            if (kk < nt && sc4 == 0) sp[kk] = scale * dot[u];
        }
        __syncthreads();
        if (mark) DB_TRACE_MARK(1);
        // the tile's max and sum of exp, reduced by every warp on its own (the same bits in every warp)
        float mt = NEG_INF;
        for (int j = lane; j < nt; j += ws) mt = fmaxf(mt, sp[j]);
        const float m_new = fmaxf(m, db_warp_max(mt));  // finite: the tile has >= 1 key
        float psum = 0.0f;
        for (int j = lane; j < nt; j += ws) psum += expf(sp[j] - m_new);
        psum = db_warp_sum(psum);
        const float corr = expf(m - m_new);  // 0 on the first tile (m = -inf)
        l = l * corr + psum;
        m = m_new;
        if (ATTN_MARK2 == 1 && mark && t0 == start) DB_TRACE_MARK(2);
        acc.x *= corr;
        acc.y *= corr;
        acc.z *= corr;
        acc.w *= corr;
#pragma unroll
        for (int u = 0; u < ATTN_UNROLL; ++u) {
            const int kk = u * n_sg + sg;
            if (kk < nt) {
                const float pk = expf(sp[kk] - m_new);
                const float4 vf = kv_unpack4<K>(vv[u]);
                acc.x = fmaf(pk, vf.x, acc.x);
                acc.y = fmaf(pk, vf.y, acc.y);
                acc.z = fmaf(pk, vf.z, acc.z);
                acc.w = fmaf(pk, vf.w, acc.w);
            }
        }
        if (ATTN_MARK2 == 2 && mark && t0 == start) DB_TRACE_MARK(2);
        __syncthreads();  // sp is rewritten by the next tile
        if (ATTN_MARK2 == 3 && mark && t0 == start) DB_TRACE_MARK(2);
    }
    sacc[tid] = acc;
    __syncthreads();
    float4 o = zero4;
    if (tid < d4) {
        o = sacc[tid];
        for (int g = 1; g < n_sg; ++g) {
            const float4 t = sacc[g * lpk + tid];
            o.x += t.x;
            o.y += t.y;
            o.z += t.z;
            o.w += t.w;
        }
    }
    return o;
}

// ATTN_GROUPED 1: attn_span_grouped instead of attn_span in attn_decode. ATTN_PRELOAD2 1 (with ATTN_GROUPED): a
// live split also issues its second tile's K/V before the wait (into a second register set), so a split of two
// tiles takes no load round trip after the wait but row p's.
#ifndef ATTN_GROUPED
#define ATTN_GROUPED 0
#endif
#ifndef ATTN_PRELOAD2
#define ATTN_PRELOAD2 0
#endif
#if ATTN_GROUPED && ATTN_TRIGGER == 1
#error "ATTN_GROUPED launches dependents at the start (ATTN_TRIGGER 0) or after the tiles (2), not after the first tile's loads"
#endif
#if ATTN_PRELOAD2 && !ATTN_GROUPED
#error "ATTN_PRELOAD2 needs ATTN_GROUPED (attn_span takes one preloaded tile)"
#endif

// attn_span's result by a shorter chain: each lane group keeps its own online softmax (m, l and p.V over its own
// keys, in registers: the group's lanes hold the same scores), so a tile takes no barrier, no shared memory and no
// block-wide max or sum; the groups' (o, m, l) are merged once at the end (one barrier). On entry kv/vv hold the
// first tile (when `preloaded`) and kv2/vv2 the second (when `preloaded2`), keys past the span's end zeroed here.
// Returns o (unnormalised), m and l in threads tid < d4 (the others: unspecified). sacc: blockDim float4s, sml:
// 2 * (blockDim / lpk) floats (shared).
template <typename K, typename R = typename Kv4<K>::raw>
__device__ __forceinline__ float4 attn_span_grouped(const float4& qv, const K* kc, const K* vc, int d4, int start,
                                                    int end, float scale, bool preloaded, bool preloaded2,
                                                    R (&kv)[ATTN_UNROLL], R (&vv)[ATTN_UNROLL],
                                                    const R (&kv2)[ATTN_UNROLL], const R (&vv2)[ATTN_UNROLL],
                                                    float4* sacc, float* sml, float& m, float& l) {
    const int tid = threadIdx.x, nthreads = blockDim.x;
    int lpk = 1;
    while (lpk < d4) lpk <<= 1;
    const int sg = tid / lpk, sc4 = tid % lpk, n_sg = nthreads / lpk;
    const int tile = ATTN_UNROLL * n_sg;
    const float4 zero4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    const R* kc4 = reinterpret_cast<const R*>(kc);
    const R* vc4 = reinterpret_cast<const R*>(vc);
    float mg = NEG_INF, lg = 0.0f;  // this lane group's running max and sum of exp
    float4 acc = zero4;
    for (int t0 = start; t0 < end; t0 += tile) {
        const int nt = min(tile, end - t0);
        attn_tile_kv<R>(kc4, vc4, d4, t0, nt, sg, sc4, n_sg, preloaded && t0 == start,
                        preloaded2 && t0 == start + tile, kv, vv, kv2, vv2);
        float dot[ATTN_UNROLL];
        attn_tile_scores<K, R>(qv, kv, lpk, dot);
        float mt = NEG_INF;
#pragma unroll
        for (int u = 0; u < ATTN_UNROLL; ++u) {
            dot[u] *= scale;
            if (u * n_sg + sg < nt) mt = fmaxf(mt, dot[u]);
        }
        if (mt == NEG_INF) continue;  // none of this group's keys in the tile (the same in the group's lanes)
        const float m_new = fmaxf(mg, mt);
        const float corr = expf(mg - m_new);  // 0 while the group has seen no key (mg = -inf, m_new finite)
        lg *= corr;
        acc.x *= corr;
        acc.y *= corr;
        acc.z *= corr;
        acc.w *= corr;
        mg = m_new;
#pragma unroll
        for (int u = 0; u < ATTN_UNROLL; ++u) {
            if (u * n_sg + sg < nt) {
                const float pk = expf(dot[u] - m_new);
                const float4 vf = kv_unpack4<K>(vv[u]);
                lg += pk;
                acc.x = fmaf(pk, vf.x, acc.x);
                acc.y = fmaf(pk, vf.y, acc.y);
                acc.z = fmaf(pk, vf.z, acc.z);
                acc.w = fmaf(pk, vf.w, acc.w);
            }
        }
    }
    sacc[tid] = acc;
    if (sc4 == 0) {
        sml[2 * sg] = mg;
        sml[2 * sg + 1] = lg;
    }
    __syncthreads();
    float4 o = zero4;
    m = NEG_INF;
    l = 0.0f;
    if (tid < d4) {
        for (int g = 0; g < n_sg; ++g) m = fmaxf(m, sml[2 * g]);  // finite: the span has >= 1 key
        for (int g = 0; g < n_sg; ++g) {
            const float w = expf(sml[2 * g] - m);  // 0 for a group that saw no key
            const float4 t = sacc[g * lpk + tid];
            l = fmaf(w, sml[2 * g + 1], l);
            o.x = fmaf(w, t.x, o.x);
            o.y = fmaf(w, t.y, o.y);
            o.z = fmaf(w, t.z, o.z);
            o.w = fmaf(w, t.w, o.w);
        }
    }
    return o;
}

template <typename K>
__device__ __forceinline__ void attn_decode_impl(const float* q, const K* k_cache, const K* v_cache, const int* pos,
                                                 float* part_o, float* part_ml, int* counters, float* out, int heads,
                                                 int kv_heads, int head_dim, int max_seq, int chunk, float scale) {
    using R = typename Kv4<K>::raw;
    __shared__ __align__(16) float sp[ATTN_UNROLL * ATTN_BLOCK];  // the tile's scaled scores; the combine's
    __shared__ float4 sacc[ATTN_BLOCK];                           // p.V partials of the key groups
    __shared__ int s_last;
    DB_TRACE_BLOCK();
    if (ATTN_TRIGGER == 0) PDL_LAUNCH_DEPENDENTS();
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const int bh = blockIdx.x, b = bh / heads, h = bh - b * heads;
    const int s = blockIdx.y;
    const int kvh = h / (heads / kv_heads);
    const int d4 = head_dim / 4;
    int lpk = 1;  // lanes per key: a power of two >= d4 (<= warpSize)
    while (lpk < d4) lpk <<= 1;
    const int sg = tid / lpk, sc4 = tid % lpk, n_sg = nthreads / lpk;
    const int tile = ATTN_UNROLL * n_sg;  // keys per tile
    const float4 zero4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    const R zr{};
    const size_t kv_base = ((size_t)b * kv_heads + kvh) * (size_t)max_seq * (size_t)head_dim;
    const K* kc = k_cache + kv_base;
    const K* vc = v_cache + kv_base;
    const R* kc4 = reinterpret_cast<const R*>(kc);  // a key row is d4 packs of 4 elements (Kv4<K>::raw)
    const R* vc4 = reinterpret_cast<const R*>(vc);
    float4* out4 = reinterpret_cast<float4*>(out + (size_t)bh * head_dim);
    R kv[ATTN_UNROLL], vv[ATTN_UNROLL];
    // pos is a step input (uploaded, or advanced by the loop's sampling node, before the step's first kernel
    // starts): read before the wait, a split past the live ones leaves at once, and a live split issues its first
    // tile's K and V before the wait: rows below p were written by earlier launches; row p (qkv_rope writes it)
    // and q are loaded after the wait.
    const int p = pos[b];
    const int L = min(p + 1, max_seq);
    const int G = gridDim.y;
    const int len = chunk * max(1, (L + chunk * G - 1) / (chunk * G));  // keys a split: whole chunks, <= G splits
    int nlive = L > 0 ? (L + len - 1) / len : 0;
    if (L <= ATTN_SHORT_TILES * tile) nlive = min(nlive, 1);  // a few tiles hold every key: one split
    if (s >= max(nlive, 1)) return;                            // a dead split: no wait
    const int start = s * len;
    const int end = nlive == 1 ? L : min(start + len, L);
    const int nt0 = min(tile, end - start);  // keys of the first tile (<= 0: a padding row)
#pragma unroll
    for (int u = 0; u < ATTN_UNROLL; ++u) {
        const int kk = u * n_sg + sg;
        kv[u] = vv[u] = zr;
        if (kk < nt0 && start + kk != p && sc4 < d4) {
            kv[u] = db_ldcg(kc4 + (size_t)(start + kk) * d4 + sc4);
            vv[u] = db_ldcg(vc4 + (size_t)(start + kk) * d4 + sc4);
        }
    }
    R kv2[ATTN_UNROLL], vv2[ATTN_UNROLL];  // the second tile (ATTN_PRELOAD2), row p excepted
    const int nt1 = ATTN_PRELOAD2 ? min(tile, end - start - tile) : 0;
#pragma unroll
    for (int u = 0; u < ATTN_UNROLL; ++u) {
        const int kk = u * n_sg + sg;
        kv2[u] = vv2[u] = zr;
        if (ATTN_PRELOAD2 && kk < nt1 && start + tile + kk != p && sc4 < d4) {
            kv2[u] = db_ldcg(kc4 + (size_t)(start + tile + kk) * d4 + sc4);
            vv2[u] = db_ldcg(vc4 + (size_t)(start + tile + kk) * d4 + sc4);
        }
    }
    PDL_WAIT();
    const float4 qv = (sc4 < d4) ? db_ldca(reinterpret_cast<const float4*>(q + (size_t)bh * head_dim) + sc4) : zero4;
#pragma unroll
    for (int u = 0; u < ATTN_UNROLL; ++u) {  // row p, if this tile (or the preloaded second) holds it
        const int kk = u * n_sg + sg;
        if (kk < nt0 && start + kk == p && sc4 < d4) {
            kv[u] = db_ldcg(kc4 + (size_t)p * d4 + sc4);
            vv[u] = db_ldcg(vc4 + (size_t)p * d4 + sc4);
        }
        if (ATTN_PRELOAD2 && kk < nt1 && start + tile + kk == p && sc4 < d4) {
            kv2[u] = db_ldcg(kc4 + (size_t)p * d4 + sc4);
            vv2[u] = db_ldcg(vc4 + (size_t)p * d4 + sc4);
        }
    }
    if (nlive == 0) {  // padding row: split 0 writes zeros (after the wait: the previous readers of out are done)
        if (tid < d4) out4[tid] = zero4;
        return;
    }

    if (ATTN_SKIP == 1) {
        if (tid < d4) out4[tid] = qv;
        return;
    }
    float m, l;
    const int span_end = ATTN_SKIP == 2 ? min(end, start + tile) : end;
    const float4 o = ATTN_GROUPED ? attn_span_grouped<K>(qv, kc, vc, d4, start, span_end, scale, true, ATTN_PRELOAD2,
                                                         kv, vv, kv2, vv2, sacc, sp, m, l)
                                  : attn_span<K>(qv, kc, vc, d4, start, span_end, scale, true, ATTN_TRIGGER == 1,
                                                 true, kv, vv, sp, sacc, m, l);
    if (ATTN_TRIGGER == 2) PDL_LAUNCH_DEPENDENTS();
    if (ATTN_MARK2 == 0) DB_TRACE_MARK(2);
    if (nlive == 1) {  // the only live split: normalise and write the output directly
        if (tid < d4) out4[tid] = make_float4(o.x / l, o.y / l, o.z / l, o.w / l);
        return;
    }
    const int splits = gridDim.y;
    const size_t row = (size_t)bh * splits + s;
    if (tid < d4) reinterpret_cast<float4*>(part_o + row * head_dim)[tid] = o;
    if (tid == 0) {
        part_ml[row * 2 + 0] = m;
        part_ml[row * 2 + 1] = l;
    }
    __threadfence();  // this block's partials are visible device-wide before the counter says so
    __syncthreads();
    if (tid == 0) s_last = atomicAdd(counters + bh, 1) == nlive - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();  // every other live block's partials are visible to this one
    attn_combine(part_o, part_ml, out, (size_t)bh, 1, splits, nlive, head_dim, sp, ATTN_UNROLL * ATTN_BLOCK);
    if (tid == 0) counters[bh] = 0;  // every live block has counted: ready for the next launch
}

#define DEFINE_ATTN_DECODE(SUFFIX, K)                                                                       \
    extern "C" __global__ void __launch_bounds__(ATTN_BLOCK)                                                \
        attn_decode_##SUFFIX(const float* q, const K* k_cache, const K* v_cache, const int* pos,            \
                             float* part_o, float* part_ml, int* counters, float* out, int heads,           \
                             int kv_heads, int head_dim, int max_seq, int chunk, float scale) {             \
        attn_decode_impl<K>(q, k_cache, v_cache, pos, part_o, part_ml, counters, out, heads, kv_heads,      \
                            head_dim, max_seq, chunk, scale);                                               \
    }
DEFINE_ATTN_DECODE(f32, float)
DEFINE_ATTN_DECODE(f16, db_f16)
DEFINE_ATTN_DECODE(bf16, db_bf16)

// ------------------------------------------------------------------------------------------------------------
// embed_pdl_<wt>: x[b, :] = float(table[tokens[b], :])        grid [batch], block [256]
// As embed_<wt> in llama.cu, with the PDL trigger and wait (tokens come from an upload node).
// ------------------------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void embed_impl(const T* __restrict__ table, const int* tokens, float* x, int hidden) {
    DB_TRACE_BLOCK();
    PDL_LAUNCH_DEPENDENTS();
    PDL_WAIT();
    const int b = blockIdx.x;
    const T* row = table + (size_t)tokens[b] * (size_t)hidden;
    float* dst = x + (size_t)b * (size_t)hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = to_float(db_ldg(row + i));
}

#define DEFINE_EMBED(SUFFIX, T)                                                                             \
    extern "C" __global__ void __launch_bounds__(1024)                                                      \
        embed_pdl_##SUFFIX(const T* table, const int* tokens, float* x, int hidden) {                       \
        embed_impl<T>(table, tokens, x, hidden);                                                            \
    }
DEFINE_EMBED(f32, float)
DEFINE_EMBED(f16, db_f16)
DEFINE_EMBED(bf16, db_bf16)

// ------------------------------------------------------------------------------------------------------------
// argmax_pdl: out[b] = lowest index of the max of logits[b, :vocab].     grid [batch], block [1024]
// As argmax in llama.cu, with the PDL trigger and wait. NaN is not handled.
// ------------------------------------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(1024) argmax_pdl(const float* logits, int* out, int vocab) {
    DB_TRACE_BLOCK();
    PDL_LAUNCH_DEPENDENTS();
    PDL_WAIT();
    argmax_row(logits, out, vocab);
}
