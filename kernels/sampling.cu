// On-device sampling and stopping for K-steps-per-launch decoding (dagbuild.llama.loop).
//
// sample_step: one block per row, after the LM head. For an active row (pos >= 0) it picks the next token,
// feeds it back (tokens[b] = next), advances the position, records the token in the ring and stops the row
// (pos = -1) at its EOS id, when its token budget runs out or at max_seq; the last block to finish sets
// state[DONE] when no row is active and advances state[STEP]. Once state[DONE] is set the kernel does
// nothing, and the model's kernels skip rows with a negative position, so a body run after the stop (the
// unrolled form of the loop) changes nothing.
//
// Semantics (dagbuild/llama/sampling.py is the same algorithm in Python, the reference of the tests):
//   forced   pos + 1 < prompt_len: the next token is prompt[b, pos + 1] (prefill through the loop);
//            nothing is recorded and no random number is drawn.
//   greedy   temperature <= 0 or top_k == 1: the lowest index of the largest logit (torch.argmax).
//   sampled  keys: the logits' order-preserving 32-bit keys. top_k > 0 keeps keys >= the k-th largest
//            key (ties kept, as HF's top-k); weights w_i = floor(exp((l_i - max) / T) * 2^32) as u64
//            (integers: every sum is exact, so a run is reproducible bit for bit); top_p < 1 then keeps
//            keys >= the largest key t with sum(w, key >= t) >= ceil(top_p * sum(w)) (the smallest
//            nucleus, ties kept). With Z = the kept weights' sum and r the first output of
//            Philox4x32-10(counter = {pos, 0, 0, 0}, key = {seed_lo, seed_hi}), the target is
//            floor(Z * r / 2^32) and the token is the first index (kept tokens, index order) whose
//            running weight sum exceeds it. The draw depends only on (seed, position): single-step
//            launches and K steps per launch give the same tokens.
//
// Layouts: ctl [batch, 8] i32 = {eos (-1: none), left (tokens still to generate), prompt_len, top_k,
// seed_lo, seed_hi, 0, 0}; cfg [batch, 2] f32 = {temperature, top_p}; prompt [batch, max_seq] i32;
// ring [ring_rows, batch] i32 (-1: nothing generated at that step); state [4] i32 = {step, done, arrivals
// (left at 0), 0}.                                                       grid [batch], block [1024]

#include "port.cuh"

#define SAMPLE_THREADS 1024
#define ST_STEP 0
#define ST_DONE 1
#define ST_ARRIVALS 2

typedef unsigned long long u64;

__device__ __forceinline__ unsigned int mulhi32(unsigned int a, unsigned int b) {
    return (unsigned int)(((u64)a * (u64)b) >> 32);
}

