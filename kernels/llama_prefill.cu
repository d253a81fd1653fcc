// dagbuild: Llama prefill kernels (specs/llama_prefill.yaml): a chunk of `seq` prompt positions for `batch`
// rows in one graph. The GEMMs are child-graph nodes (cuBLAS); these kernels are everything between them.
// The fused decode spec's GEMM path (batch >= gemm_batch) runs rmsnorm_cast and silu_pairs between its GEMMs
// too (its attention, attn_qkv_<wt> in kernels/llama_batched.cu, does RoPE as rope_kv_prefill does).
//
// Layout: activations are [batch * seq, width] row-major, row r = b * seq + t; pos[r] is the position of
// token t of row b, or negative for padding (a padded position writes no KV and its outputs are ignored).
// The KV cache is the decode spec's: [cache_batch, kv_heads, max_seq, head_dim] per layer, of the weight type
// wt (a key or value is rounded once, when written, and read back as a float); row b of the batch is cache
// row b. Every entry point is extern "C" __global__ so its name is its PTX .entry.
#include "port.cuh"
#include "llama_common.cuh"  // rope_sincos and the KV cache's element access, as the decode kernels

// ------------------------------------------------------------------------------------------------------------
// rmsnorm_cast_<wt>: y[r, :] = wt(float(weight) * (x[r, :] * rsqrt(mean(x[r]^2) + eps)))   grid [rows],
// block [256]. As rmsnorm_<wt> in llama.cu (the same f32 arithmetic), with the result rounded to the weight
// type: it is the a operand of a GEMM whose b is the weight (cuBLAS takes one input type for both). It may be
// launched programmatically (the decode GEMM path): it lets its dependents launch at once and waits for its
// producer before it reads x (a no-op after a plain edge).
// ------------------------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void rmsnorm_cast_impl(const float* __restrict__ x, const T* __restrict__ weight,
                                                  T* __restrict__ y, int hidden, float eps) {
    __shared__ float sh[DB_MAX_WARPS];
    DB_GRID_TRIGGER();
    DB_GRID_WAIT();
    const size_t r = blockIdx.x;
    const float* xr = x + r * (size_t)hidden;
    T* yr = y + r * (size_t)hidden;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) ss += xr[i] * xr[i];
    const float var = db_block_sum(ss, sh) / (float)hidden;
    const float inv = rsqrtf(var + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) yr[i] = from_float<T>(to_float(weight[i]) * (xr[i] * inv));
}

#define DEFINE_RMSNORM_CAST(SUFFIX, T)                                                                      \
    extern "C" __global__ void __launch_bounds__(1024)                                                      \
        rmsnorm_cast_##SUFFIX(const float* x, const T* weight, T* y, int hidden, float eps) {               \
        rmsnorm_cast_impl<T>(x, weight, y, hidden, eps);                                                    \
    }
DEFINE_RMSNORM_CAST(f32, float)
DEFINE_RMSNORM_CAST(f16, db_f16)
DEFINE_RMSNORM_CAST(bf16, db_bf16)

// ------------------------------------------------------------------------------------------------------------
// rope_kv_prefill_<wt>: Q/K/V bias, then RoPE on q and k of every position of the chunk, k and v written to
// the cache (of the weight type).                                              grid [batch * seq], block [128]
// qkv[r, :] is [q heads | k heads | v heads] * head_dim (the packed wqkv GEMM's output); bias is that row's
// [bq; bk; bv] (the layer's qkv_bias row, zeros for models without biases), added in f32 before RoPE as HF
// Qwen2 does and as the decode kernels do. q is biased and roped in place; roped k and biased v go to
// cache[b, kvh, pos[r], :], each rounded once to the cache type as it is stored (kv_store). Angles:
// pos * inv_freq[i] in f32 (inv_freq: the rope_inv_freq table, as the decode kernels read it), sin/cos by
// rope_sincos (llama_common.cuh), out = x*cos + rotate_half(x)*sin with each product and the sum rounded
// separately (as the decode kernels do). A position outside [0, max_seq) writes nothing (its q is left as it
// is). Requirements: head_dim even.
// ------------------------------------------------------------------------------------------------------------

