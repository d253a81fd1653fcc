// dagbuild: the kernels' portability header (CUDA through NVRTC/CuPy, HIP through hiprtc).
//
// Kernel sources include it with `#include "port.cuh"` (quoted form, so dagbuild.sources.read_kernel_source
// inlines it: every compiler then sees one self-contained text) and include no CUDA-only header themselves.
// On CUDA every helper below is exactly the CUDA intrinsic it replaces (same operations, same order), so
// the generated PTX does not change; on HIP it needs no header at all (hiprtc's built-in runtime suffices).
//
// API
// ---------------------------------------------------------------------------------------------------------
// Platform       DB_HIP / DB_CUDA            1 on that platform, else 0 (DB_HIP: __HIP__, __HIPCC__ or
//                                            __HIP_PLATFORM_AMD__ defined).
// Types          db_f16                      IEEE binary16: CUDA __half, HIP _Float16.
//                db_bf16                     bfloat16: CUDA __nv_bfloat16, HIP a 2-byte struct {bits}.
//                                            Both are storage types: convert to float to compute.
// Conversions    float to_float(float | db_f16 | db_bf16)          exact
//                T from_float<T>(float), T in float/db_f16/db_bf16  round to nearest even
//                float db_f16_bits_to_float(unsigned int h)         low 16 bits of h as a binary16
//                float db_bf16_bits_to_float(unsigned int h)        low 16 bits of h as a bfloat16 (exact)
// Constants      DB_NEG_INF                  -inf as a float (NVRTC has no INFINITY)
//                DB_FULL_MASK                0xffffffff, the CUDA full-warp mask (unused on HIP)
//                DB_MAX_WARPS                32: warps per block at most (1024 threads / 32); size
//                                            per-warp shared arrays with it, never with a warp width
// Warp           T db_shfl_xor(T v, int o)   v of lane (lane ^ o) across the whole warp/wavefront
//                                            (warpSize lanes: 32 on NVIDIA, 64 on CDNA, 32 or 64 on RDNA);
//                                            T float or int. CUDA: __shfl_xor_sync(DB_FULL_MASK, v, o);
//                                            HIP: __shfl_xor(v, o). Every lane of the warp must call it.
//                T db_shfl(T v, int src)     v of lane src (a broadcast), the same way: __shfl_sync / __shfl
//                float db_warp_sum(float v)  butterfly sum / max over warpSize lanes, offsets warpSize/2,
//                float db_warp_max(float v)  ..., 1 (the run-time warpSize): result in every lane
//                float db_block_sum(float v, float* sh)   block-wide sum / max, result in every thread;
//                float db_block_max(float v, float* sh)   sh: DB_MAX_WARPS floats of shared memory; starts
//                                            with a barrier so sh may be reused by consecutive calls;
//                                            blockDim.x a multiple of warpSize; warps summed in order
// Loads          __ldg(p)                    read-only cached load: CUDA's own, HIP's plain load (portable)
//                T db_ldg(const T* p)        __ldg for every element type (CUDA's own overloads, f16 and
//                                            bf16 included); HIP a plain load
//                T db_ldca(const T* p)       load cached in all levels / in L2 only (data another grid
//                T db_ldcg(const T* p)       wrote: never the read-only path): CUDA __ldca / __ldcg,
//                                            HIP a plain load
// Dependent launch (programmatic edges)
//                DB_GRID_WAIT()              CUDA sm_90+: griddepcontrol.wait (memory clobber): wait for the
//                                            producer grids to complete and flush; call before reading
//                                            their output. A no-op on HIP and below sm_90.
//                DB_GRID_TRIGGER()           CUDA sm_90+: griddepcontrol.launch_dependents: dependents may
//                                            start launching now. A no-op on HIP and below sm_90.
// Launch         unsigned db_dynamic_smem()  the launch's dynamic shared memory in bytes (CUDA: the
//                                            %dynamic_smem_size register); 0 on HIP, where it is unknown:
//                                            callers fall back to what needs none or the least.
// Async copies   db_cp_async16(dst, src, full)  16 bytes global -> shared (cp.async.cg, CUDA sm_80+;
//                                            zero-fills when !full); db_cp_commit(), db_cp_wait<N>():
//                                            close a group / wait until <= N groups are in flight.
//                                            Elsewhere a synchronous copy and no-ops.
// Not here: no inline PTX outside these macros and helpers; warp width never a literal 32.

