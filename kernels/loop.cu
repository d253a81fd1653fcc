// dagbuild's loop kernels: they drive the CUDA WHILE conditional node of a spec's `loop` node.
//
// A loop node {max, until} becomes, in the parent graph, `loop_enter` then the WHILE node; its body graph
// holds the body's nodes and `loop_next`, after every body node that writes `until`. Both set the WHILE
// node's condition: the body runs again while until[0] == 0 (no until: always) and fewer than `max`
// iterations ran. `counter` is the loop's own iteration count (a 4-byte buffer the plan adds).
// cudaGraphSetConditional is declared by hand (NVRTC has no cuda_runtime.h); it needs no -rdc.
// HIP has no conditional nodes: dagbuild unrolls the body there and never launches these kernels, which
// then compile to plain counter updates.

#include "port.cuh"

#if DB_CUDA
typedef unsigned long long cudaGraphConditionalHandle;
extern "C" __device__ __cudart_builtin__ void cudaGraphSetConditional(cudaGraphConditionalHandle handle,
                                                                      unsigned int value);
#define DB_SET_CONDITIONAL(h, v) cudaGraphSetConditional((h), (v))
#else
#define DB_SET_CONDITIONAL(h, v) \
    do {                         \
        (void)(h);               \
        (void)(v);               \
    } while (0)
#endif

// Before the loop: no iteration yet; the body runs at all only if `until` is still zero.  grid [1], block [1]
extern "C" __global__ void loop_enter(const int* until, int* counter, unsigned long long handle, int max) {
    counter[0] = 0;
    const bool go = max > 0 && (until == nullptr || until[0] == 0);
    DB_SET_CONDITIONAL(handle, go ? 1u : 0u);
}

// At the end of an iteration (after the body's writes of `until`).  grid [1], block [1]
extern "C" __global__ void loop_next(const int* until, int* counter, unsigned long long handle, int max) {
    const int done = counter[0] + 1;
    counter[0] = done;
    const bool go = done < max && (until == nullptr || until[0] == 0);
    DB_SET_CONDITIONAL(handle, go ? 1u : 0u);
}