template <typename K>
__device__ __forceinline__ void rope_kv_prefill_impl(float* qkv, K* k_cache, K* v_cache, const int* pos,
                                                     const float* bias, const float* inv_freq, int heads,
                                                     int kv_heads, int head_dim, int max_seq, int seq) {
    const int r = blockIdx.x;
    const int b = r / seq;
    const int p = pos[r];
    if (p < 0 || p >= max_seq) return;
    const int half = head_dim / 2;
    const size_t width = (size_t)(heads + 2 * kv_heads) * head_dim;
    float* row = qkv + (size_t)r * width;
    for (int idx = threadIdx.x; idx < (heads + kv_heads) * half; idx += blockDim.x) {
        const int h = idx / half, i = idx - h * half;
        float s, c;
        rope_sincos((float)p * inv_freq[i], &s, &c);
        const float* src = row + (size_t)h * head_dim;
        const float* bh = bias + (size_t)h * head_dim;
        const float x1 = src[i] + bh[i], x2 = src[i + half] + bh[i + half];
        const float o1 = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(-x2, s));
        const float o2 = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
        if (h < heads) {
            float* dst = row + (size_t)h * head_dim;
            dst[i] = o1;
            dst[i + half] = o2;
        } else {
            K* dst = k_cache + (((size_t)b * kv_heads + (h - heads)) * (size_t)max_seq + p) * (size_t)head_dim;
            kv_store(dst + i, o1);
            kv_store(dst + i + half, o2);
        }
    }
    const size_t v0 = (size_t)(heads + kv_heads) * head_dim;
    for (int idx = threadIdx.x; idx < kv_heads * head_dim; idx += blockDim.x) {
        const int hk = idx / head_dim, e = idx - hk * head_dim;
        kv_store(v_cache + (((size_t)b * kv_heads + hk) * (size_t)max_seq + p) * (size_t)head_dim + e,
                 row[v0 + idx] + bias[v0 + idx]);
    }
}

#define DEFINE_ROPE_KV_PREFILL(SUFFIX, K)                                                                   \
    extern "C" __global__ void __launch_bounds__(1024)                                                      \
        rope_kv_prefill_##SUFFIX(float* qkv, K* k_cache, K* v_cache, const int* pos, const float* bias,     \
                                 const float* inv_freq, int heads, int kv_heads, int head_dim, int max_seq, \
                                 int seq) {                                                                 \
        rope_kv_prefill_impl<K>(qkv, k_cache, v_cache, pos, bias, inv_freq, heads, kv_heads, head_dim,      \
                                max_seq, seq);                                                              \
    }
DEFINE_ROPE_KV_PREFILL(f32, float)
DEFINE_ROPE_KV_PREFILL(f16, db_f16)
DEFINE_ROPE_KV_PREFILL(bf16, db_bf16)

// ------------------------------------------------------------------------------------------------------------
// attn_prefill_<wt>: causal attention of the chunk's queries over the cache of the weight type (the prefix
// written by earlier chunks and this chunk's keys, written by rope_kv_prefill_<wt> before it).
//                                   grid [ceil_div(seq, 64), heads, batch], block [64 * ceil_div(head_dim, 64)]
// Flash-attention style in f32 on CUDA cores. A block takes 64 queries of one head; each query is held by
// S = ceil_div(head_dim, 64) adjacent threads (S = 2 for head_dim 96 and 128), each with head_dim / S of its
// q (scaled) and of its output row in registers: float4 chunks c = S*j + part, so the S threads of a query
// read adjacent 16 bytes of a key row (no bank conflict); their partial scores are summed with one shuffle.
// The block walks key tiles (64 keys, 32 when S = 2: a 32 KiB K+V tile) of kv head h / (heads / kv_heads) up
// to the block's largest position, staged in shared memory as floats (4 cache elements a load, widened exactly;
// each key row is read by all threads at once: a broadcast). Per 16 keys: scores, one rescale of the running
// (m, l, o), then p.V; a warp runs the keys up to its own largest position (so its shuffles see the whole warp)
// and each query masks the keys past its own position. Query at position p sees keys 0..p of its cache row.
// out[r, h*head_dim : (h+1)*head_dim] = wt(softmax(q k^T * scale) v); a padded query writes zeros.
// head_dim is dispatched at run time to one of 32, 64, 96, 128 (any other: nothing is written; the spec's
// check refuses it). Requirements: blockDim.x == 64 * S; cache rows 0..p filled for every query's p.
// ------------------------------------------------------------------------------------------------------------

#define PA_Q 64        // queries per block
#define PA_U 16        // keys per online-softmax step
#define PA_TILE 2048   // float4s of shared memory for a K and a V tile (32 KiB)

