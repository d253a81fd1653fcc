// dagbuild: tensor-core and cluster helpers shared by the MMA/MV engines (kernels/llama_batched.cu) and the
// GEMM path's projections (kernels/gemm.cu). Include with `#include "mma.cuh"` after port.cuh.
//
// MM_HAS_MMA      1 where mma.sync / ldmatrix / cp.async exist (CUDA sm_80+), else 0
// MM_HAS_CLUSTER  1 where thread-block clusters and distributed shared memory exist (CUDA sm_90+), else 0
// CUDA only (HIP has neither; its callers take other paths):
//   MmaType<T>::pack(a, b), MmaType<T>::mma(c, a, b0, b1)   T = db_f16 | db_bf16: mma.sync.m16n8k16, f32 sums
//   mm_ldmatrix_x4 / _x2          ldmatrix.m8n8 from shared memory
//   mm_cp_wait(n)                 cp.async.wait_group with a run-time n (<= 5)
//   mm_cluster(), mm_cluster_sync(), mm_remote(p, rank), mm_ld_remote(4), mm_remote_ptr(p, rank)
//                                 cluster geometry, barrier and distributed-shared-memory loads (one block
//                                 per "cluster" below sm_90)

#pragma once

#if DB_CUDA && defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
#define MM_HAS_CLUSTER 1
#else
#define MM_HAS_CLUSTER 0
#endif
#if DB_CUDA && defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
#define MM_HAS_MMA 1
#else
#define MM_HAS_MMA 0
#endif

#if DB_CUDA
template <typename T>
struct MmaType;
template <>
struct MmaType<db_f16> {
    static __device__ __forceinline__ unsigned int pack(float a, float b) {  // a in the low half
        const __half2 h = __floats2half2_rn(a, b);
        return *reinterpret_cast<const unsigned int*>(&h);
    }
    static __device__ __forceinline__ void mma(float (&c)[4], const unsigned int (&a)[4], unsigned int b0,
                                               unsigned int b1) {
#if MM_HAS_MMA
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
        __trap();
#endif
    }
};
template <>
struct MmaType<db_bf16> {
    static __device__ __forceinline__ unsigned int pack(float a, float b) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
        return *reinterpret_cast<const unsigned int*>(&h);
    }
    static __device__ __forceinline__ void mma(float (&c)[4], const unsigned int (&a)[4], unsigned int b0,
                                               unsigned int b1) {
#if MM_HAS_MMA
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
        __trap();
#endif
    }
};

__device__ __forceinline__ void mm_ldmatrix_x4(unsigned int (&r)[4], const void* p) {
#if MM_HAS_MMA
    const unsigned int a = (unsigned int)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#else
    __trap();
#endif
}

__device__ __forceinline__ void mm_ldmatrix_x2(unsigned int& r0, unsigned int& r1, const void* p) {
#if MM_HAS_MMA
    const unsigned int a = (unsigned int)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(r0), "=r"(r1) : "r"(a));
#else
    __trap();
#endif
}

// cp.async.wait_group needs an immediate: wait until at most n groups are in flight (n <= 5; both engines)
__device__ __forceinline__ void mm_cp_wait(int n) {
    switch (n) {
        case 0: db_cp_wait<0>(); break;
        case 1: db_cp_wait<1>(); break;
        case 2: db_cp_wait<2>(); break;
        case 3: db_cp_wait<3>(); break;
        case 4: db_cp_wait<4>(); break;
        default: db_cp_wait<5>(); break;
    }
}

// Cluster geometry and distributed shared memory (sm_90); one block per "cluster" elsewhere.
struct MmCluster {
    int rank, size, id, count;
};
__device__ __forceinline__ MmCluster mm_cluster() {
#if MM_HAS_CLUSTER
    unsigned int r, n, c, nc;
    asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    asm("mov.u32 %0, %%cluster_nctarank;" : "=r"(n));
    asm("mov.u32 %0, %%clusterid.x;" : "=r"(c));
    asm("mov.u32 %0, %%nclusterid.x;" : "=r"(nc));
    return MmCluster{(int)r, (int)n, (int)c, (int)nc};
#else
    return MmCluster{0, 1, (int)blockIdx.x, (int)gridDim.x};
#endif
}
__device__ __forceinline__ void mm_cluster_sync() {  // every thread of every block of the cluster
#if MM_HAS_CLUSTER
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#else
    __syncthreads();
#endif
}
// every thread of every block of the cluster got here, with no memory ordering (no fence: a release would wait
// for this thread's outstanding global stores); for "the others are done reading my shared memory" where each
// thread used what it loaded before arriving
__device__ __forceinline__ void mm_cluster_sync_relaxed() {
#if MM_HAS_CLUSTER
    asm volatile("barrier.cluster.arrive.relaxed.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory");
#else
    __syncthreads();
#endif
}
// the address of `p` (this block's shared memory) in block `rank` of the cluster
__device__ __forceinline__ unsigned int mm_remote(const void* p, int rank) {
#if MM_HAS_CLUSTER
    unsigned int out;
    const unsigned int a = (unsigned int)__cvta_generic_to_shared(p);
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(out) : "r"(a), "r"(rank));
    return out;
#else
    return (unsigned int)__cvta_generic_to_shared(p);
#endif
}
// the generic address of `p` (this block's shared memory) in block `rank` of the cluster: plain C++ loads through
// it read distributed shared memory, and the compiler schedules them like any load (batched, kept after barriers)
template <typename T>
__device__ __forceinline__ const T* mm_remote_ptr(const T* p, int rank) {
#if MM_HAS_CLUSTER
    unsigned long long out;
    asm("mapa.u64 %0, %1, %2;" : "=l"(out) : "l"(p), "r"(rank));
    return reinterpret_cast<const T*>(out);
#else
    (void)rank;
    return p;
#endif
}
__device__ __forceinline__ float4 mm_ld_remote4(unsigned int a) {
    float4 v;
#if MM_HAS_CLUSTER
    asm volatile("ld.shared::cluster.v4.f32 {%0,%1,%2,%3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(a) : "memory");
#else
    asm volatile("ld.shared.v4.f32 {%0,%1,%2,%3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(a) : "memory");
#endif
    return v;
}
__device__ __forceinline__ float mm_ld_remote(unsigned int a) {
    float v;
#if MM_HAS_CLUSTER
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(a) : "memory");
#else
    asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(a) : "memory");
#endif
    return v;
}

#endif  // DB_CUDA