// Philox4x32-10 (Salmon et al. 2011); out[0..3].
__device__ __forceinline__ void philox4x32_10(unsigned int c0, unsigned int c1, unsigned int c2, unsigned int c3,
                                              unsigned int k0, unsigned int k1, unsigned int* out) {
    for (int round = 0; round < 10; ++round) {
        const unsigned int hi0 = mulhi32(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        const unsigned int hi1 = mulhi32(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        const unsigned int n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    out[0] = c0;
    out[1] = c1;
    out[2] = c2;
    out[3] = c3;
}

// Larger float -> larger key (NaN is not handled).
__device__ __forceinline__ unsigned int order_key(float v) {
    const unsigned int u = __float_as_uint(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// floor(exp((l - m) * inv_t) * 2^32): the integer weight of one token (0 for keys below `floor_key`).
__device__ __forceinline__ u64 weight(float l, float m, float inv_t, unsigned int floor_key) {
    if (order_key(l) < floor_key) return 0ull;
    const float e = expf((l - m) * inv_t);
    return (u64)(e * 4294967296.0f);
}

struct SampleShared {
    unsigned int cnt[256];
    u64 mass[256];
    u64 scan[SAMPLE_THREADS];
    float fv[DB_MAX_WARPS];
    int fi[DB_MAX_WARPS];
    unsigned int prefix;
    u64 need;
    int pick;
};

__device__ __forceinline__ void argmax_merge2(float& bv, int& bi, float ov, int oi) {
    if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
    }
}

// Lowest index of the largest value (every thread gets it).
__device__ int block_argmax(const float* row, int vocab, SampleShared& sh) {
    const int tid = threadIdx.x;
    float bv = DB_NEG_INF;
    int bi = 0x7fffffff;
    for (int i = tid; i < vocab; i += blockDim.x) argmax_merge2(bv, bi, row[i], i);
    for (int o = warpSize >> 1; o > 0; o >>= 1) {
        const float ov = db_shfl_xor(bv, o);
        const int oi = db_shfl_xor(bi, o);
        argmax_merge2(bv, bi, ov, oi);
    }
    __syncthreads();
    if (tid % warpSize == 0) {
        sh.fv[tid / warpSize] = bv;
        sh.fi[tid / warpSize] = bi;
    }
    __syncthreads();
    if (tid == 0) {
        for (int w = 1; w < (int)(blockDim.x / warpSize); ++w) argmax_merge2(bv, bi, sh.fv[w], sh.fi[w]);
        sh.pick = bi;
    }
    __syncthreads();
    return sh.pick;
}

// Block-wide sum of u64 values (exact; every thread gets it).
__device__ u64 block_sum_u64(u64 v, SampleShared& sh) {
    __syncthreads();
    sh.scan[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x >> 1; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) sh.scan[threadIdx.x] += sh.scan[threadIdx.x + s];
        __syncthreads();
    }
    const u64 total = sh.scan[0];
    __syncthreads();
    return total;
}

// Radix select over the keys from the top, 8 bits a pass: the largest key t such that the count (by_mass
// false) or weight (by_mass true) of the tokens with key >= t reaches `need`. Tokens below `floor_key`
// count nothing.
__device__ unsigned int radix_select(const float* row, int vocab, float m, float inv_t, unsigned int floor_key,
                                     u64 need, bool by_mass, SampleShared& sh) {
    const int tid = threadIdx.x;
    if (tid == 0) {
        sh.prefix = 0u;
        sh.need = need;
    }
    for (int pass = 0; pass < 4; ++pass) {
        const int shift = 24 - 8 * pass;
        const unsigned int mask = pass == 0 ? 0u : (0xFFFFFFFFu << (32 - 8 * pass));
        __syncthreads();
        for (int i = tid; i < 256; i += blockDim.x) {
            sh.cnt[i] = 0u;
            sh.mass[i] = 0ull;
        }
        __syncthreads();
        const unsigned int prefix = sh.prefix;
        for (int i = tid; i < vocab; i += blockDim.x) {
            const float l = row[i];
            const unsigned int key = order_key(l);
            if (key < floor_key || (key & mask) != (prefix & mask)) continue;
            const unsigned int bin = (key >> shift) & 0xFFu;
            if (by_mass) {
                atomicAdd(&sh.mass[bin], weight(l, m, inv_t, floor_key));
            } else {
                atomicAdd(&sh.cnt[bin], 1u);
            }
        }
        __syncthreads();
        if (tid == 0) {
            u64 left = sh.need, cum = 0ull;
            int bin = 255;
            for (; bin > 0; --bin) {
                const u64 here = by_mass ? sh.mass[bin] : (u64)sh.cnt[bin];
                if (cum + here >= left) break;
                cum += here;
            }
            sh.need = left - cum;
            sh.prefix = prefix | ((unsigned int)bin << shift);
        }
    }
    __syncthreads();
    return sh.prefix;
}

// The sampled token (see the header); every thread gets it.
__device__ int block_sample(const float* row, int vocab, float temperature, int top_k, float top_p, unsigned int r,
                            SampleShared& sh) {
    const int tid = threadIdx.x;
    // the max logit (for exp) through the argmax reduction
    const float m = row[block_argmax(row, vocab, sh)];
    const float inv_t = 1.0f / temperature;
    unsigned int floor_key = 0u;
    if (top_k > 0 && top_k < vocab) floor_key = radix_select(row, vocab, m, inv_t, 0u, (u64)top_k, false, sh);
    u64 part = 0ull;
    for (int i = tid; i < vocab; i += blockDim.x) part += weight(row[i], m, inv_t, floor_key);
    u64 z = block_sum_u64(part, sh);
    if (top_p < 1.0f) {
        u64 need = (u64)ceil((double)top_p * (double)z);
        if (need < 1ull) need = 1ull;
        if (need > z) need = z;
        floor_key = radix_select(row, vocab, m, inv_t, floor_key, need, true, sh);
        part = 0ull;
        for (int i = tid; i < vocab; i += blockDim.x) part += weight(row[i], m, inv_t, floor_key);
        z = block_sum_u64(part, sh);
    }
    // target = floor(z * r / 2^32), exactly, in 64-bit pieces (z < 2^47)
    const u64 target = (z >> 32) * (u64)r + (((z & 0xFFFFFFFFull) * (u64)r) >> 32);
    // inverse CDF in index order: each thread owns a contiguous chunk
    const int chunk = (vocab + (int)blockDim.x - 1) / (int)blockDim.x;
    const int lo = tid * chunk, hi = min(lo + chunk, vocab);
    u64 mine = 0ull;
    for (int i = lo; i < hi; ++i) mine += weight(row[i], m, inv_t, floor_key);
    __syncthreads();
    sh.scan[tid] = mine;
    if (tid == 0) sh.pick = -1;
    __syncthreads();
    for (int s = 1; s < (int)blockDim.x; s <<= 1) {  // inclusive scan (Hillis-Steele)
        const u64 add = tid >= s ? sh.scan[tid - s] : 0ull;
        __syncthreads();
        sh.scan[tid] += add;
        __syncthreads();
    }
    const u64 before = sh.scan[tid] - mine;
    if (mine > 0ull && before <= target && target < before + mine) {
        u64 cum = before;
        for (int i = lo; i < hi; ++i) {
            cum += weight(row[i], m, inv_t, floor_key);
            if (cum > target) {
                sh.pick = i;
                break;
            }
        }
    }
    __syncthreads();
    return sh.pick;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_step(const float* logits, int* tokens, int* pos, int* ctl, const float* cfg, const int* prompt, int* ring,
            int* state, int vocab, int max_seq, int batch, int ring_rows) {
    __shared__ SampleShared sh;
    const int b = blockIdx.x, tid = threadIdx.x;
    if (*(volatile int*)&state[ST_DONE] != 0) return;  // stopped: a no-op (the unrolled loop's later copies)
    const int step = state[ST_STEP];
    const int p = pos[b];
    int* row_ctl = ctl + (size_t)b * 8;
    if (p >= 0) {
        const int eos = row_ctl[0], left = row_ctl[1], prompt_len = row_ctl[2], top_k = row_ctl[3];
        const bool forced = p + 1 < prompt_len;
        int next;
        if (forced) {
            next = prompt[(size_t)b * max_seq + p + 1];
        } else {
            const float* row = logits + (size_t)b * vocab;
            const float temperature = cfg[b * 2], top_p = cfg[b * 2 + 1];
            if (temperature <= 0.0f || top_k == 1) {
                next = block_argmax(row, vocab, sh);
            } else {
                unsigned int r[4];
                philox4x32_10((unsigned int)p, 0u, 0u, 0u, (unsigned int)row_ctl[4], (unsigned int)row_ctl[5], r);
                next = block_sample(row, vocab, temperature, top_k, top_p, r[0], sh);
            }
        }
        if (tid == 0) {
            if (step < ring_rows) ring[(size_t)step * batch + b] = forced ? -1 : next;
            const int now_left = forced ? left : left - 1;
            row_ctl[1] = now_left;
            const bool stop = (!forced && ((eos >= 0 && next == eos) || now_left <= 0)) || p + 1 >= max_seq;
            tokens[b] = next;
            pos[b] = stop ? -1 : p + 1;
        }
    } else if (tid == 0 && step < ring_rows) {
        ring[(size_t)step * batch + b] = -1;
    }
    if (tid == 0) {
        __threadfence();
        const int arrived = atomicAdd(&state[ST_ARRIVALS], 1);
        if (arrived == batch - 1) {  // the last row: is any still active?
            __threadfence();
            int active = 0;
            for (int r = 0; r < batch; ++r) active |= *(volatile int*)&pos[r] >= 0;
            state[ST_STEP] = step + 1;
            state[ST_DONE] = active ? 0 : 1;
            state[ST_ARRIVALS] = 0;
        }
    }
}

// Philox4x32-10 outputs for tests: out[4 * i + j] = Philox(counter = {ctr0[i], ctr1[i], ctr2[i], ctr3[i]},
// key = {k0, k1})[j].                                                      grid [ceil(n / 256)], block [256]
extern "C" __global__ void philox_outputs(const unsigned int* ctr, unsigned int* out, unsigned int k0,
                                          unsigned int k1, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    philox4x32_10(ctr[4 * i], ctr[4 * i + 1], ctr[4 * i + 2], ctr[4 * i + 3], k0, k1, out + 4 * i);
}
