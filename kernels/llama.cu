// dagbuild: Llama decode-step kernels.
//
// One translation unit, compiled as one module through NVRTC (cupy.RawModule(code=..., options=("--std=c++17",)))
// or hiprtc, after dagbuild.sources.read_kernel_source has inlined kernels/port.cuh (the portability header:
// fp16/bf16 types, conversions, warp/block reductions). Every entry point is extern "C" __global__ so its name
// is its PTX .entry / code-object symbol. Weight-reading kernels are templates instantiated for float (_f32),
// db_f16 (_f16: __half on CUDA) and db_bf16 (_bf16: __nv_bfloat16 on CUDA) weights; so are the kernels that
// touch the KV cache, which holds the weight type (as HF's cache holds the model dtype: a key or value is
// rounded once, when appended, and read back as a float). Activations and every accumulation are float32.
// Layouts are row-major; weights are HF nn.Linear W[n_out, k].
// Reductions use warp shuffles sized by warpSize at run time (never a literal 32; 64 on AMD CDNA), so block
// shapes must be multiples of the warp width (all the launch shapes in kernels/llama.md are).
// See kernels/llama.md for the launch table (grid/block formulas) and requirements.

#include "port.cuh"
#include "llama_common.cuh"  // WeightPack, the KV cache's loads and stores, rope_sincos, silu_f, argmax_merge

// ------------------------------------------------------------------------------------------------------------
// embed_<wt>: x[b, :] = float(table[tokens[b], :])        grid [batch], block [256]
// One block per token row; the row copy is coalesced and tiny next to the GEMVs, so it stays scalar.
// tokens[b] must be a valid row of the table (not checked: the table's row count is not passed).
// ------------------------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void embed_impl(const T* __restrict__ table, const int* __restrict__ tokens,
                                           float* __restrict__ x, int hidden) {
    const int b = blockIdx.x;
    const T* row = table + (size_t)tokens[b] * (size_t)hidden;
    float* out = x + (size_t)b * (size_t)hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[i] = to_float(row[i]);
}

#define DEFINE_EMBED(SUFFIX, T)                                                                             \
    extern "C" __global__ void __launch_bounds__(1024)                                                      \
        embed_##SUFFIX(const T* table, const int* tokens, float* x, int hidden) {                           \
        embed_impl<T>(table, tokens, x, hidden);                                                            \
    }
DEFINE_EMBED(f32, float)
DEFINE_EMBED(f16, db_f16)
DEFINE_EMBED(bf16, db_bf16)

// ------------------------------------------------------------------------------------------------------------
// rmsnorm_<wt>: HF LlamaRMSNorm in f32.                    grid [batch], block [256]
//   var = mean(x^2); y = float(weight) * (x * rsqrt(var + eps))
// One block per row: one block-wide sum of squares, then a second coalesced pass that scales.
// ------------------------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void rmsnorm_impl(const float* __restrict__ x, const T* __restrict__ weight,
                                             float* __restrict__ y, int hidden, float eps) {
    __shared__ float sh[DB_MAX_WARPS];
    const int b = blockIdx.x;
    const float* xr = x + (size_t)b * (size_t)hidden;
    float* yr = y + (size_t)b * (size_t)hidden;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) ss += xr[i] * xr[i];
    const float var = db_block_sum(ss, sh) / (float)hidden;
    const float r = rsqrtf(var + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) yr[i] = to_float(weight[i]) * (xr[i] * r);
}

#define DEFINE_RMSNORM(SUFFIX, T)                                                                           \
    extern "C" __global__ void __launch_bounds__(1024)                                                      \
        rmsnorm_##SUFFIX(const float* x, const T* weight, float* y, int hidden, float eps) {                \
        rmsnorm_impl<T>(x, weight, y, hidden, eps);                                                         \
    }
DEFINE_RMSNORM(f32, float)
DEFINE_RMSNORM(f16, db_f16)
DEFINE_RMSNORM(bf16, db_bf16)

