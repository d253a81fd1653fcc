// dagbuild: Llama prefill kernels (specs/llama_prefill.yaml): a chunk of `seq` prompt positions for `batch`
// rows in one graph. The GEMMs are child-graph nodes (cuBLAS); these kernels are everything between them.
//
// Layout: activations are [batch * seq, width] row-major, row r = b * seq + t; pos[r] is the position of
// token t of row b, or negative for padding (a padded position writes no KV and its outputs are ignored).
// The KV cache is the decode spec's: [cache_batch, kv_heads, max_seq, head_dim] per layer, f32; row b of
// the batch is cache row b. Every entry point is extern "C" __global__ so its name is its PTX .entry.
#include "port.cuh"

// ------------------------------------------------------------------------------------------------------------
// rmsnorm_cast_<wt>: y[r, :] = wt(float(weight) * (x[r, :] * rsqrt(mean(x[r]^2) + eps)))   grid [rows],
// block [256]. As rmsnorm_<wt> in llama.cu (the same f32 arithmetic), with the result rounded to the weight
// type: it is the a operand of a GEMM whose b is the weight (cuBLAS takes one input type for both).
// ------------------------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void rmsnorm_cast_impl(const float* __restrict__ x, const T* __restrict__ weight,
                                                  T* __restrict__ y, int hidden, float eps) {
    __shared__ float sh[DB_MAX_WARPS];
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
// rope_kv_prefill: RoPE on q and k of every position of the chunk, k and v written to the cache.
//                                                                              grid [batch * seq], block [128]
// qkv[r, :] is [q heads | k heads | v heads] * head_dim (the packed wqkv GEMM's output). q is roped in place;
// roped k and v go to cache[b, kvh, pos[r], :]. Angles: pos * inv_freq[i] in f32, sin/cos as rope_sincos in
// llama.cu, out = x*cos + rotate_half(x)*sin with each product and the sum rounded separately (as the decode
// kernels do). A position outside [0, max_seq) writes nothing (its q is left as it is).
// ------------------------------------------------------------------------------------------------------------

__device__ __forceinline__ void prefill_sincos(float f, float* s, float* c) {
    const double d = (double)f;
    const double turns = rint(d * 0.15915494309189535);
    const float r = (float)fma(-turns, 6.283185307179586, d);
    __sincosf(r, s, c);
}

extern "C" __global__ void __launch_bounds__(1024)
    rope_kv_prefill(float* qkv, float* k_cache, float* v_cache, const int* pos, const float* inv_freq, int heads,
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
        prefill_sincos((float)p * inv_freq[i], &s, &c);
        float* src = row + (size_t)h * head_dim;
        const float x1 = src[i], x2 = src[i + half];
        const float o1 = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(-x2, s));
        const float o2 = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
        if (h < heads) {
            src[i] = o1;
            src[i + half] = o2;
        } else {
            float* dst = k_cache + (((size_t)b * kv_heads + (h - heads)) * (size_t)max_seq + p) * (size_t)head_dim;
            dst[i] = o1;
            dst[i + half] = o2;
        }
    }
    const float* v = row + (size_t)(heads + kv_heads) * head_dim;
    for (int idx = threadIdx.x; idx < kv_heads * head_dim; idx += blockDim.x) {
        const int hk = idx / head_dim, e = idx - hk * head_dim;
        v_cache[(((size_t)b * kv_heads + hk) * (size_t)max_seq + p) * (size_t)head_dim + e] = v[idx];
    }
}

// ------------------------------------------------------------------------------------------------------------
// attn_prefill_<wt>: causal attention of the chunk's queries over the cache (the prefix written by earlier
// chunks and this chunk's keys, written by rope_kv_prefill before it).
//                                                   grid [ceil_div(seq, 64), heads, batch], block [64]
// Flash-attention style in f32 on CUDA cores: one thread per query (its q, scaled, and its output row in
// registers), the block walks key tiles of 64 keys of kv head h / (heads / kv_heads) up to the block's
// largest position, staged in shared memory (each key row is read by all threads at once: a broadcast).
// Per 16 keys: scores, one rescale of the running (m, l, o), then p.V. Query at position p sees keys
// 0..p of its cache row. out[r, h*64 : h*64+64] = wt(softmax(q k^T * scale) v); a padded query writes zeros.
// Requirements: head_dim == 64; blockDim.x == 64; cache rows 0..p filled for every query's p.
// ------------------------------------------------------------------------------------------------------------

#define PA_Q 64
#define PA_K 64
#define PA_D 64
#define PA_U 16

