// dagbuild: fused Llama decode-step kernels for programmatic dependent launch (issue 8).
//
// One translation unit, compiled as one module by NVRTC (cupy.RawModule(code=..., options=("--std=c++17",))).
// Every entry point is extern "C" __global__ so its name is its PTX .entry. Weight-reading kernels come as
// name_f32 / name_f16 / name_bf16 (weights float / db_f16 / db_bf16, made by macros); activations, the
// KV cache and every accumulation are float32. kernels/llama_fused.md has the launch table; the unfused
// kernels stay in kernels/llama.cu.
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

#define NEG_INF DB_NEG_INF
// griddepcontrol.launch_dependents / .wait on CUDA sm_90+, no-ops elsewhere (HIP has no programmatic launch)
#define PDL_LAUNCH_DEPENDENTS() DB_GRID_TRIGGER()
#define PDL_WAIT() DB_GRID_WAIT()

// L2 prefetch of `bytes` (a multiple of 16) from a 16-byte aligned global address: one bulk instruction
// (sm_90). A hint, off unless compiled with -DFUSED_L2_PREFETCH: on the H200 it made the long-row GEMVs
// slower (down projection in a PDL chain: TinyLlama 10.4 -> 11.8 us, Llama-3.2-1B 16.3 -> 22.2 us).
__device__ __forceinline__ void l2_prefetch(const void* p, unsigned int bytes) {
#if DB_CUDA && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(FUSED_L2_PREFETCH)
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(__cvta_generic_to_global(p)), "r"(bytes));
#else
    (void)p;
    (void)bytes;
#endif
}

// ------------------------------------------------------------------------------------------------------------
// Small helpers (as in kernels/llama.cu)
// ------------------------------------------------------------------------------------------------------------

// to_float, db_shfl_xor, db_warp_sum/max, db_block_sum/max: kernels/port.cuh

// A 16-byte pack of weights, unpacked to VEC floats.
template <typename T>
struct WeightPack;

template <>
struct WeightPack<float> {
    static constexpr int VEC = 4;
    static __device__ __forceinline__ void unpack(const uint4& u, float* f) {
        f[0] = __uint_as_float(u.x);
        f[1] = __uint_as_float(u.y);
        f[2] = __uint_as_float(u.z);
        f[3] = __uint_as_float(u.w);
    }
};

template <>
struct WeightPack<db_f16> {
    static constexpr int VEC = 8;
    static __device__ __forceinline__ void unpack(const uint4& u, float* f) {
        const unsigned int v[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // little endian: element 2i is the low half
            f[2 * i] = db_f16_bits_to_float(v[i] & 0xffffu);
            f[2 * i + 1] = db_f16_bits_to_float(v[i] >> 16);
        }
    }
};

template <>
struct WeightPack<db_bf16> {
    static constexpr int VEC = 8;
    static __device__ __forceinline__ void unpack(const uint4& u, float* f) {
        const unsigned int v[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // bf16 -> f32 is exact: the bf16 bits are the high half of the f32
            f[2 * i] = __uint_as_float(v[i] << 16);
            f[2 * i + 1] = __uint_as_float(v[i] & 0xffff0000u);
        }
    }
};

// sin/cos of an f32 angle without local memory (see kernels/llama.cu: cosf/sinf's slow path has a stack
// array): reduce to [-pi, pi] in double, then the hardware approximation (abs error < 2^-21 there).
__device__ __forceinline__ void rope_sincos(float f, float* s, float* c) {
    const double d = (double)f;
    const double turns = rint(d * 0.15915494309189535);
    const float r = (float)fma(-turns, 6.283185307179586, d);
    __sincosf(r, s, c);
}

__device__ __forceinline__ float silu_f(float g) { return g / (1.0f + expf(-g)); }