// ------------------------------------------------------------------------------------------------------------
// gemv_<wt> / gemv_add_<wt>: y[b, j] (+)= sum_i w[j, i] * x[b, i]     grid [ceil_div(n, 4)], block [256]
//
// Why it is shaped so: batch-1..8 decode is bound by reading W once from DRAM.
// * Each block owns GEMV_ROWS = 4 consecutive output rows and ALL of its threads split k between them, so
//   the grid is ceil_div(n, 4) whatever the warp width, and each thread loads 16-byte packs of W
//   (8 halves / 4 floats) that are consecutive across threads (fully coalesced).
// * The batch is processed in register-blocked chunks of up to 8 rows of x: for batch <= 8 every W element
//   is read from DRAM exactly once; larger batches loop over chunks (the block's 4 rows are re-read right
//   away, from L1/L2). One x pack loaded into registers feeds all 4 W rows (4x less L1 traffic for x).
// * Each thread issues 2 packs x 4 rows = 8 independent 16-byte W loads before it uses any of them (4 in
//   the 8-row chunk, which has 8x the FMAs per load and the most registers live).
// * fp32 accumulators (4 rows x chunk) are reduced across each warp with a shuffle reduce-scatter (a
//   transpose: log2(warpSize) steps, each halving the values per lane, ~1 shuffle per value instead of
//   log2(warpSize)), then across the block's warps through shared memory in a fixed order. No atomics,
//   deterministic.
// * At most 128 registers (2 blocks of 256 per SM) and no local memory: chunks are at most 4 rows of x
//   (an 8-row chunk spilled one value, and any local memory makes the driver reserve per-thread local
//   memory for every graph that launches the kernel: ~2 MiB per executable on a 132-SM GPU).
// Requirements: k % 8 == 0; w and x 16-byte aligned (every row then is too); blockDim.x a multiple of
// warpSize and <= 256; any n >= 1, any batch >= 1; batch * k < 2^33 (32-bit float4 offsets).
// ------------------------------------------------------------------------------------------------------------

#define GEMV_ROWS 4
#define GEMV_BLOCK 256
#define GEMV_MAX_NB 4
#define GEMV_MAX_V (GEMV_ROWS * GEMV_MAX_NB)
// Two resident blocks per SM (<= 128 registers): measured on H200 the best balance between batch 1 (wants
// more resident blocks) and batch 8 (wants registers: 3 blocks/SM spilled in the 8-row chunk and was 30%
// slower there). Left to its heuristics ptxas picked 128 or 175 registers depending on how the bound was
// spelled; 175 (one block per SM) was 40% slower at batch 1.
#define GEMV_MIN_BLOCKS 2

// Warp reduce-scatter of V per-lane values (V a power of two). Step with offset o: lanes with bit o set keep
// (and sum with their partner) the upper half of their values, the others the lower half. After the steps,
// a lane holds the warp totals of values [base, base + max(1, V / warpSize)) in a[0..); when V < warpSize
// the remaining offsets fully reduce a[0], so warpSize / V consecutive lanes hold the same total.
template <int V>
__device__ __forceinline__ void warp_reduce_scatter(float* a, int o, int lane, int& base) {
    if constexpr (V == 1) {
        for (; o > 0; o >>= 1) a[0] += db_shfl_xor(a[0], o);
    } else {
        if (o == 0) return;  // warp narrower than V: V / warpSize values stay with this lane
        const bool upper = (lane & o) != 0;
#pragma unroll
        for (int i = 0; i < V / 2; ++i) {
            const float send = upper ? a[i] : a[i + V / 2];
            const float keep = upper ? a[i + V / 2] : a[i];
            a[i] = keep + db_shfl_xor(send, o);
        }
        if (upper) base += V / 2;
        warp_reduce_scatter<V / 2>(a, o >> 1, lane, base);
    }
}

// acc[r][bb] += dot(W pack of row r, x pack of batch row bb) for pack index p.
// x rows are addressed as float4 offsets from x (32-bit: fewer registers than NB 64-bit pointers).
template <typename T, int NB>
__device__ __forceinline__ void gemv_pack_fma(const uint4 (&wv)[GEMV_ROWS], const float4* __restrict__ x4,
                                              const int (&xoff)[NB], int p, float (&acc)[GEMV_ROWS][NB]) {
    constexpr int VEC = WeightPack<T>::VEC;
    float wf[GEMV_ROWS][VEC];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) WeightPack<T>::unpack(wv[r], wf[r]);
#pragma unroll
    for (int bb = 0; bb < NB; ++bb) {
        float xf[VEC];
#pragma unroll
        for (int c = 0; c < VEC / 4; ++c) {
            const float4 t = __ldg(x4 + xoff[bb] + p * (VEC / 4) + c);
            xf[4 * c + 0] = t.x;
            xf[4 * c + 1] = t.y;
            xf[4 * c + 2] = t.z;
            xf[4 * c + 3] = t.w;
        }
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; ++r) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[r][bb] = fmaf(wf[r][e], xf[e], acc[r][bb]);
        }
    }
}