#pragma once

#if defined(__HIP__) || defined(__HIPCC__) || defined(__HIP_PLATFORM_AMD__)
#define DB_HIP 1
#define DB_CUDA 0
#else
#define DB_HIP 0
#define DB_CUDA 1
#endif

#if DB_CUDA
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

#define DB_FULL_MASK 0xffffffffu
#define DB_NEG_INF __int_as_float(0xff800000)  // -inf (NVRTC has no math.h INFINITY)
#define DB_MAX_WARPS 32

// ------------------------------------------------------------------------------------------------------------
// Types and conversions
// ------------------------------------------------------------------------------------------------------------

#if DB_CUDA
typedef __half db_f16;
typedef __nv_bfloat16 db_bf16;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float db_f16_bits_to_float(unsigned int h) {
    return __half2float(__ushort_as_half((unsigned short)h));
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

#else  // HIP: clang's _Float16 and a bit-level bfloat16; no header needed

typedef _Float16 db_f16;
struct __attribute__((aligned(2))) db_bf16 {
    unsigned short bits;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(_Float16 v) { return (float)v; }
__device__ __forceinline__ float to_float(db_bf16 v) { return __uint_as_float((unsigned int)v.bits << 16); }

__device__ __forceinline__ float db_f16_bits_to_float(unsigned int h) {
    return (float)__builtin_bit_cast(_Float16, (unsigned short)h);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ _Float16 from_float<_Float16>(float v) { return (_Float16)v; }
template <>
__device__ __forceinline__ db_bf16 from_float<db_bf16>(float v) {
    unsigned int u = __float_as_uint(v);
    db_bf16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (unsigned short)((u >> 16) | 0x40u);  // NaN stays a (quiet) NaN
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
        r.bits = (unsigned short)(u >> 16);
    }
    return r;
}
#endif

// bf16 -> f32 is exact: the bf16 bits are the high half of the f32.
__device__ __forceinline__ float db_bf16_bits_to_float(unsigned int h) { return __uint_as_float((h & 0xffffu) << 16); }

// ------------------------------------------------------------------------------------------------------------
// Warp and block reductions (run-time warpSize; correct for 32- and 64-lane warps)
// ------------------------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T db_shfl_xor(T v, int o) {
#if DB_CUDA
    return __shfl_xor_sync(DB_FULL_MASK, v, o);
#else
    return __shfl_xor(v, o);
#endif
}

template <typename T>
__device__ __forceinline__ T db_shfl(T v, int src) {
#if DB_CUDA
    return __shfl_sync(DB_FULL_MASK, v, src);
#else
    return __shfl(v, src);
#endif
}

// The reductions' operators: a butterfly over the warp, then one value per warp through shared memory.
struct DbSum {
    __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct DbMax {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename Op>
__device__ __forceinline__ float db_warp_reduce(float v, Op op) {
    for (int o = warpSize >> 1; o > 0; o >>= 1) v = op(v, db_shfl_xor(v, o));
    return v;
}

__device__ __forceinline__ float db_warp_sum(float v) { return db_warp_reduce(v, DbSum{}); }
__device__ __forceinline__ float db_warp_max(float v) { return db_warp_reduce(v, DbMax{}); }

// Block-wide sum / max, result returned to every thread. `sh` holds one float per warp (DB_MAX_WARPS
// entries cover 1024 threads at warpSize 32 and any block at warpSize 64). Starts with a barrier so `sh`
// may be reused by consecutive calls. blockDim.x must be a multiple of warpSize.
template <typename Op>
__device__ __forceinline__ float db_block_reduce(float v, float* sh, Op op) {
    const int lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize, nwarps = blockDim.x / warpSize;
    v = db_warp_reduce(v, op);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    float r = sh[0];
    for (int w = 1; w < nwarps; ++w) r = op(r, sh[w]);
    return r;
}

__device__ __forceinline__ float db_block_sum(float v, float* sh) { return db_block_reduce(v, sh, DbSum{}); }
__device__ __forceinline__ float db_block_max(float v, float* sh) { return db_block_reduce(v, sh, DbMax{}); }

// Abort the kernel (the launch fails with an error at the next synchronize) where a precondition the host checks
// first does not hold: never a hang, never a silent wrong result.
#if DB_CUDA
#define DB_TRAP() __trap()
#else
#define DB_TRAP() __builtin_trap()
#endif

// ------------------------------------------------------------------------------------------------------------
// Programmatic dependent launch (CUDA sm_90+ only)
// ------------------------------------------------------------------------------------------------------------

#if DB_CUDA && defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
#define DB_GRID_WAIT() asm volatile("griddepcontrol.wait;" ::: "memory")
#define DB_GRID_TRIGGER() asm volatile("griddepcontrol.launch_dependents;")
#else
#define DB_GRID_WAIT() \
    do {               \
    } while (0)
#define DB_GRID_TRIGGER() \
    do {                  \
    } while (0)
#endif

// Block trace (diagnostics, tools/blocktrace.py): compiled with -DDB_BLOCKTRACE, a kernel that opens with
// DB_TRACE_BLOCK() appends one record per warp to db_trace_buf (set by the host through the module's globals):
// [start, past the grid-dependency wait (DB_TRACE_WAITED), mark 1, mark 2, exit, smid << 32 | block << 8 | warp],
// %globaltimer nanoseconds, 0 where a point was not reached; DB_TRACE_MARK(1 or 2) stamps a kernel's own points
// of interest. Lane 0 takes its slot with an atomic whose result is first used at the exit, so the trace
// adds no round trip to the kernel's path. Without -DDB_BLOCKTRACE the macros are empty.
#if defined(DB_BLOCKTRACE) && DB_CUDA
__device__ unsigned long long* db_trace_buf;
__device__ unsigned int db_trace_cap;
__device__ unsigned int* db_trace_n;  // shared by every module of the graph: one order of records
__shared__ unsigned long long db_trace_t[3][32];  // per warp: waited, mark 1, mark 2

__device__ __forceinline__ unsigned long long db_globaltimer() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)::"memory");
    return t;
}