// ------------------------------------------------------------------------------------------------------------
// The GEMV engine: one warp owns a PAIR of weight rows (row0, row1) and all of k.
//
// * Lanes stride over the rows' 16-byte packs (8 halves / 4 floats), so each warp-wide load reads 512
//   consecutive bytes; U packs x 2 rows = 2U independent 16-byte loads per lane are issued before any is used
//   (U = 8: 16 loads, a whole 2048-wide f16 row pair, for batch chunks of 1-2 rows; U = 4 for chunks of 4).
// * The first U packs of each row are loaded BEFORE griddepcontrol.wait (weights only); then the wait, then x.
//   (With -DFUSED_L2_PREFETCH, lanes 0/1 also issue one L2 bulk prefetch of the rest of a longer row: slower.)
// * The batch goes in register chunks of up to 4 rows of x (NB = 1, 2 or 4: dispatched at run time inside
//   the kernel; 3 rows use the 4-row chunk with a clamped duplicate). For batch <= 4 every weight is read from
//   DRAM once; larger batches re-read the warp's two rows per chunk, right away (from L1/L2).
// * RMSNorm folded in (NORM): y = rsqrt(mean(x^2) + eps) * sum_i w[i] * (g[i] * x[i]), g the norm weight.
//   Every warp reads all of x anyway, so it also sums x^2 itself: no block barrier, no second pass.
// * fp32 accumulation, reduced by warp shuffles (xor: every lane gets the sums); lane bb then runs the
//   epilogue for batch row b0 + bb. No shared memory, no atomics, deterministic.
// A block owns FW_ROWS = 16 rows = 8 pairs whatever the warp width (its warps stride over the pairs), so
// grids are ceil_div(rows, 16). Requirements: k % 8 == 0; weights, norm and x 16-byte aligned (every row
// then is); blockDim.x a multiple of warpSize, <= 256; batch * k < 2^33.
// ------------------------------------------------------------------------------------------------------------

#define FW_ROWS 16
#define FW_PAIRS (FW_ROWS / 2)
#define FW_BLOCK 256
#define FW_MIN_BLOCKS 2
#define FW_MAX_NB 4

// acc0/acc1[bb] += dot(row pack, x pack of batch row bb) (x scaled by the norm weight when NORM); ss[bb] +=
// x^2 when NORM.
template <typename T, int NB, bool NORM>
__device__ __forceinline__ void fw_fma(const uint4& wa, const uint4& wb, const uint4* __restrict__ nw4,
                                       const float4* x4, const int (&xoff)[NB], int p, float (&acc0)[NB],
                                       float (&acc1)[NB], float (&ss)[NB]) {
    constexpr int VEC = WeightPack<T>::VEC;
    float f0[VEC], f1[VEC], g[VEC];
    WeightPack<T>::unpack(wa, f0);
    WeightPack<T>::unpack(wb, f1);
    if constexpr (NORM) WeightPack<T>::unpack(__ldg(nw4 + p), g);
#pragma unroll
    for (int bb = 0; bb < NB; ++bb) {
        float xf[VEC];
#pragma unroll
        for (int c = 0; c < VEC / 4; ++c) {
            const float4 t = db_ldca(x4 + xoff[bb] + p * (VEC / 4) + c);
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

// The warp's dot products for batch rows b0..b0+NB-1 (rows >= batch computed on a clamped copy); `first`:
// this is the kernel's first chunk, so the PDL wait sits between the first weight loads and the first x
// load. Results (warp totals, in every lane): r0/r1[bb] for row0/row1, ss[bb] = sum x^2 (NORM).
template <typename T, int NB, int U, bool NORM>
__device__ __forceinline__ void fw_chunk(const uint4* __restrict__ w0, const uint4* __restrict__ w1,
                                         const uint4* __restrict__ nw4, const float* x, int k, int batch, int b0,
                                         bool first, float (&r0)[NB], float (&r1)[NB], float (&ss)[NB]) {
    constexpr int VEC = WeightPack<T>::VEC;
    const int P = k / VEC;  // packs per row
    const int lane = threadIdx.x % warpSize, ws = warpSize;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    int xoff[NB];
#pragma unroll
    for (int bb = 0; bb < NB; ++bb) xoff[bb] = min(b0 + bb, batch - 1) * (k / 4);
#pragma unroll
    for (int bb = 0; bb < NB; ++bb) r0[bb] = r1[bb] = ss[bb] = 0.0f;

    uint4 wa[U], wb[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int p = lane + u * ws;
        if (p < P) {
            wa[u] = __ldg(w0 + p);
            wb[u] = __ldg(w1 + p);
        } else {
            wa[u] = wb[u] = make_uint4(0u, 0u, 0u, 0u);
        }
    }
    if (first) {
        const int rest = P - U * ws;
        if (rest > 0 && lane < 2) l2_prefetch((lane == 0 ? w0 : w1) + U * ws, (unsigned int)rest * 16u);
        PDL_WAIT();
    }
    for (int base = 0;;) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int p = base + lane + u * ws;
            if (p < P) fw_fma<T, NB, NORM>(wa[u], wb[u], nw4, x4, xoff, p, r0, r1, ss);
        }
        base += U * ws;
        if (base >= P) break;  // uniform across the warp
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int p = base + lane + u * ws;
            if (p < P) {
                wa[u] = __ldg(w0 + p);
                wb[u] = __ldg(w1 + p);
            }
        }
    }
#pragma unroll
    for (int bb = 0; bb < NB; ++bb) {
        r0[bb] = db_warp_sum(r0[bb]);
        r1[bb] = db_warp_sum(r1[bb]);
        if constexpr (NORM) ss[bb] = db_warp_sum(ss[bb]);
    }
}