template <typename T>
__device__ __forceinline__ void attn_prefill_impl(const float* __restrict__ qkv, const float* __restrict__ k_cache,
                                                  const float* __restrict__ v_cache, const int* __restrict__ pos,
                                                  T* __restrict__ out, int heads, int kv_heads, int max_seq,
                                                  int seq, float scale) {
    __shared__ float4 ks[PA_K][PA_D / 4];
    __shared__ float4 vs[PA_K][PA_D / 4];
    __shared__ int pmax_sh;
    const int b = blockIdx.z, h = blockIdx.y;
    const int t = blockIdx.x * PA_Q + threadIdx.x;
    const int hk = h / (heads / kv_heads);
    const size_t r = (size_t)b * seq + t;
    int p = t < seq ? pos[r] : -1;
    if (p >= max_seq) p = -1;
    if (threadIdx.x == 0) pmax_sh = -1;
    __syncthreads();
    if (p >= 0) atomicMax(&pmax_sh, p);
    __syncthreads();
    const int pmax = pmax_sh;

    float q[PA_D], o[PA_D];
    const size_t width = (size_t)(heads + 2 * kv_heads) * PA_D;
    if (p >= 0) {
        const float4* qr = reinterpret_cast<const float4*>(qkv + r * width + (size_t)h * PA_D);
#pragma unroll
        for (int c = 0; c < PA_D / 4; ++c) {
            const float4 v = qr[c];
            q[4 * c] = v.x * scale;
            q[4 * c + 1] = v.y * scale;
            q[4 * c + 2] = v.z * scale;
            q[4 * c + 3] = v.w * scale;
        }
    }
#pragma unroll
    for (int d = 0; d < PA_D; ++d) o[d] = 0.0f;
    float m = DB_NEG_INF, l = 0.0f;
    const size_t base = ((size_t)b * kv_heads + hk) * (size_t)max_seq * PA_D;
    const float4* kb = reinterpret_cast<const float4*>(k_cache + base);
    const float4* vb = reinterpret_cast<const float4*>(v_cache + base);

    for (int j0 = 0; j0 <= pmax; j0 += PA_K) {
        __syncthreads();  // the previous tile is no longer read
        for (int idx = threadIdx.x; idx < PA_K * (PA_D / 4); idx += blockDim.x) {
            const int kj = idx / (PA_D / 4), c = idx - kj * (PA_D / 4);
            const int j = j0 + kj;
            float4 kv = make_float4(0.0f, 0.0f, 0.0f, 0.0f), vv = kv;
            if (j <= pmax) {
                kv = kb[(size_t)j * (PA_D / 4) + c];
                vv = vb[(size_t)j * (PA_D / 4) + c];
            }
            ks[kj][c] = kv;
            vs[kj][c] = vv;
        }
        __syncthreads();
        const int jn = min(PA_K, p - j0 + 1);  // keys of this tile the thread sees (<= 0: none)
        for (int s0 = 0; s0 < jn; s0 += PA_U) {
            float sc[PA_U];
            float mt = m;
#pragma unroll
            for (int u = 0; u < PA_U; ++u) {
                float acc = 0.0f;
#pragma unroll
                for (int c = 0; c < PA_D / 4; ++c) {
                    const float4 kv = ks[s0 + u][c];
                    acc = fmaf(q[4 * c], kv.x, acc);
                    acc = fmaf(q[4 * c + 1], kv.y, acc);
                    acc = fmaf(q[4 * c + 2], kv.z, acc);
                    acc = fmaf(q[4 * c + 3], kv.w, acc);
                }
                sc[u] = s0 + u < jn ? acc : DB_NEG_INF;
                mt = fmaxf(mt, sc[u]);
            }
            const float corr = expf(m - mt);  // m = -inf at first: 0
            l *= corr;
#pragma unroll
            for (int d = 0; d < PA_D; ++d) o[d] *= corr;
#pragma unroll
            for (int u = 0; u < PA_U; ++u) {
                const float pu = expf(sc[u] - mt);
                l += pu;
#pragma unroll
                for (int c = 0; c < PA_D / 4; ++c) {
                    const float4 vv = vs[s0 + u][c];
                    o[4 * c] = fmaf(pu, vv.x, o[4 * c]);
                    o[4 * c + 1] = fmaf(pu, vv.y, o[4 * c + 1]);
                    o[4 * c + 2] = fmaf(pu, vv.z, o[4 * c + 2]);
                    o[4 * c + 3] = fmaf(pu, vv.w, o[4 * c + 3]);
                }
            }
            m = mt;
        }
    }
    if (t >= seq) return;
    T* dst = out + r * (size_t)heads * PA_D + (size_t)h * PA_D;
    const float inv = p >= 0 && l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int d = 0; d < PA_D; ++d) dst[d] = from_float<T>(o[d] * inv);
}

#define DEFINE_ATTN_PREFILL(SUFFIX, T)                                                                      \
    extern "C" __global__ void __launch_bounds__(PA_Q)                                                      \
        attn_prefill_##SUFFIX(const float* qkv, const float* k_cache, const float* v_cache, const int* pos,  \
                              T* out, int heads, int kv_heads, int max_seq, int seq, float scale) {         \
        attn_prefill_impl<T>(qkv, k_cache, v_cache, pos, out, heads, kv_heads, max_seq, seq, scale);        \
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