// One chunk of NB (<= 8) batch rows b0..b0+NB-1 (rows >= batch are computed on a clamped copy and not
// written) for the block's GEMV_ROWS output rows.
template <typename T, int NB, bool ADD>
__device__ __forceinline__ void gemv_chunk(const T* __restrict__ w, const float* __restrict__ x,
                                           float* __restrict__ y, int n, int k, int batch, int b0, float* red) {
    constexpr int VEC = WeightPack<T>::VEC;
    constexpr int V = GEMV_ROWS * NB;
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const int j0 = blockIdx.x * GEMV_ROWS;
    const int P = k / VEC;  // 16-byte packs per W row

    // The block's rows as one pointer plus 32-bit pack offsets (fewer registers than 4 pointers); rows past
    // n read row j0 instead (valid memory; their sums are never written).
    const uint4* w4 = reinterpret_cast<const uint4*>(w + (size_t)j0 * (size_t)k);
    int woff[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) woff[r] = (j0 + r < n) ? r * P : 0;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    int xoff[NB];  // batch rows past the end are clamped to the last row (computed, never written)
#pragma unroll
    for (int bb = 0; bb < NB; ++bb) xoff[bb] = min(b0 + bb, batch - 1) * (k / 4);

    float acc[GEMV_ROWS][NB];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r)
#pragma unroll
        for (int bb = 0; bb < NB; ++bb) acc[r][bb] = 0.0f;

    // U packs x 4 rows of W loads in flight per thread. The 8-row chunk has 4x the FMAs per load and the
    // most registers in use, so it keeps 4 loads in flight instead of 8 (no spills, 2 blocks per SM).
    constexpr int U = (NB >= 8) ? 1 : 2;
    int p = tid;
    for (; p + (U - 1) * nthreads < P; p += U * nthreads) {
        uint4 wv[U][GEMV_ROWS];
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; ++r) wv[u][r] = __ldg(w4 + woff[r] + p + u * nthreads);
#pragma unroll
        for (int u = 0; u < U; ++u) gemv_pack_fma<T, NB>(wv[u], x4, xoff, p + u * nthreads, acc);
    }
    if (U > 1 && p < P) {
        uint4 wa[GEMV_ROWS];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; ++r) wa[r] = __ldg(w4 + woff[r] + p);
        gemv_pack_fma<T, NB>(wa, x4, xoff, p, acc);
    }

    // Reduce: within each warp (reduce-scatter), then across warps in shared memory.
    float a[V];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r)
#pragma unroll
        for (int bb = 0; bb < NB; ++bb) a[r * NB + bb] = acc[r][bb];
    const int ws = warpSize;
    const int lane = tid % ws, warp = tid / ws, nwarps = nthreads / ws;
    int base = 0;
    warp_reduce_scatter<V>(a, ws >> 1, lane, base);
    if (V <= ws) {
        if ((lane & (ws / V - 1)) == 0) red[warp * V + base] = a[0];
    } else {
        const int left = V / ws;
#pragma unroll
        for (int i = 0; i < V; ++i)
            if (i < left) red[warp * V + base + i] = a[i];
    }
    __syncthreads();
    if (tid < V) {
        float s = 0.0f;
        for (int wi = 0; wi < nwarps; ++wi) s += red[wi * V + tid];
        const int j = j0 + tid / NB, b = b0 + tid % NB;
        if (j < n && b < batch) {
            float* dst = y + (size_t)b * (size_t)n + j;
            *dst = ADD ? *dst + s : s;
        }
    }
    __syncthreads();  // `red` is reused by the next chunk
}

template <typename T, bool ADD>
__device__ __forceinline__ void gemv_impl(const T* w, const float* x, float* y, int n, int k, int batch,
                                          float* red) {
    for (int b0 = 0; b0 < batch; b0 += GEMV_MAX_NB) {
        const int nb = min(GEMV_MAX_NB, batch - b0);  // uniform across the block
        if (nb > 4)
            gemv_chunk<T, 8, ADD>(w, x, y, n, k, batch, b0, red);
        else if (nb > 2)
            gemv_chunk<T, 4, ADD>(w, x, y, n, k, batch, b0, red);
        else if (nb == 2)
            gemv_chunk<T, 2, ADD>(w, x, y, n, k, batch, b0, red);
        else
            gemv_chunk<T, 1, ADD>(w, x, y, n, k, batch, b0, red);
    }
}