__device__ __forceinline__ unsigned int db_trace_warp() {
    return (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) / warpSize;
}

struct DbBlockTrace {
    unsigned long long t0;
    unsigned int slot = 0xffffffffu;
    __device__ DbBlockTrace() : t0(db_globaltimer()) {
        if (threadIdx.x % warpSize == 0) {
            slot = atomicAdd(db_trace_n, 1u);
            for (int i = 0; i < 3; ++i) db_trace_t[i][db_trace_warp()] = 0;
        }
    }
    __device__ static void mark(int i) {  // 0: waited; 1, 2: the kernel's marks (the first time reached)
        if (threadIdx.x % warpSize == 0 && db_trace_t[i][db_trace_warp()] == 0)
            db_trace_t[i][db_trace_warp()] = db_globaltimer();
    }
    __device__ ~DbBlockTrace() {
        if (threadIdx.x % warpSize != 0) return;
        const unsigned long long t4 = db_globaltimer();
        if (slot >= db_trace_cap) return;
        unsigned int smid;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
        const unsigned int w = db_trace_warp();
        const unsigned long long block = blockIdx.x + gridDim.x * (blockIdx.y + (unsigned long long)gridDim.y * blockIdx.z);
        unsigned long long* r = db_trace_buf + 6 * (size_t)slot;
        r[0] = t0;
        r[1] = db_trace_t[0][w];
        r[2] = db_trace_t[1][w];
        r[3] = db_trace_t[2][w];
        r[4] = t4;
        r[5] = ((unsigned long long)smid << 32) | (block << 8) | w;
    }
};
#define DB_TRACE_BLOCK() DbBlockTrace db_block_trace_
#define DB_TRACE_WAITED() DbBlockTrace::mark(0)
#define DB_TRACE_MARK(i) DbBlockTrace::mark(i)
#else
#define DB_TRACE_BLOCK() \
    do {                 \
    } while (0)
