"""Child-graph nodes on a GPU: a cuBLAS GEMM recorded by stream capture computes what NumPy does, as one
driver node of type graph; rebind re-records it; eager steps and pool buckets agree."""

from __future__ import annotations

import numpy as np
import pytest

from dagbuild import plan
from dagbuild.dsl import SpecBuilder
from dagbuild.executable import Executable
from dagbuild.pool import GraphPool

pytestmark = pytest.mark.gpu

SCALE = r"""extern "C" __global__ void scale(float* y, int n, float s) {
    int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) y[i] *= s; }"""


def _spec(dt: str, beta: float = 0.0):
    g = SpecBuilder("childgemm", dims={"m": 48, "n": 40, "k": 64})
    g.kernel("scale", code=SCALE, entry="scale", params=["f32* y", "i32 n", "f32 s"])
    g.buffer("a", dt, ["m", "k"]).buffer("w", dt, [2, "n", "k"]).buffer("y", "f32", ["m", "n"])
    g.buffer("ws", "u8", [1 << 22])
    g.child("mm", reads=["a", "w[1]"], writes=["y", "ws"],
            body=[{"call": "gemm", "args": {"a": "a", "b": "w[1]", "c": "y", "m": "m", "n": "n", "k": "k",
                                             "beta": beta, "workspace": "ws"}}])
    g.launch("half", "scale", grid=["ceil_div(m * n, 128)"], block=[128], args={"y": "y", "n": "m * n", "s": 0.5})
    return g.spec()


def _ref(a, w, y0, beta):
    return 0.5 * (a.astype(np.float64) @ w.astype(np.float64).T + beta * y0)


@pytest.mark.parametrize("dt", ["f32", "f16"])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_gemm_child_matches_numpy(dt, beta):
    import cupy

    rng = np.random.default_rng(0)
    npdt = {"f32": np.float32, "f16": np.float16}[dt]
    with Executable(plan(_spec(dt, beta))) as exe:
        kinds, _ = exe.driver_graph()
        assert kinds["mm"] == "graph" and kinds["half"] == "kernel"
        a = rng.standard_normal((48, 64)).astype(npdt)
        w = rng.standard_normal((2, 40, 64)).astype(npdt)
        y0 = rng.standard_normal((48, 40)).astype(np.float32)
        exe.buffers["a"][...] = cupy.asarray(a)
        exe.buffers["w"][...] = cupy.asarray(w)
        exe.buffers["y"][...] = cupy.asarray(y0)
        cupy.cuda.Device().synchronize()
        exe.launch(sync=True)
        tol = 1e-5 if dt == "f32" else 1e-3
        np.testing.assert_allclose(exe.buffers["y"].get(), _ref(a, w[1], y0, beta), rtol=tol, atol=tol)
        # eager steps (no graph) run the same GEMM
        exe.buffers["y"][...] = cupy.asarray(y0)
        cupy.cuda.Device().synchronize()
        for step in exe.eager_steps():
            step(exe.stream)
        exe.synchronize()
        np.testing.assert_allclose(exe.buffers["y"].get(), _ref(a, w[1], y0, beta), rtol=tol, atol=tol)
        # rebind re-records the child graph with the new address, in place
        a2 = cupy.asarray(rng.standard_normal((48, 64)).astype(npdt))
        exe.rebind("a", a2)
        exe.buffers["y"][...] = cupy.asarray(y0)
        cupy.cuda.Device().synchronize()
        exe.launch(sync=True)
        np.testing.assert_allclose(exe.buffers["y"].get(), _ref(a2.get(), w[1], y0, beta), rtol=tol, atol=tol)


def test_gemm_child_in_pool_buckets():
    """One child graph per bucket of m (recorded per bucket: cuBLAS may pick other kernels per shape)."""
    import cupy

    rng = np.random.default_rng(1)
    with GraphPool(_spec("f32"), {"m": [8, 48]}) as pool:
        for m in (8, 48):
            exe = pool.get(m=m)
            a = rng.standard_normal((m, 64)).astype(np.float32)
            w = rng.standard_normal((2, 40, 64)).astype(np.float32)
            exe.buffers["a"][...] = cupy.asarray(a)
            exe.buffers["w"][...] = cupy.asarray(w)
            cupy.cuda.Device().synchronize()
            exe.launch(sync=True)
            np.testing.assert_allclose(exe.buffers["y"].get(), _ref(a, w[1], 0, 0.0), rtol=1e-5, atol=1e-5)


def test_closing_frees_the_backend_it_made():
    """An executable or pool that made its own backend frees the BLAS handle and capture stream when it
    closes; a backend given to it stays the giver's, still usable."""
    from dagbuild.backends import get_backend

    with Executable(plan(_spec("f32"))) as exe:
        exe.launch(sync=True)
        be = exe.backend
        assert be._blas is not None and be._capture_stream is not None
    assert be._blas is None and be._capture_stream is None
    with GraphPool(_spec("f32"), {"m": [8, 48]}) as pool:
        be = pool.backend
        assert be._blas is not None
    assert be._blas is None and be._capture_stream is None
    mine = get_backend("auto", 0)
    try:
        with Executable(plan(_spec("f32")), backend=mine) as exe:
            exe.launch(sync=True)
        assert mine._blas is not None  # not ours to close
        with Executable(plan(_spec("f32")), backend=mine) as exe:
            exe.launch(sync=True)  # and still usable
    finally:
        mine.close()
