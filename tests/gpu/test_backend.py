"""CudaBackend + kernels.load_module on a real GPU: explicit graphs compute the right values."""

from __future__ import annotations

import re

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

SOURCE = r"""
extern "C" __global__ void axpb(const float* x, float* y, int n, float a, float b) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + b;
}
extern "C" __global__ void fill(float* y, int n, float v) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = v;
}
extern "C" __global__ void sum2(const float* a, const float* b, float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] + b[i];
}
extern "C" __global__ void scalars(long long* out, long long a, unsigned int b, double c,
                                   unsigned long long d, int e) {
    out[0] = a; out[1] = b; out[2] = (long long)(c * 4.0); out[3] = (long long)d; out[4] = e;
}
extern "C" __global__ void smem_last(float* y, int nfloats) {
    extern __shared__ float s[];
    for (int i = threadIdx.x; i < nfloats; i += blockDim.x) s[i] = (float)i;
    __syncthreads();
    if (threadIdx.x == 0) y[0] = s[nfloats - 1];
}
"""

N = 1000
BLOCK = (256, 1, 1)
GRID = ((N + 255) // 256, 1, 1)


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


@pytest.fixture(scope="module")
def be(cp):
    from dagbuild.backends.cuda import CudaBackend

    backend = CudaBackend(0)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def funcs(be):
    from dagbuild import kernels

    mod = kernels.load_module(SOURCE, "test_backend")
    names = ("axpb", "fill", "sum2", "scalars", "smem_last")
    return {name: kernels.function_handle(mod, name) for name in names} | {"_module": mod}


@pytest.fixture
def stream(cp):
    s = cp.cuda.Stream()  # blocking: ordered after CuPy's legacy-stream fills
    yield s
    s.synchronize()


class Graphs:
    """Destroys every graph and executable a test made, even when it fails."""

    def __init__(self, be):
        self.be, self.graphs, self.execs = be, [], []

    def graph(self):
        g = self.be.graph_create()
        self.graphs.append(g)
        return g

    def instantiate(self, g):
        e = self.be.instantiate(g)
        self.execs.append(e)
        return e

    def close(self):
        for e in self.execs:
            self.be.exec_destroy(e)
        for g in self.graphs:
            self.be.graph_destroy(g)


@pytest.fixture
def graphs(be):
    g = Graphs(be)
    yield g
    g.close()


def _ids(be, nodes):
    return {be.node_id(n) for n in nodes}


def test_limits_and_meminfo(be):
    lim = be.limits()
    assert lim["name"]
    assert lim["warp_size"] == 32
    assert lim["max_threads_per_block"] == 1024
    assert lim["max_block_dim"][0] == 1024 and len(lim["max_grid_dim"]) == 3
    assert lim["max_shared_per_block"] == 48 * 1024
    assert lim["max_shared_per_block_optin"] >= lim["max_shared_per_block"]
    assert lim["multiprocessor_count"] > 0 and lim["compute_capability"] >= (7, 0)
    free, total = be.mem_get_info()
    assert 0 < free <= total


def test_h2d_kernel_d2h(be, funcs, cp, stream, graphs):
    import cupyx

    h_in = cupyx.empty_pinned((N,), dtype=np.float32)
    h_out = cupyx.empty_pinned((N,), dtype=np.float32)
    h_in[:] = np.arange(N, dtype=np.float32)
    h_out[:] = -1
    x = cp.zeros(N, dtype=cp.float32)
    y = cp.zeros(N, dtype=cp.float32)
    nbytes = N * 4

    g = graphs.graph()
    h2d = be.add_memcpy(g, [], x.data.ptr, h_in.ctypes.data, nbytes)
    k = be.add_kernel(
        g, [h2d], funcs["axpb"], GRID, BLOCK, 0,
        [("ptr", x.data.ptr), ("ptr", y.data.ptr), ("i32", N), ("f32", 2.0), ("f32", 1.0)],
    )  # fmt: skip
    d2h = be.add_memcpy(g, [k], h_out.ctypes.data, y.data.ptr, nbytes)
    exe = graphs.instantiate(g)
    be.upload(exe, stream.ptr)
    be.launch(exe, stream.ptr)
    be.synchronize(stream.ptr)
    np.testing.assert_array_equal(h_out, 2 * np.arange(N, dtype=np.float32) + 1)

    # the copies are inside the graph: new host input, same executable, new output
    h_in[:] = 5
    be.launch(exe, stream.ptr)
    be.synchronize(stream.ptr)
    np.testing.assert_array_equal(h_out, np.full(N, 11, dtype=np.float32))

    # retarget the D2H copy to another pinned buffer in place
    h_out2 = cupyx.empty_pinned((N,), dtype=np.float32)
    h_out2[:] = 0
    be.set_memcpy(exe, d2h, h_out2.ctypes.data, y.data.ptr, nbytes)
    be.launch(exe, stream.ptr)
    be.synchronize(stream.ptr)
    np.testing.assert_array_equal(h_out2, np.full(N, 11, dtype=np.float32))

    # the driver's graph is the one we added
    nodes = be.graph_nodes(g)
    assert _ids(be, nodes) == _ids(be, [h2d, k, d2h])
    assert {be.node_id(n): be.node_type(n) for n in nodes} == {
        be.node_id(h2d): "memcpy",
        be.node_id(k): "kernel",
        be.node_id(d2h): "memcpy",
    }
    assert be.node_deps(g, h2d) == []
    assert _ids(be, be.node_deps(g, k)) == _ids(be, [h2d])
    assert _ids(be, be.node_deps(g, d2h)) == _ids(be, [k])


def test_memset_patterns_byte_for_byte(be, cp, stream, graphs):
    buf = cp.zeros(64, dtype=cp.uint8)
    base = buf.data.ptr
    g = graphs.graph()
    m1 = be.add_memset(g, [], base + 0, 0xAB, 1, 16)
    m2 = be.add_memset(g, [], base + 16, 0xBEEF, 2, 8)
    m4 = be.add_memset(g, [], base + 32, 0xDEADBEEF, 4, 3)  # bytes 44..63 stay zero
    exe = graphs.instantiate(g)
    be.launch(exe, stream.ptr)
    be.synchronize(stream.ptr)
    expect = np.zeros(64, dtype=np.uint8)
    expect[0:16] = 0xAB
    expect[16:32] = np.full(8, 0xBEEF, dtype="<u2").view(np.uint8)
    expect[32:44] = np.full(3, 0xDEADBEEF, dtype="<u4").view(np.uint8)
    np.testing.assert_array_equal(cp.asnumpy(buf), expect)
    assert {be.node_type(n) for n in be.graph_nodes(g)} == {"memset"}
    assert all(be.node_deps(g, n) == [] for n in (m1, m2, m4))

    # update the 4-byte pattern in place (same width/element size: allowed)
    be.set_memset(exe, m4, base + 32, 0x01020304, 4, 3)
    be.launch(exe, stream.ptr)
    be.synchronize(stream.ptr)
    expect[32:44] = np.full(3, 0x01020304, dtype="<u4").view(np.uint8)
    np.testing.assert_array_equal(cp.asnumpy(buf), expect)


def test_diamond_with_empty_node(be, funcs, cp, stream, graphs):
    t, u, v, out = (cp.zeros(N, dtype=cp.float32) for _ in range(4))
    g = graphs.graph()
    a = be.add_kernel(g, [], funcs["fill"], GRID, BLOCK, 0, [("ptr", t.data.ptr), ("i32", N), ("f32", 3.0)])
    b = be.add_kernel(
        g, [a], funcs["axpb"], GRID, BLOCK, 0,
        [("ptr", t.data.ptr), ("ptr", u.data.ptr), ("i32", N), ("f32", 2.0), ("f32", 0.0)],
    )  # fmt: skip
    c = be.add_kernel(
        g, [a], funcs["axpb"], GRID, BLOCK, 0,
        [("ptr", t.data.ptr), ("ptr", v.data.ptr), ("i32", N), ("f32", 1.0), ("f32", 1.0)],
    )  # fmt: skip
    join = be.add_empty(g, [b, c])
    d = be.add_kernel(
        g, [join], funcs["sum2"], GRID, BLOCK, 0,
        [("ptr", u.data.ptr), ("ptr", v.data.ptr), ("ptr", out.data.ptr), ("i32", N)],
    )  # fmt: skip
    exe = graphs.instantiate(g)
    be.launch(exe, stream.ptr)
    be.synchronize(stream.ptr)
    np.testing.assert_array_equal(cp.asnumpy(out), np.full(N, 10, dtype=np.float32))  # 2*3 + (3+1)

    types = {be.node_id(n): be.node_type(n) for n in be.graph_nodes(g)}
    assert types == {
        be.node_id(a): "kernel",
        be.node_id(b): "kernel",
        be.node_id(c): "kernel",
        be.node_id(join): "empty",
        be.node_id(d): "kernel",
    }
    deps = {be.node_id(n): _ids(be, be.node_deps(g, n)) for n in (a, b, c, join, d)}
    assert deps == {
        be.node_id(a): set(),
        be.node_id(b): {be.node_id(a)},
        be.node_id(c): {be.node_id(a)},
        be.node_id(join): {be.node_id(b), be.node_id(c)},
        be.node_id(d): {be.node_id(join)},
    }

    dot = be.debug_dot(g)
    assert "digraph" in dot
    declared = set(re.findall(r'^\s*"?([A-Za-z_][\w]*node[\w]*)"?\s*\[', dot, re.M))
    assert len(declared) == 5, dot[:3000]


def test_set_kernel_changes_scalar_without_reinstantiating(be, funcs, cp, stream, graphs):
    y = cp.zeros(N, dtype=cp.float32)
    g = graphs.graph()
    k = be.add_kernel(g, [], funcs["fill"], GRID, BLOCK, 0, [("ptr", y.data.ptr), ("i32", N), ("f32", 1.0)])
    exe = graphs.instantiate(g)
    be.launch(exe, stream.ptr)
    be.synchronize(stream.ptr)
    assert float(y[0]) == 1.0 and float(y[-1]) == 1.0

    be.set_kernel(exe, k, funcs["fill"], GRID, BLOCK, 0, [("ptr", y.data.ptr), ("i32", N), ("f32", 5.0)])
    be.launch(exe, stream.ptr)
    be.synchronize(stream.ptr)
    np.testing.assert_array_equal(cp.asnumpy(y), np.full(N, 5, dtype=np.float32))

    # change the grid and the pointer too: only the first half of a new buffer
    y2 = cp.zeros(N, dtype=cp.float32)
    be.set_kernel(exe, k, funcs["fill"], (1, 1, 1), BLOCK, 0, [("ptr", y2.data.ptr), ("i32", N), ("f32", 7.0)])
    be.launch(exe, stream.ptr)
    be.synchronize(stream.ptr)
    h = cp.asnumpy(y2)
    assert (h[:256] == 7).all() and (h[256:] == 0).all()


def test_every_scalar_kind_reaches_the_kernel(be, funcs, cp, stream, graphs):
    out = cp.zeros(5, dtype=cp.int64)
    g = graphs.graph()
    be.add_kernel(
        g, [], funcs["scalars"], (1, 1, 1), (1, 1, 1), 0,
        [("ptr", out.data.ptr), ("i64", -(2**40)), ("u32", 2**32 - 1), ("f64", 2.5), ("u64", 2**62), ("i32", -3)],
    )  # fmt: skip
    exe = graphs.instantiate(g)
    be.launch(exe, stream.ptr)
    be.synchronize(stream.ptr)
    assert cp.asnumpy(out).tolist() == [-(2**40), 2**32 - 1, 10, 2**62, -3]


def test_dynamic_shared_memory_above_48k(be, funcs, cp, stream, graphs):
    lim = be.limits()
    nbytes = 64 * 1024
    if lim["max_shared_per_block_optin"] < nbytes:
        pytest.skip("device cannot opt in to 64 KiB of shared memory")
    y = cp.zeros(1, dtype=cp.float32)
    be.set_max_dynamic_shared(funcs["smem_last"], nbytes)
    g = graphs.graph()
    be.add_kernel(g, [], funcs["smem_last"], (1, 1, 1), BLOCK, nbytes, [("ptr", y.data.ptr), ("i32", nbytes // 4)])
    exe = graphs.instantiate(g)
    be.launch(exe, stream.ptr)
    be.synchronize(stream.ptr)
    assert float(y[0]) == nbytes // 4 - 1


def test_load_module_compile_error_and_missing_entry(be):
    from dagbuild import kernels
    from dagbuild.errors import BuildError, CompileError

    with pytest.raises(CompileError) as exc:
        kernels.load_module('extern "C" __global__ void f(float* y) {\n  y[0] = nope;\n}\n', "broken")
    assert exc.value.kernel == "broken" and "nope" in exc.value.log

    mod = kernels.load_module('extern "C" __global__ void g(float* y) { y[0] = 1.0f; }', "ok")
    assert kernels.function_handle(mod, "g") != 0
    with pytest.raises(BuildError) as exc2:
        kernels.function_handle(mod, "missing", kernel="ok")
    assert "'missing'" in str(exc2.value) and "'ok'" in str(exc2.value)


def test_driver_error_on_bad_launch_config_names_the_call(be, funcs, cp, stream, graphs):
    """Last in this file: a bad launch could leave an error behind."""
    from dagbuild.errors import DriverError

    y = cp.zeros(N, dtype=cp.float32)
    calls = {"cuGraphAddKernelNode", "cuGraphInstantiateWithParams", "cuGraphLaunch", "cuStreamSynchronize"}
    g = graphs.graph()
    with pytest.raises(DriverError) as exc:
        be.add_kernel(g, [], funcs["fill"], (1, 1, 1), (2048, 1, 1), 0, [("ptr", y.data.ptr), ("i32", N), ("f32", 1.0)])
        exe = graphs.instantiate(g)
        be.launch(exe, stream.ptr)
        be.synchronize(stream.ptr)
    err = exc.value
    assert err.call in calls, err
    assert str(err).startswith(f"{err.call} failed: CUDA_ERROR_")