// One chunk, then the epilogue: lane bb (< NB) calls epi(b0 + bb, y0, y1) for its batch row, y = the two
// rows' outputs (times rsqrt(mean(x^2) + eps) when NORM).
template <typename T, int NB, int U, bool NORM, typename Epi>
__device__ __forceinline__ void fw_batch(const uint4* w0, const uint4* w1, const uint4* nw4, const float* x,
                                         int k, int batch, int b0, bool first, float eps, const Epi& epi) {
    float r0[NB], r1[NB], ss[NB];
    fw_chunk<T, NB, U, NORM>(w0, w1, nw4, x, k, batch, b0, first, r0, r1, ss);
    const int lane = threadIdx.x % warpSize;
    float y0 = r0[0], y1 = r1[0], s = ss[0];
#pragma unroll
    for (int bb = 1; bb < NB; ++bb) {
        if (lane == bb) {
            y0 = r0[bb];
            y1 = r1[bb];
            s = ss[bb];
        }
    }
    if (lane < NB && b0 + lane < batch) {
        if constexpr (NORM) {
            const float r = rsqrtf(s / (float)k + eps);
            y0 *= r;
            y1 *= r;
        }
        epi(b0 + lane, y0, y1);
    }
}

// The warp's row pair (row0, row1) over every batch row, in chunks of up to FW_MAX_NB.
template <typename T, bool NORM, typename Epi>
__device__ __forceinline__ void fw_rows(const T* w, int row0, int row1, const T* nw, const float* x, int k,
                                        int batch, float eps, const Epi& epi) {
    const uint4* w0 = reinterpret_cast<const uint4*>(w + (size_t)row0 * (size_t)k);
    const uint4* w1 = reinterpret_cast<const uint4*>(w + (size_t)row1 * (size_t)k);
    const uint4* nw4 = reinterpret_cast<const uint4*>(nw);
    for (int b0 = 0; b0 < batch; b0 += FW_MAX_NB) {
        const int nb = min(FW_MAX_NB, batch - b0);  // uniform across the block
        const bool first = b0 == 0;
        if (nb > 2)
            fw_batch<T, 4, 4, NORM>(w0, w1, nw4, x, k, batch, b0, first, eps, epi);
        else if (nb == 2)
            fw_batch<T, 2, 8, NORM>(w0, w1, nw4, x, k, batch, b0, first, eps, epi);
        else
            fw_batch<T, 1, 8, NORM>(w0, w1, nw4, x, k, batch, b0, first, eps, epi);
    }
}

// Calls body(g) for each of the block's row pairs g < npairs (the block owns pairs blockIdx.x * 8 .. + 7;
// its warps stride over them).
template <typename Body>
__device__ __forceinline__ void fw_for_pairs(int npairs, const Body& body) {
    const int warp = threadIdx.x / warpSize, nwarps = blockDim.x / warpSize;
    for (int pi = warp; pi < FW_PAIRS; pi += nwarps) {
        const int g = blockIdx.x * FW_PAIRS + pi;
        if (g >= npairs) return;  // uniform across the warp
        body(g);
    }
}