#define DEFINE_GEMV(SUFFIX, T)                                                                              \
    extern "C" __global__ void __launch_bounds__(GEMV_BLOCK, GEMV_MIN_BLOCKS)                                                \
        gemv_##SUFFIX(const T* w, const float* x, float* y, int n, int k, int batch) {                      \
        __shared__ float red[(GEMV_BLOCK / 32) * GEMV_MAX_V];                                               \
        gemv_impl<T, false>(w, x, y, n, k, batch, red);                                                     \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(GEMV_BLOCK, GEMV_MIN_BLOCKS)                                                \
        gemv_add_##SUFFIX(const T* w, const float* x, float* y, int n, int k, int batch) {                  \
        __shared__ float red[(GEMV_BLOCK / 32) * GEMV_MAX_V];                                               \
        gemv_impl<T, true>(w, x, y, n, k, batch, red);                                                      \
    }
DEFINE_GEMV(f32, float)
DEFINE_GEMV(f16, db_f16)
DEFINE_GEMV(bf16, db_bf16)

// ------------------------------------------------------------------------------------------------------------
// gemvw_<wt> / gemvw_add_<wt>: the same contract as gemv_<wt>.          grid [ceil_div(n, 16)], block [256]
//
// Why a second GEMV: at decode sizes (k = 2048..5632) the block-splits-k GEMV above gives each thread only
// one or two packs per row, so its fixed cost (block reduction through shared memory, two barriers) is
// paid on very little data. Here each warp owns GEMVW_WR = 2 whole rows and its lanes stride over k: each
// lane keeps GEMVW_U x 2 = 8 independent 16-byte W loads in flight, sums are reduced with shuffles only
// (no shared memory, no barrier), and lane 0 writes. A block owns GEMVW_ROWS = 16 rows whatever the warp
// width (its warps stride over them). Batch rows are taken 4 at a time in registers (for batch <= 4 every
// W element is read once; larger batches re-read the warp's two rows, 2 x k x sizeof(wt), from L1/L2).
// Requirements: as gemv_<wt> (k % 8 == 0, w and x 16-byte aligned).
// ------------------------------------------------------------------------------------------------------------

#define GEMVW_ROWS 16
#define GEMVW_WR 2
#define GEMVW_U 4

template <typename T, int NB>
__device__ __forceinline__ void gemvw_fma(const uint4 (&wv)[GEMVW_WR], const float4* const (&xr)[NB], int p,
                                          float (&acc)[GEMVW_WR][NB]) {
    constexpr int VEC = WeightPack<T>::VEC;
    float wf[GEMVW_WR][VEC];
#pragma unroll
    for (int r = 0; r < GEMVW_WR; ++r) WeightPack<T>::unpack(wv[r], wf[r]);
#pragma unroll
    for (int bb = 0; bb < NB; ++bb) {
        float xf[VEC];
#pragma unroll
        for (int c = 0; c < VEC / 4; ++c) {
            const float4 t = __ldg(xr[bb] + p * (VEC / 4) + c);
            xf[4 * c + 0] = t.x;
            xf[4 * c + 1] = t.y;
            xf[4 * c + 2] = t.z;
            xf[4 * c + 3] = t.w;
        }
#pragma unroll
        for (int r = 0; r < GEMVW_WR; ++r) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[r][bb] = fmaf(wf[r][e], xf[e], acc[r][bb]);
        }
    }
}