template <typename T, int D>
__device__ __forceinline__ void attn_prefill_impl(const float* __restrict__ qkv, const T* __restrict__ k_cache,
                                                  const T* __restrict__ v_cache, const int* __restrict__ pos,
                                                  T* __restrict__ out, int heads, int kv_heads, int max_seq,
                                                  int seq, float scale, float4* tile, int* pmax_sh) {
    constexpr int S = D > 64 ? 2 : 1;  // threads per query
    constexpr int C = D / (4 * S);     // float4 chunks of q, o per thread
    constexpr int D4 = D / 4;          // float4s per key row
    constexpr int KT = D > 64 ? 32 : 64;  // keys per tile
    static_assert(2 * KT * D4 <= PA_TILE, "K and V tiles must fit the shared buffer");
    static_assert(KT % PA_U == 0 && D % (4 * S) == 0, "tile shape");
    float4* ks = tile;            // [KT][D4]
    float4* vs = tile + KT * D4;  // [KT][D4]
    const int b = blockIdx.z, h = blockIdx.y;
    const int qi = threadIdx.x / S, part = threadIdx.x - qi * S;
    const int t = blockIdx.x * PA_Q + qi;
    const int hk = h / (heads / kv_heads);
    const size_t r = (size_t)b * seq + t;
    int p = t < seq ? pos[r] : -1;
    if (p >= max_seq) p = -1;
    if (threadIdx.x == 0) *pmax_sh = -1;
    __syncthreads();
    if (p >= 0 && part == 0) atomicMax(pmax_sh, p);
    __syncthreads();
    const int pmax = *pmax_sh;
    int pw = p;  // the warp's largest position: the bound of its key loop (warp-uniform)
    for (int off = warpSize >> 1; off > 0; off >>= 1) pw = max(pw, db_shfl_xor(pw, off));

    float q[4 * C], o[4 * C];
    const size_t width = (size_t)(heads + 2 * kv_heads) * D;
    const float4* qr = reinterpret_cast<const float4*>(qkv + r * width + (size_t)h * D);
#pragma unroll
    for (int j = 0; j < C; ++j) {
        const float4 v = p >= 0 ? qr[S * j + part] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        q[4 * j] = v.x * scale;
        q[4 * j + 1] = v.y * scale;
        q[4 * j + 2] = v.z * scale;
        q[4 * j + 3] = v.w * scale;
    }
#pragma unroll
    for (int d = 0; d < 4 * C; ++d) o[d] = 0.0f;
    float m = DB_NEG_INF, l = 0.0f;
    const size_t base = ((size_t)b * kv_heads + hk) * (size_t)max_seq * D;
    using R = typename Kv4<T>::raw;  // 4 cache elements: one load
    const R* kb = reinterpret_cast<const R*>(k_cache + base);
    const R* vb = reinterpret_cast<const R*>(v_cache + base);

    for (int j0 = 0; j0 <= pmax; j0 += KT) {
        __syncthreads();  // the previous tile is no longer read
        for (int idx = threadIdx.x; idx < KT * D4; idx += blockDim.x) {
            const int j = j0 + idx / D4;
            float4 kv = make_float4(0.0f, 0.0f, 0.0f, 0.0f), vv = kv;
            if (j <= pmax) {
                kv = kv_unpack4<T>(kb[(size_t)j0 * D4 + idx]);
                vv = kv_unpack4<T>(vb[(size_t)j0 * D4 + idx]);
            }
            ks[idx] = kv;
            vs[idx] = vv;
        }
        __syncthreads();
        const int jw = min(KT, pw - j0 + 1);  // keys of this tile the warp's queries see (<= 0: none)
        const int jn = p - j0 + 1;            // keys of this tile this query sees (<= 0: none)
        for (int s0 = 0; s0 < jw; s0 += PA_U) {
            float sc[PA_U];
            float mt = m;
#pragma unroll
            for (int u = 0; u < PA_U; ++u) {
                const float4* kr = ks + (s0 + u) * D4;
                float acc = 0.0f;
#pragma unroll
                for (int j = 0; j < C; ++j) {
                    const float4 kv = kr[S * j + part];
                    acc = fmaf(q[4 * j], kv.x, acc);
                    acc = fmaf(q[4 * j + 1], kv.y, acc);
                    acc = fmaf(q[4 * j + 2], kv.z, acc);
                    acc = fmaf(q[4 * j + 3], kv.w, acc);
                }
                if (S == 2) acc += db_shfl_xor(acc, 1);
                sc[u] = s0 + u < jn ? acc : DB_NEG_INF;
                mt = fmaxf(mt, sc[u]);
            }
            // mt = -inf only for a query that has seen no key (padding): keep its state 0 instead of NaN
            const float mref = mt == DB_NEG_INF ? 0.0f : mt;
            const float corr = expf(m - mref);  // m = -inf at first: 0
            l *= corr;
#pragma unroll
            for (int d = 0; d < 4 * C; ++d) o[d] *= corr;
#pragma unroll
            for (int u = 0; u < PA_U; ++u) {
                const float pu = expf(sc[u] - mref);  // a masked key: 0
                l += pu;
                const float4* vr = vs + (s0 + u) * D4;
#pragma unroll
                for (int j = 0; j < C; ++j) {
                    const float4 vv = vr[S * j + part];
                    o[4 * j] = fmaf(pu, vv.x, o[4 * j]);
                    o[4 * j + 1] = fmaf(pu, vv.y, o[4 * j + 1]);
                    o[4 * j + 2] = fmaf(pu, vv.z, o[4 * j + 2]);
                    o[4 * j + 3] = fmaf(pu, vv.w, o[4 * j + 3]);
                }
            }
            m = mt;
        }
    }
    if (t >= seq) return;
    T* dst = out + r * (size_t)heads * D + (size_t)h * D;
    const float inv = p >= 0 && l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int j = 0; j < C; ++j) {
        T* d4 = dst + 4 * (S * j + part);
#pragma unroll
        for (int e = 0; e < 4; ++e) d4[e] = from_float<T>(o[4 * j + e] * inv);
    }
}