// ------------------------------------------------------------------------------------------------------------
// qkv_rope_<wt>: RMSNorm + packed QKV projection + RoPE + KV append.
//                                                       grid [ceil_div((heads + 2*kv_heads) * head_dim, 16)],
//                                                       block [256]
// w = wqkv [(heads + 2*kv_heads) * head_dim, hidden]: the rows of wq, then wk, then wv (HF order: head h's
// head_dim rows contiguous). A warp owns the RoPE pair of rows (h*head_dim + i, h*head_dim + i + head_dim/2),
// so rotate_half's partners are in one warp's registers: q rows are rotated into q [batch, heads*head_dim];
// k rows are rotated and written to k_cache [cache_batch, kv_heads, max_seq, head_dim] at slot pos[b]; v
// rows are copied to v_cache there. RoPE as rope_append in llama.cu (f32, no FMA contraction): the epilogue
// adds bias[row] (the Q/K/V bias, Qwen2; zeros otherwise; [(heads + 2*kv_heads) * head_dim], wqkv's row
// order) and rotates by p * inv_freq[i] (inv_freq [head_dim/2]: HF's, after any rope scaling, computed on the
// host). Both are read in the epilogue, after the wait. Rows whose pos is outside [0, max_seq) (padding:
// pos < 0) write no KV (q is still written).
// Requirements: head_dim even; hidden % 8 == 0; as the GEMV engine.
// ------------------------------------------------------------------------------------------------------------

struct QkvEpi {
    float* q;
    float* k_cache;
    float* v_cache;
    const int* pos;
    const float* bias;
    const float* inv_freq;
    int heads, kv_heads, head_dim, max_seq, h, i;
    __device__ __forceinline__ void operator()(int b, float a, float c) const {
        const int half = head_dim / 2;
        const int p = pos[b];
        a += bias[h * head_dim + i];
        c += bias[h * head_dim + i + half];
        const bool cache_ok = p >= 0 && p < max_seq;
        if (h >= heads + kv_heads) {
            if (cache_ok) {
                const int hv = h - heads - kv_heads;
                float* dst = v_cache + (((size_t)b * kv_heads + hv) * (size_t)max_seq + p) * (size_t)head_dim;
                dst[i] = a;
                dst[i + half] = c;
            }
            return;
        }
        float s, co;
        rope_sincos((float)p * inv_freq[i], &s, &co);
        const float o1 = __fadd_rn(__fmul_rn(a, co), __fmul_rn(-c, s));
        const float o2 = __fadd_rn(__fmul_rn(c, co), __fmul_rn(a, s));
        float* dst;
        if (h < heads) {
            dst = q + ((size_t)b * heads + h) * (size_t)head_dim;
        } else {
            if (!cache_ok) return;
            dst = k_cache + (((size_t)b * kv_heads + (h - heads)) * (size_t)max_seq + p) * (size_t)head_dim;
        }
        dst[i] = o1;
        dst[i + half] = o2;
    }
};

template <typename T>
__device__ __forceinline__ void qkv_rope_impl(const T* w, const T* norm, const float* x, float* q, float* k_cache,
                                              float* v_cache, const int* pos, const float* bias,
                                              const float* inv_freq, int hidden, int heads, int kv_heads,
                                              int head_dim, int max_seq, int batch, float eps) {
    PDL_LAUNCH_DEPENDENTS();
    const int half = head_dim / 2;
    fw_for_pairs((heads + 2 * kv_heads) * half, [&](int g) {
        const int h = g / half, i = g - h * half;
        QkvEpi epi{q, k_cache, v_cache, pos, bias, inv_freq, heads, kv_heads, head_dim, max_seq, h, i};
        const int row0 = h * head_dim + i;
        fw_rows<T, true>(w, row0, row0 + half, norm, x, hidden, batch, eps, epi);
    });
}

#define DEFINE_QKV(SUFFIX, T)                                                                               \
    extern "C" __global__ void __launch_bounds__(FW_BLOCK, FW_MIN_BLOCKS)                                   \
        qkv_rope_##SUFFIX(const T* w, const T* norm, const float* x, float* q, float* k_cache,              \
                          float* v_cache, const int* pos, const float* bias, const float* inv_freq,         \
                          int hidden, int heads, int kv_heads, int head_dim, int max_seq, int batch,        \
                          float eps) {                                                                      \
        qkv_rope_impl<T>(w, norm, x, q, k_cache, v_cache, pos, bias, inv_freq, hidden, heads, kv_heads,     \
                         head_dim, max_seq, batch, eps);                                                    \
    }