// Rows j0, j0+1 (clamped to n-1 for loads; never written past n) for batch rows b0..b0+NB-1.
template <typename T, int NB, bool ADD>
__device__ __forceinline__ void gemvw_rows(const T* __restrict__ w, const float* __restrict__ x,
                                           float* __restrict__ y, int n, int k, int batch, int b0, int j0) {
    constexpr int VEC = WeightPack<T>::VEC;
    const int P = k / VEC;
    const int lane = threadIdx.x % warpSize, ws = warpSize;
    const uint4* wr[GEMVW_WR];
#pragma unroll
    for (int r = 0; r < GEMVW_WR; ++r)
        wr[r] = reinterpret_cast<const uint4*>(w + (size_t)min(j0 + r, n - 1) * (size_t)k);
    const float4* xr[NB];
#pragma unroll
    for (int bb = 0; bb < NB; ++bb)
        xr[bb] = reinterpret_cast<const float4*>(x + (size_t)min(b0 + bb, batch - 1) * (size_t)k);
    float acc[GEMVW_WR][NB];
#pragma unroll
    for (int r = 0; r < GEMVW_WR; ++r)
#pragma unroll
        for (int bb = 0; bb < NB; ++bb) acc[r][bb] = 0.0f;
    constexpr int U = NB >= 4 ? GEMVW_U / 2 : GEMVW_U;  // 4 batch rows: 4x the FMAs per load, fewer loads
    int p = lane;
    for (; p + (U - 1) * ws < P; p += U * ws) {
        uint4 wv[U][GEMVW_WR];
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int r = 0; r < GEMVW_WR; ++r) wv[u][r] = __ldg(wr[r] + p + u * ws);
#pragma unroll
        for (int u = 0; u < U; ++u) gemvw_fma<T, NB>(wv[u], xr, p + u * ws, acc);
    }
    for (; p < P; p += ws) {
        uint4 wv[GEMVW_WR];
#pragma unroll
        for (int r = 0; r < GEMVW_WR; ++r) wv[r] = __ldg(wr[r] + p);
        gemvw_fma<T, NB>(wv, xr, p, acc);
    }
#pragma unroll
    for (int r = 0; r < GEMVW_WR; ++r) {
#pragma unroll
        for (int bb = 0; bb < NB; ++bb) {
            const float v = db_warp_sum(acc[r][bb]);
            if (lane == 0 && j0 + r < n && b0 + bb < batch) {
                float* dst = y + (size_t)(b0 + bb) * (size_t)n + (j0 + r);
                *dst = ADD ? *dst + v : v;
            }
        }
    }
}

template <typename T, bool ADD>
__device__ __forceinline__ void gemvw_impl(const T* w, const float* x, float* y, int n, int k, int batch) {
    const int warp = threadIdx.x / warpSize, nwarps = blockDim.x / warpSize;
    for (int r0 = warp * GEMVW_WR; r0 < GEMVW_ROWS; r0 += nwarps * GEMVW_WR) {
        const int j0 = blockIdx.x * GEMVW_ROWS + r0;
        if (j0 >= n) return;  // uniform across the warp
        for (int b0 = 0; b0 < batch; b0 += 4) {
            const int nb = min(4, batch - b0);
            if (nb > 2)
                gemvw_rows<T, 4, ADD>(w, x, y, n, k, batch, b0, j0);
            else if (nb == 2)
                gemvw_rows<T, 2, ADD>(w, x, y, n, k, batch, b0, j0);
            else
                gemvw_rows<T, 1, ADD>(w, x, y, n, k, batch, b0, j0);
        }
    }
}

#define DEFINE_GEMVW(SUFFIX, T)                                                                             \
    extern "C" __global__ void __launch_bounds__(256, 2)                                                    \
        gemvw_##SUFFIX(const T* w, const float* x, float* y, int n, int k, int batch) {                     \
        gemvw_impl<T, false>(w, x, y, n, k, batch);                                                         \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256, 2)                                                    \
        gemvw_add_##SUFFIX(const T* w, const float* x, float* y, int n, int k, int batch) {                 \
        gemvw_impl<T, true>(w, x, y, n, k, batch);                                                          \
    }
DEFINE_GEMVW(f32, float)
DEFINE_GEMVW(f16, db_f16)
DEFINE_GEMVW(bf16, db_bf16)

// ------------------------------------------------------------------------------------------------------------
// rope_append_<wt>: HF rotary embedding at p = pos[b], in place on q, roped k and v appended to this layer's
// cache slice [cache_batch, kv_heads, max_seq, head_dim] of the weight type, after adding the Q/K/V projection
// bias (Qwen2; zeros for Llama/Mistral).                                          grid [batch], block [128]
// One block per batch row; each thread owns whole pairs (i, i + head_dim/2) of one head: it reads both
// elements into registers before writing, so the in-place q update has no intra-kernel race. The input k
// is not modified (it is const): its roped value goes to k_cache only.
// bias = [bq; bk; bv], (heads + 2*kv_heads) * head_dim floats (the packed wqkv row order). inv_freq =
// [head_dim/2] floats, HF's inv_freq after any rope scaling (computed on the host, as HF does).
// Matches HF in f32: freq = p * inv_freq[i], sin/cos via rope_sincos, out = x*cos + rotate_half(x)*sin with
// each product and the sum rounded separately (no FMA contraction); the roped k and the biased v are rounded
// to the cache type once, as they are stored (kv_store: round to nearest even; exact for f32).
// Requirements: head_dim even; 0 <= pos[b] < max_seq (a row whose pos is out of range still ropes q but
// writes nothing to the cache).
// ------------------------------------------------------------------------------------------------------------

