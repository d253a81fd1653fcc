// Small kernels for the example specs (chain, diamond, fan-out, layers) and the graph benchmarks.
// Portable CUDA/HIP C++ on kernels/port.cuh: no inline PTX; warp width from warpSize.
#include "port.cuh"

// y = a*x + y, element-wise over n floats.
extern "C" __global__ void saxpy(float a, const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}

// y = a*x, element-wise.
extern "C" __global__ void scale(const float* x, float* y, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i];
}

// out = a + b, element-wise.
extern "C" __global__ void add(const float* a, const float* b, float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] + b[i];
}

// y = x iterated `iters` times through t -> t*0.999 + 0.001: a latency-bound step whose duration is
// set by `iters`, for showing that independent branches run at once.
extern "C" __global__ void spin(const float* x, float* y, int n, int iters) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float t = x[i];
    for (int k = 0; k < iters; ++k) t = fmaf(t, 0.999f, 0.001f);
    y[i] = t;
}

// y[b, :] = W[n, n] . x[b, :] with f16 weights, f32 accumulation: one warp per output row.
extern "C" __global__ void gemv_f16(const db_f16* w, const float* x, float* y, int n, int batch) {
    int warps = blockDim.x / warpSize;
    int row = blockIdx.x * warps + threadIdx.x / warpSize;
    int lane = threadIdx.x % warpSize;
    if (row >= n) return;
    for (int b = 0; b < batch; ++b) {
        float acc = 0.f;
        for (int k = lane; k < n; k += warpSize) acc += to_float(w[(size_t)row * n + k]) * x[(size_t)b * n + k];
        for (int off = warpSize / 2; off > 0; off /= 2) acc += db_shfl_xor(acc, off);
        if (lane == 0) y[(size_t)b * n + row] = acc;
    }
}
