// dagbuild: helpers the Llama kernel files share (kernels/llama.cu, kernels/llama_fused.cu and what includes
// them). Include after port.cuh, with the quoted form (dagbuild.sources inlines it once).

#include "port.cuh"

template <typename T>
struct WeightPack;  // a 16-byte pack of weights, unpacked to VEC floats

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

// The KV cache holds the model's weight type K (float, db_f16 or db_bf16), as HF's cache holds the model dtype:
// a key or value is rounded once, when it is appended (round to nearest even), and computed on as a float.
// Kv4<K>::raw is 4 consecutive cache elements as one load (float4 for f32: 16 bytes; uint2 for f16 and bf16: 8);
// kv_unpack4<K>(raw): those elements as a float4 (exact); kv_store(p, v): one element, rounded.
template <typename K>
struct Kv4 {
    using raw = uint2;
};
template <>
struct Kv4<float> {
    using raw = float4;
};

// (kv_unpack4 takes its argument by value: through a reference, NVVM contracted the f32 build's dot products in
// another order than before the cache was typed)
template <typename K>
__device__ __forceinline__ float4 kv_unpack4(typename Kv4<K>::raw r);
template <>
__device__ __forceinline__ float4 kv_unpack4<float>(float4 r) {
    return r;
}
template <>
__device__ __forceinline__ float4 kv_unpack4<db_f16>(uint2 r) {
    return make_float4(db_f16_bits_to_float(r.x & 0xffffu), db_f16_bits_to_float(r.x >> 16),
                       db_f16_bits_to_float(r.y & 0xffffu), db_f16_bits_to_float(r.y >> 16));
}
template <>
__device__ __forceinline__ float4 kv_unpack4<db_bf16>(uint2 r) {
    return make_float4(__uint_as_float(r.x << 16), __uint_as_float(r.x & 0xffff0000u), __uint_as_float(r.y << 16),
                       __uint_as_float(r.y & 0xffff0000u));
}
template <typename K>
__device__ __forceinline__ void kv_store(K* p, float v) {
    *p = from_float<K>(v);
}

// sin/cos of an f32 angle without local memory: cosf/sinf carry a Payne-Hanek slow path whose 32-byte
// stack array makes the driver reserve local memory per graph (~8 MiB per executable on a 132-SM GPU).
// Reduce to [-pi, pi] in double (exact to ~1e-16 * |f|), then the hardware approximation (abs error
// < 2^-21 on that range): within 4e-7 of HF's cos/sin.
__device__ __forceinline__ void rope_sincos(float f, float* s, float* c) {
    const double d = (double)f;
    const double turns = rint(d * 0.15915494309189535);
    const float r = (float)fma(-turns, 6.283185307179586, d);
    __sincosf(r, s, c);
}

// SiLU in f32, as HF's silu: g * sigmoid(g) = g / (1 + exp(-g)).
__device__ __forceinline__ float silu_f(float g) { return g / (1.0f + expf(-g)); }

// argmax's pair merge: the larger value, the lower index on ties (torch.argmax's first maximum).
__device__ __forceinline__ void argmax_merge(float& bv, int& bi, float ov, int oi) {
    if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
    }
}

// out[blockIdx.x] = the lowest index of the max of row blockIdx.x of logits [rows, vocab]: a strided coalesced
// scan (strict '>' keeps each thread's earliest index), a shuffle reduction of (value, index) pairs preferring
// the lower index, then the warps' pairs through shared memory. blockDim.x <= DB_MAX_WARPS * warpSize.
__device__ __forceinline__ void argmax_row(const float* logits, int* out, int vocab) {
    __shared__ float sv[DB_MAX_WARPS];
    __shared__ int si[DB_MAX_WARPS];
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const float* row = logits + (size_t)blockIdx.x * (size_t)vocab;
    float bv = DB_NEG_INF;
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