#define DB_TRACE_WAITED() \
    do {                  \
    } while (0)
#define DB_TRACE_MARK(i) \
    do {                 \
    } while (0)
#endif

// ------------------------------------------------------------------------------------------------------------
// Cache-hinted loads of produced data
// ------------------------------------------------------------------------------------------------------------

#if DB_CUDA
template <typename T>
__device__ __forceinline__ T db_ldg(const T* p) { return __ldg(p); }
template <typename T>
__device__ __forceinline__ T db_ldca(const T* p) { return __ldca(p); }
template <typename T>
__device__ __forceinline__ T db_ldcg(const T* p) { return __ldcg(p); }
#else
template <typename T>
__device__ __forceinline__ T db_ldg(const T* p) { return *p; }
template <typename T>
__device__ __forceinline__ T db_ldca(const T* p) { return *p; }
template <typename T>
__device__ __forceinline__ T db_ldcg(const T* p) { return *p; }
#endif

// The launch's dynamic shared memory in bytes; 0 on HIP (unknown there).
__device__ __forceinline__ unsigned int db_dynamic_smem() {
#if DB_CUDA
    unsigned int r;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
#else
    return 0u;
#endif
}

// ------------------------------------------------------------------------------------------------------------
// Asynchronous 16-byte global -> shared copies (cp.async, CUDA sm_80+): a copy lands in shared memory without
// passing through registers, so a warp can keep many more weight bytes in flight than its registers hold.
// db_cp_async16(dst, src, full): copies 16 bytes, or writes 16 zero bytes when !full (src is then not read).
// db_cp_commit() closes a group of copies; db_cp_wait<N>() waits until at most N groups are still in flight
// (the copies of the issuing thread: a lane that reads back only what it copied itself needs no barrier).
// Elsewhere (HIP, older archs) the copy is synchronous and the group calls are no-ops.
// ------------------------------------------------------------------------------------------------------------

__device__ __forceinline__ void db_cp_async16(void* dst, const void* src, bool full) {
#if DB_CUDA && defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    const unsigned int d = (unsigned int)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(full ? 16 : 0)
                 : "memory");
#else
    *reinterpret_cast<uint4*>(dst) = full ? *reinterpret_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
#endif
}

// db_cp_async16_once: as db_cp_async16, for bytes a step reads once (weights). With DB_EVICT_FIRST (the fused
// spec's batch-1 forms set it) the copy tells L2 to evict its lines first, so the step's weight stream (gigabytes,
// far beyond L2) does not push out what later kernels reuse: KV rows, activations, the kernels' own code.
#ifndef DB_EVICT_FIRST
#define DB_EVICT_FIRST 0
#endif
__device__ __forceinline__ void db_cp_async16_once(void* dst, const void* src, bool full) {
#if DB_EVICT_FIRST && DB_CUDA && defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    const unsigned int d = (unsigned int)__cvta_generic_to_shared(dst);
    unsigned long long policy;
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;" ::"r"(d), "l"(src),
                 "r"(full ? 16 : 0), "l"(policy)
                 : "memory");
#else
    db_cp_async16(dst, src, full);
#endif
}

__device__ __forceinline__ void db_cp_commit() {
#if DB_CUDA && defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void db_cp_wait() {
#if DB_CUDA && defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}