#define DEFINE_ATTN_PREFILL(SUFFIX, T)                                                                      \
    extern "C" __global__ void __launch_bounds__(2 * PA_Q)                                                  \
        attn_prefill_##SUFFIX(const float* qkv, const T* k_cache, const T* v_cache, const int* pos,          \
                              T* out, int heads, int kv_heads, int head_dim, int max_seq, int seq,          \
                              float scale) {                                                                \
        __shared__ float4 tile[PA_TILE];                                                                    \
        __shared__ int pmax;                                                                                \
        switch (head_dim) {                                                                                 \
            case 32:                                                                                        \
                attn_prefill_impl<T, 32>(qkv, k_cache, v_cache, pos, out, heads, kv_heads, max_seq, seq,    \
                                         scale, tile, &pmax);                                               \
                break;                                                                                      \
            case 64:                                                                                        \
                attn_prefill_impl<T, 64>(qkv, k_cache, v_cache, pos, out, heads, kv_heads, max_seq, seq,    \
                                         scale, tile, &pmax);                                               \
                break;                                                                                      \
            case 96:                                                                                        \
                attn_prefill_impl<T, 96>(qkv, k_cache, v_cache, pos, out, heads, kv_heads, max_seq, seq,    \
                                         scale, tile, &pmax);                                               \
                break;                                                                                      \
            case 128:                                                                                       \
                attn_prefill_impl<T, 128>(qkv, k_cache, v_cache, pos, out, heads, kv_heads, max_seq, seq,   \
                                          scale, tile, &pmax);                                              \
                break;                                                                                      \
            default:                                                                                        \
                break;                                                                                      \
        }                                                                                                   \
    }
DEFINE_ATTN_PREFILL(f32, float)
DEFINE_ATTN_PREFILL(f16, db_f16)
DEFINE_ATTN_PREFILL(bf16, db_bf16)

// ------------------------------------------------------------------------------------------------------------
// silu_pairs_<wt>: act[r, j] = wt(silu(gu[r, 2j]) * gu[r, 2j+1]), j < ffn.     grid [ceil_div(n, 512)], block
// [256], n = rows * ffn. gu is the packed gate/up GEMM's output (w_gate_up's rows interleave gate and up),
// so each (gate, up) pair is one float2. silu(g) = g / (1 + exp(-g)), as silu_mul in llama.cu.
// ------------------------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void silu_pairs_impl(const float* __restrict__ gu, T* __restrict__ act, long long n) {
    const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 2;
    const float2* g2 = reinterpret_cast<const float2*>(gu);
#pragma unroll
    for (int u = 0; u < 2; ++u) {
        const long long i = i0 + u;
        if (i < n) {
            const float2 v = g2[i];
            act[i] = from_float<T>(v.x / (1.0f + expf(-v.x)) * v.y);
        }
    }
}

#define DEFINE_SILU_PAIRS(SUFFIX, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(1024) silu_pairs_##SUFFIX(const float* gu, T* act, long long n) { \
        silu_pairs_impl<T>(gu, act, n);                                                                     \
    }
DEFINE_SILU_PAIRS(f32, float)
DEFINE_SILU_PAIRS(f16, db_f16)
DEFINE_SILU_PAIRS(bf16, db_bf16)

// ------------------------------------------------------------------------------------------------------------
// last_rows: xl[b, :] = x[b * seq + t, :] for the last t of row b whose position is valid (>= 0), zeros when
// the chunk holds no position of row b.                                         grid [batch], block [256]
// Only each row's last position goes through the final norm and the LM head.
// ------------------------------------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(1024)
    last_rows(const float* x, const int* pos, float* xl, int seq, int hidden) {
    __shared__ int last;
    const int b = blockIdx.x;
    if (threadIdx.x == 0) last = -1;
    __syncthreads();
    for (int t = threadIdx.x; t < seq; t += blockDim.x)
        if (pos[(size_t)b * seq + t] >= 0) atomicMax(&last, t);
    __syncthreads();
    const int t = last;
    float* dst = xl + (size_t)b * hidden;
    const float* src = x + ((size_t)b * seq + (t < 0 ? 0 : t)) * (size_t)hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = t < 0 ? 0.0f : src[i];
}