template <typename K>
__device__ __forceinline__ void rope_append_impl(float* q, const float* k, const float* v, const float* bias,
                                                 const float* inv_freq, K* k_cache, K* v_cache, const int* pos,
                                                 int heads, int kv_heads, int head_dim, int max_seq) {
    const int b = blockIdx.x;
    const int p = pos[b];
    const int half = head_dim / 2;
    const bool cache_ok = p >= 0 && p < max_seq;
    const int total = (heads + kv_heads) * half;
    for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
        const int h = idx / half, i = idx - h * half;
        const float f = (float)p * inv_freq[i];
        float s, c;
        rope_sincos(f, &s, &c);
        const float* bh = bias + (size_t)h * head_dim;  // q heads, then k heads: the packed row order
        if (h < heads) {
            float* qh = q + ((size_t)b * heads + h) * (size_t)head_dim;
            const float x1 = qh[i] + bh[i], x2 = qh[i + half] + bh[i + half];
            qh[i] = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(-x2, s));
            qh[i + half] = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
        } else if (cache_ok) {
            const int hk = h - heads;
            const float* kh = k + ((size_t)b * kv_heads + hk) * (size_t)head_dim;
            K* dst = k_cache + (((size_t)b * kv_heads + hk) * (size_t)max_seq + p) * (size_t)head_dim;
            const float x1 = kh[i] + bh[i], x2 = kh[i + half] + bh[i + half];
            kv_store(dst + i, __fadd_rn(__fmul_rn(x1, c), __fmul_rn(-x2, s)));
            kv_store(dst + i + half, __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
        }
    }
    if (cache_ok) {
        const int nv = kv_heads * head_dim;
        const float* bv = bias + (size_t)(heads + kv_heads) * head_dim;
        for (int idx = threadIdx.x; idx < nv; idx += blockDim.x) {
            const int hk = idx / head_dim, e = idx - hk * head_dim;
            kv_store(v_cache + (((size_t)b * kv_heads + hk) * (size_t)max_seq + p) * (size_t)head_dim + e,
                     v[(size_t)b * nv + idx] + bv[idx]);
        }
    }
}

#define DEFINE_ROPE_APPEND(SUFFIX, K)                                                                       \
    extern "C" __global__ void __launch_bounds__(1024)                                                      \
        rope_append_##SUFFIX(float* q, const float* k, const float* v, const float* bias,                   \
                             const float* inv_freq, K* k_cache, K* v_cache, const int* pos, int heads,      \
                             int kv_heads, int head_dim, int max_seq) {                                     \
        rope_append_impl<K>(q, k, v, bias, inv_freq, k_cache, v_cache, pos, heads, kv_heads, head_dim,      \
                            max_seq);                                                                       \
    }
DEFINE_ROPE_APPEND(f32, float)
DEFINE_ROPE_APPEND(f16, db_f16)
DEFINE_ROPE_APPEND(bf16, db_bf16)