DEFINE_QKV(f32, float)
DEFINE_QKV(f16, db_f16)
DEFINE_QKV(bf16, db_bf16)

// ------------------------------------------------------------------------------------------------------------
// gate_up_silu_<wt>: RMSNorm + packed gate/up projection + SiLU(gate) * up.   grid [ceil_div(ffn, 8)],
//                                                                              block [256]
// w = w_gate_up [2*ffn, hidden] with rows interleaved: row 2j = w_gate[j], row 2j+1 = w_up[j], so one warp
// owns both rows of output j: act[b, j] = silu(gate) * up, act [batch, ffn].
// Requirements: hidden % 8 == 0; as the GEMV engine.
// ------------------------------------------------------------------------------------------------------------

struct SwigluEpi {
    float* act;
    int ffn, j;
    __device__ __forceinline__ void operator()(int b, float g, float u) const {
        act[(size_t)b * ffn + j] = silu_f(g) * u;
    }
};

template <typename T>
__device__ __forceinline__ void gate_up_impl(const T* w, const T* norm, const float* x, float* act, int ffn,
                                             int hidden, int batch, float eps) {
    PDL_LAUNCH_DEPENDENTS();
    fw_for_pairs(ffn, [&](int j) {
        fw_rows<T, true>(w, 2 * j, 2 * j + 1, norm, x, hidden, batch, eps, SwigluEpi{act, ffn, j});
    });
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
//                 LM head)                                               grid [ceil_div(n, 16)], block [256]
// A warp owns rows (2g, 2g+1) (the second clamped to n-1 for loads, never written past n).
// Requirements: k % 8 == 0; as the GEMV engine. y must not alias x.
// ------------------------------------------------------------------------------------------------------------

template <bool ADD>
struct RowsEpi {
    float* y;
    int n, j0;
    __device__ __forceinline__ void operator()(int b, float a, float c) const {
        float* dst = y + (size_t)b * n + j0;
        dst[0] = ADD ? dst[0] + a : a;
        if (j0 + 1 < n) dst[1] = ADD ? dst[1] + c : c;
    }
};

template <typename T, bool NORM, bool ADD>
__device__ __forceinline__ void gemv_rows_impl(const T* w, const T* norm, const float* x, float* y, int n, int k,
                                               int batch, float eps) {
    PDL_LAUNCH_DEPENDENTS();
    fw_for_pairs((n + 1) / 2, [&](int g) {
        const int j0 = 2 * g;
        fw_rows<T, NORM>(w, j0, min(j0 + 1, n - 1), norm, x, k, batch, eps, RowsEpi<ADD>{y, n, j0});
    });
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
// attn_decode: split-sequence decode attention with the combine in the same kernel.
//                                           grid [batch*heads, ceil_div(max_seq, chunk)], block [128]
// Block (b*heads + h, s) covers keys [s*chunk, min((s+1)*chunk, L)), L = min(pos[b] + 1, max_seq), of kv head
// h / (heads / kv_heads), as attn_partial in llama.cu (online softmax over tiles of blockDim.x keys). Only the
// live splits, nlive = ceil_div(L, chunk), do work; the others return after the wait.
// * nlive == 1: the block writes out = o / l itself (no scratch, no counter).
// * nlive > 1: each live block writes its (o, m, l) to part_o/part_ml, fences, and bumps counters[b*heads+h];
//   the block that brings it to nlive combines the nlive partials (L2 loads) into out and resets the counter
//   to 0 for the next launch. counters must be zero before the first launch (a fresh buffer is).
// * L <= 0 (padding row, pos < 0): split 0 writes zeros.
// out [batch, heads*head_dim]; part_o [batch, heads, splits, head_dim]; part_ml [batch, heads, splits, 2].
// Requirements: head_dim % 4 == 0, 4 <= head_dim <= 4 * warpSize; kv_heads divides heads; chunk >= 1;
// blockDim.x a multiple of warpSize, <= 128; q, caches, part_o and out 16-byte aligned.
// ------------------------------------------------------------------------------------------------------------

#define ATTN_BLOCK 128
#define ATTN_UNROLL 8  // keys per thread whose 16-byte loads are in flight together

extern "C" __global__ void __launch_bounds__(ATTN_BLOCK)
    attn_decode(const float* q, const float* k_cache, const float* v_cache, const int* pos, float* part_o,
                float* part_ml, int* counters, float* out, int heads, int kv_heads, int head_dim, int max_seq,
                int chunk, float scale) {
    __shared__ float sp[ATTN_BLOCK];     // the tile's scores, then its probabilities
    __shared__ float4 sacc[ATTN_BLOCK];  // p.V partials of the key groups, summed at the end
    __shared__ float sred[32];
    __shared__ int s_last;
    PDL_LAUNCH_DEPENDENTS();
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const int bh = blockIdx.x, b = bh / heads, h = bh - b * heads;
    const int s = blockIdx.y;
    const int kvh = h / (heads / kv_heads);
    const int d4 = head_dim / 4;
    int lpk = 1;  // score layout: groups of LPK lanes per key (a power of two <= warpSize)
    while (lpk < d4) lpk <<= 1;
    const int sg = tid / lpk, sc4 = tid % lpk, n_sg = nthreads / lpk;
    const int vg = tid / d4, vc4 = tid % d4, n_vg = nthreads / d4;  // p.V layout: key groups of d4 threads
    const float4 zero4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    PDL_WAIT();
    // q and pos are independent loads: issue both before using either
    const float4 qv = (sc4 < d4) ? db_ldca(reinterpret_cast<const float4*>(q + (size_t)bh * head_dim) + sc4) : zero4;
    const int L = min(pos[b] + 1, max_seq);
    const int nlive = L > 0 ? (L + chunk - 1) / chunk : 0;
    float4* out4 = reinterpret_cast<float4*>(out + (size_t)bh * head_dim);
    if (nlive == 0) {
        if (s == 0 && tid < d4) out4[tid] = zero4;
        return;
    }
    if (s >= nlive) return;
    const int start = s * chunk;
    const int end = min(start + chunk, L);

    const size_t kv_base = ((size_t)b * kv_heads + kvh) * (size_t)max_seq * (size_t)head_dim;
    const float4* kc4 = reinterpret_cast<const float4*>(k_cache + kv_base);
    const float4* vc4p = reinterpret_cast<const float4*>(v_cache + kv_base);

    float m = NEG_INF, l = 0.0f;
    float4 acc = zero4;
    for (int t0 = start; t0 < end; t0 += nthreads) {
        const int nt = min(nthreads, end - t0);
        for (int base = 0; base < nt; base += ATTN_UNROLL * n_sg) {
            float dot[ATTN_UNROLL];
#pragma unroll
            for (int u = 0; u < ATTN_UNROLL; ++u) {
                const int kk = base + u * n_sg + sg;
                float4 kv = zero4;
                if (kk < nt && sc4 < d4) kv = db_ldcg(kc4 + (size_t)(t0 + kk) * d4 + sc4);
                dot[u] = qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
            }
            for (int o = lpk >> 1; o > 0; o >>= 1) {
#pragma unroll
                for (int u = 0; u < ATTN_UNROLL; ++u) dot[u] += db_shfl_xor(dot[u], o);
            }
#pragma unroll
            for (int u = 0; u < ATTN_UNROLL; ++u) {
                const int kk = base + u * n_sg + sg;
                if (kk < nt && sc4 == 0) sp[kk] = scale * dot[u];
            }
        }
        __syncthreads();
        const float sc = (tid < nt) ? sp[tid] : NEG_INF;
        const float m_new = fmaxf(m, db_block_max(sc, sred));  // finite: the tile has >= 1 key
        const float pj = (tid < nt) ? expf(sc - m_new) : 0.0f;
        if (tid < nt) sp[tid] = pj;
        const float psum = db_block_sum(pj, sred);  // its barriers also publish sp
        const float corr = expf(m - m_new);      // 0 on the first tile (m = -inf)
        l = l * corr + psum;
        m = m_new;
        acc.x *= corr;
        acc.y *= corr;
        acc.z *= corr;
        acc.w *= corr;
        if (vg < n_vg) {
            for (int j0 = vg; j0 < nt; j0 += ATTN_UNROLL * n_vg) {
                float4 vv[ATTN_UNROLL];
                float p[ATTN_UNROLL];
#pragma unroll
                for (int u = 0; u < ATTN_UNROLL; ++u) {
                    const int j = j0 + u * n_vg;
                    vv[u] = zero4;
                    p[u] = 0.0f;
                    if (j < nt) {
                        vv[u] = db_ldcg(vc4p + (size_t)(t0 + j) * d4 + vc4);
                        p[u] = sp[j];
                    }
                }
#pragma unroll
                for (int u = 0; u < ATTN_UNROLL; ++u) {
                    acc.x = fmaf(p[u], vv[u].x, acc.x);
                    acc.y = fmaf(p[u], vv[u].y, acc.y);
                    acc.z = fmaf(p[u], vv[u].z, acc.z);
                    acc.w = fmaf(p[u], vv[u].w, acc.w);
                }
            }
        }
        __syncthreads();  // sp is rewritten by the next tile
    }
    sacc[tid] = acc;
    __syncthreads();
    float4 o = zero4;
    if (tid < d4) {
        o = sacc[tid];
        for (int g = 1; g < n_vg; ++g) {
            const float4 t = sacc[g * d4 + tid];
            o.x += t.x;
            o.y += t.y;
            o.z += t.z;
            o.w += t.w;
        }
    }
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
    const float* ml = part_ml + (size_t)bh * splits * 2;
    const float* po = part_o + (size_t)bh * splits * head_dim;
    float M = NEG_INF;
    for (int t = 0; t < nlive; ++t) M = fmaxf(M, db_ldcg(ml + 2 * t));
    for (int e = tid; e < head_dim; e += nthreads) {
        float num = 0.0f, den = 0.0f;
        for (int t = 0; t < nlive; ++t) {
            const float wgt = expf(db_ldcg(ml + 2 * t) - M);
            num = fmaf(wgt, db_ldcg(po + (size_t)t * head_dim + e), num);
            den = fmaf(wgt, db_ldcg(ml + 2 * t + 1), den);
        }
        out[(size_t)bh * head_dim + e] = num / den;
    }
    if (tid == 0) counters[bh] = 0;  // every live block has counted: ready for the next launch
}

// ------------------------------------------------------------------------------------------------------------
// embed_pdl_<wt>: x[b, :] = float(table[tokens[b], :])        grid [batch], block [256]
// As embed_<wt> in llama.cu, with the PDL trigger and wait (tokens come from an upload node).
// ------------------------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void embed_impl(const T* __restrict__ table, const int* tokens, float* x, int hidden) {
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

__device__ __forceinline__ void argmax_merge(float& bv, int& bi, float ov, int oi) {
    if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
    }
}

extern "C" __global__ void __launch_bounds__(1024) argmax_pdl(const float* logits, int* out, int vocab) {
    __shared__ float sv[32];
    __shared__ int si[32];
    PDL_LAUNCH_DEPENDENTS();
    PDL_WAIT();
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const float* row = logits + (size_t)blockIdx.x * (size_t)vocab;
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    if (tid < vocab) {
        bv = row[tid];
        bi = tid;
    }
    for (int i = tid + nthreads; i < vocab; i += nthreads) {
        const float v = row[i];
        if (v > bv) {
            bv = v;
            bi = i;
        }
    }
    for (int o = warpSize >> 1; o > 0; o >>= 1) {
        const float ov = db_shfl_xor(bv, o);
        const int oi = db_shfl_xor(bi, o);
        argmax_merge(bv, bi, ov, oi);
    }
    const int lane = tid % warpSize, warp = tid / warpSize, nwarps = nthreads / warpSize;
    if (lane == 0) {
        sv[warp] = bv;
        si[warp] = bi;
    }
    __syncthreads();
    if (tid == 0) {
        for (int w = 1; w < nwarps; ++w) argmax_merge(bv, bi, sv[w], si[w]);
        out[blockIdx.x] = bi;
    }
}