// ------------------------------------------------------------------------------------------------------------
// attn_partial_<wt>: flash-decoding split.     grid [batch*heads, ceil_div(max_seq, chunk)], block [128]
// Block (b*heads + h, s) covers keys [s*chunk, min((s+1)*chunk, L)), L = pos[b] + 1, kv head
// h / (heads / kv_heads), and walks them in tiles of blockDim.x keys with an online softmax:
// * scores: a group of LPK = pow2ceil(head_dim/4) consecutive lanes per key, one load of 4 elements of the key
//   row per lane (16 bytes for f32, 8 for f16/bf16; the row is read coalesced), widened to float (exact), dot
//   product reduced by shuffles inside the group; the groups stride over the tile's keys (loop trip count
//   uniform across the block, so every shuffle is converged);
// * softmax: block max, p = exp(score - m), block sum, rescale of the running (m, l, o) by exp(m_old - m);
// * p.V: head_dim/4 threads per value row, 4 elements of v each (coalesced), blockDim.x / (head_dim/4)
//   key groups each keeping its own float4 accumulator, summed through shared memory once at the end.
// The caches hold the weight type (what rope_append_<wt> stored, rounded once); every product and sum is f32.
// Writes unnormalised o, m = max score, l = sum exp(score - m); a split with no key writes (-inf, 0, 0).
// Requirements: head_dim % 4 == 0 and 4 <= head_dim <= 4 * warpSize (128 at warpSize 32); chunk >= 1 (any
// value: tiled); kv_heads divides heads; blockDim.x a multiple of warpSize, <= 128; q and part_o 16-byte
// aligned, the caches 4-element aligned. The caches are read through the read-only path (__ldg): they were
// written by an earlier launch (rope_append), never by one this kernel overlaps.
// ------------------------------------------------------------------------------------------------------------

#define ATTN_BLOCK 128
#define ATTN_UNROLL 8  // keys per thread whose loads are in flight together

template <typename K>
__device__ __forceinline__ void attn_partial_impl(const float* q, const K* k_cache, const K* v_cache, const int* pos,
                                                  float* part_o, float* part_ml, int heads, int kv_heads,
                                                  int head_dim, int max_seq, int chunk, float scale) {
    using R = typename Kv4<K>::raw;         // 4 cache elements: one load
    __shared__ float sp[ATTN_BLOCK];        // the tile's scores, then its probabilities
    __shared__ float4 sacc[ATTN_BLOCK];     // p.V partials of the key groups, summed at the end
    __shared__ float sred[DB_MAX_WARPS];
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const int bh = blockIdx.x, b = bh / heads, h = bh - b * heads;
    const int s = blockIdx.y, splits = gridDim.y;
    const int kvh = h / (heads / kv_heads);
    const int L = min(pos[b] + 1, max_seq);
    const int start = s * chunk;
    const int end = min(start + chunk, L);
    const int d4 = head_dim / 4;

    // score layout: groups of LPK lanes (a power of two <= warpSize, so groups never straddle a warp)
    int lpk = 1;
    while (lpk < d4) lpk <<= 1;
    const int sg = tid / lpk, sc4 = tid % lpk, n_sg = nthreads / lpk;
    // p.V layout: key groups of d4 threads (threads past n_vg * d4 idle in that phase)
    const int vg = tid / d4, vc4 = tid % d4, n_vg = nthreads / d4;

    const size_t kv_base = ((size_t)b * kv_heads + kvh) * (size_t)max_seq * (size_t)head_dim;
    const R* kc4 = reinterpret_cast<const R*>(k_cache + kv_base);
    const R* vc4p = reinterpret_cast<const R*>(v_cache + kv_base);
    const float4 zero4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    const float4 qv = (sc4 < d4) ? __ldg(reinterpret_cast<const float4*>(q + (size_t)bh * head_dim) + sc4) : zero4;

    float m = DB_NEG_INF, l = 0.0f;
    float4 acc = zero4;
    for (int t0 = start; t0 < end; t0 += nthreads) {
        const int nt = min(nthreads, end - t0);
        // scores of the tile's nt keys -> sp[0..nt); ATTN_UNROLL keys per group in flight
        for (int base = 0; base < nt; base += ATTN_UNROLL * n_sg) {
            float dot[ATTN_UNROLL];
#pragma unroll
            for (int u = 0; u < ATTN_UNROLL; ++u) {
                const int kk = base + u * n_sg + sg;
                float4 kv = zero4;
                if (kk < nt && sc4 < d4) kv = kv_unpack4<K>(db_ldg(kc4 + (size_t)(t0 + kk) * d4 + sc4));
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
        const float sc = (tid < nt) ? sp[tid] : DB_NEG_INF;
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
                        vv[u] = kv_unpack4<K>(db_ldg(vc4p + (size_t)(t0 + j) * d4 + vc4));
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
    const size_t row = (size_t)bh * splits + s;
    if (tid < d4) {
        float4 o = sacc[tid];
        for (int g = 1; g < n_vg; ++g) {
            const float4 t = sacc[g * d4 + tid];
            o.x += t.x;
            o.y += t.y;
            o.z += t.z;
            o.w += t.w;
        }
        reinterpret_cast<float4*>(part_o + row * head_dim)[tid] = o;
    }
    if (tid == 0) {
        part_ml[row * 2 + 0] = m;
        part_ml[row * 2 + 1] = l;
    }
}

#define DEFINE_ATTN_PARTIAL(SUFFIX, K)                                                                      \
    extern "C" __global__ void __launch_bounds__(ATTN_BLOCK)                                                \
        attn_partial_##SUFFIX(const float* q, const K* k_cache, const K* v_cache, const int* pos,            \
                              float* part_o, float* part_ml, int heads, int kv_heads, int head_dim,         \
                              int max_seq, int chunk, float scale) {                                        \
        attn_partial_impl<K>(q, k_cache, v_cache, pos, part_o, part_ml, heads, kv_heads, head_dim, max_seq, \
                             chunk, scale);                                                                 \
    }
DEFINE_ATTN_PARTIAL(f32, float)
DEFINE_ATTN_PARTIAL(f16, db_f16)
DEFINE_ATTN_PARTIAL(bf16, db_bf16)

// ------------------------------------------------------------------------------------------------------------
// attn_combine: out[b, h, :] = sum_s exp(m_s - M) o_s / sum_s exp(m_s - M) l_s     grid [batch*heads],
// block [128]. One block per (b, h); each thread owns head dimensions e (strided) and walks the few splits
// itself (they are read by every thread from L1: no shared memory, no barrier). Splits with l == 0 are
// skipped. Any head_dim.
// ------------------------------------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(1024)
    attn_combine(const float* part_o, const float* part_ml, float* out, int heads, int head_dim, int splits) {
    const int bh = blockIdx.x;
    const float* ml = part_ml + (size_t)bh * splits * 2;
    const float* po = part_o + (size_t)bh * splits * head_dim;
    float M = DB_NEG_INF;
    for (int s = 0; s < splits; ++s)
        if (ml[2 * s + 1] > 0.0f) M = fmaxf(M, ml[2 * s]);
    for (int e = threadIdx.x; e < head_dim; e += blockDim.x) {
        float num = 0.0f, den = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const float l = ml[2 * s + 1];
            if (l > 0.0f) {
                const float wgt = expf(ml[2 * s] - M);
                num = fmaf(wgt, po[(size_t)s * head_dim + e], num);
                den = fmaf(wgt, l, den);
            }
        }
        out[(size_t)bh * head_dim + e] = den > 0.0f ? num / den : 0.0f;
    }
}

// ------------------------------------------------------------------------------------------------------------
// silu_mul: out[i] = silu(gate[i]) * up[i], i < n.         grid [ceil_div(n, 1024)], block [256]
// 4 consecutive elements per thread: one float4 each of gate/up/out when all three pointers are 16-byte
// aligned and the 4 are in range, else scalar (so any n and any alignment work).
// ------------------------------------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(1024)
    silu_mul(const float* gate, const float* up, float* out, int n) {
    const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (i0 >= n) return;
    const bool aligned = ((((size_t)gate) | ((size_t)up) | ((size_t)out)) & 15) == 0;
    if (aligned && i0 + 4 <= n) {
        const float4 g = __ldg(reinterpret_cast<const float4*>(gate + i0));
        const float4 u = __ldg(reinterpret_cast<const float4*>(up + i0));
        float4 r;
        r.x = silu_f(g.x) * u.x;
        r.y = silu_f(g.y) * u.y;
        r.z = silu_f(g.z) * u.z;
        r.w = silu_f(g.w) * u.w;
        *reinterpret_cast<float4*>(out + i0) = r;
    } else {
        const long long i1 = min(i0 + 4, (long long)n);
        for (long long i = i0; i < i1; ++i) out[i] = silu_f(gate[i]) * up[i];
    }
}

// ------------------------------------------------------------------------------------------------------------
// argmax: out[b] = lowest index of the max of logits[b, :vocab] (torch.argmax).    grid [batch], block [1024]
// One block per row: strided coalesced scan (strict '>' keeps the earliest index per thread), then a
// shuffle reduction of (value, index) pairs preferring the lower index on ties, then the warps' pairs
// through shared memory (32 slots: blockDim.x / warpSize <= 32). NaN is not handled.
// ------------------------------------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(1024) argmax(const float* logits, int* out, int vocab) {
    argmax_row(logits, out, vocab);
}
