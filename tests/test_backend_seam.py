"""The backend's CPU-side pieces: kernel-argument packing, the kernel-node struct, the HIP seam, and
``get_backend``'s import behaviour. No GPU, no driver library: cuda-bindings structs are plain memory."""

from __future__ import annotations

import ctypes
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from dagbuild.backends import cuda as cuda_backend
from dagbuild.backends.cuda import ARG_KINDS, CudaBackend, pack_args
from dagbuild.errors import BuildError, DagbuildError


def _read(packed, i: int, ctype):
    """Read argument ``i`` back through the void* array, as the driver would."""
    ptr = packed.argv[i]
    return ctypes.cast(ptr, ctypes.POINTER(ctype)).contents.value


def test_pack_args_values_read_back_through_void_star_array():
    args = [
        ("ptr", 0x7F00_DEAD_BEEF),
        ("i32", -7),
        ("u32", 2**32 - 1),
        ("i64", -(2**40)),
        ("u64", 2**64 - 1),
        ("f32", 1.5),
        ("f64", -0.1),
    ]
    packed = pack_args(args)
    assert len(packed) == 7
    assert packed.address == ctypes.addressof(packed.argv)
    for i, (kind, value) in enumerate(args):
        got = _read(packed, i, ARG_KINDS[kind])
        if kind == "f32":
            assert got == pytest.approx(value)
        else:
            assert got == value
    # the array entries point exactly at the storage
    assert [packed.argv[i] for i in range(7)] == [ctypes.addressof(s) for s in packed.storage]
    # the void** seen from its integer address
    argv = ctypes.cast(packed.address, ctypes.POINTER(ctypes.c_void_p))
    assert ctypes.cast(argv[1], ctypes.POINTER(ctypes.c_int32)).contents.value == -7
    # sizes the driver copies
    assert [ctypes.sizeof(s) for s in packed.storage] == [8, 4, 4, 8, 8, 4, 8]


def test_pack_args_empty_is_null():
    assert pack_args([]).address == 0


def test_pack_args_accepts_numpy_scalars():
    np = pytest.importorskip("numpy")
    packed = pack_args([("i32", np.int32(-3)), ("u64", np.uint64(2**63)), ("f32", np.float32(0.5))])
    assert _read(packed, 0, ctypes.c_int32) == -3
    assert _read(packed, 1, ctypes.c_uint64) == 2**63
    assert _read(packed, 2, ctypes.c_float) == 0.5


@pytest.mark.parametrize(
    "arg",
    [
        ("i32", 2**31),
        ("i32", -(2**31) - 1),
        ("u32", -1),
        ("ptr", -1),
        ("u64", 2**64),
        ("i32", 1.5),
        ("f32", "x"),
    ],
)
def test_pack_args_rejects_out_of_range_or_wrong_type(arg):
    with pytest.raises(BuildError) as exc:
        pack_args([arg])
    assert exc.value.code == "args" and arg[0] in str(exc.value)


def test_pack_args_rejects_unknown_kind():
    with pytest.raises(BuildError, match="unknown kind 'f16'"):
        pack_args([("f16", 1.0)])


def test_dim3_padding_and_checks():
    assert cuda_backend._dim3("grid", (4,)) == (4, 1, 1)
    assert cuda_backend._dim3("block", [32, 8]) == (32, 8, 1)
    with pytest.raises(BuildError):
        cuda_backend._dim3("grid", (0, 1, 1))
    with pytest.raises(BuildError):
        cuda_backend._dim3("grid", (1, 1, 1, 1))


# -- the struct seam (needs cuda-bindings, not a GPU) ----------------------------------------------------


@pytest.fixture
def driver():
    try:
        drv = cuda_backend.load_driver()
    except DagbuildError as e:
        pytest.skip(str(e))
    if getattr(drv, "HIP_PYTHON", False):
        pytest.skip("CUDA struct tests need NVIDIA's cuda-bindings; this is HIP Python's interop layer "
                    "(tests/test_hip_python.py covers it)")
    return drv


def _bare_backend(cls, driver):
    """A backend object without __init__ (which needs CuPy and a device): enough for struct builders."""
    be = cls.__new__(cls)
    be._drv = driver
    return be


def test_cuda_kernel_params_fields(driver):
    be = _bare_backend(CudaBackend, driver)
    packed = pack_args([("ptr", 0x1000), ("i32", 5)])
    p = be._kernel_params(0xABC0, (7, 3, 2), (128, 2, 1), 4096, packed.address)
    assert isinstance(p, driver.CUDA_KERNEL_NODE_PARAMS)
    assert int(p.func) == 0xABC0
    assert (p.gridDimX, p.gridDimY, p.gridDimZ) == (7, 3, 2)
    assert (p.blockDimX, p.blockDimY, p.blockDimZ) == (128, 2, 1)
    assert p.sharedMemBytes == 4096
    assert int(p.kernelParams) == packed.address
    assert int(p.extra) == 0


def test_kernel_node_builder_pads_dims_and_keeps_storage(driver):
    be = _bare_backend(CudaBackend, driver)
    p, packed = be._kernel_node(0x10, (9,), [64, 4], 0, [("f32", 2.0)])
    assert (p.gridDimX, p.gridDimY, p.gridDimZ) == (9, 1, 1)
    assert (p.blockDimX, p.blockDimY, p.blockDimZ) == (64, 4, 1)
    assert int(p.kernelParams) == packed.address
    assert _read(packed, 0, ctypes.c_float) == 2.0
    with pytest.raises(BuildError):
        be._kernel_node(0x10, (1,), (1,), -1, [])


def test_memcpy_and_memset_structs(driver):
    be = _bare_backend(CudaBackend, driver)
    c = be._memcpy_params(dst=0x2000, src=0x1000, nbytes=256)
    assert c.srcMemoryType == driver.CUmemorytype.CU_MEMORYTYPE_UNIFIED
    assert c.dstMemoryType == driver.CUmemorytype.CU_MEMORYTYPE_UNIFIED
    assert (int(c.srcDevice), int(c.dstDevice)) == (0x1000, 0x2000)
    assert (c.WidthInBytes, c.Height, c.Depth) == (256, 1, 1)
    assert (c.srcPitch, c.dstPitch) == (256, 256)
    with pytest.raises(BuildError):
        be._memcpy_params(0x2000, 0x1000, 0)

    m = be._memset_params(dst=0x3000, value=0xBEEF, element_size=2, count=10)
    assert (int(m.dst), m.value, m.elementSize, m.width, m.height) == (0x3000, 0xBEEF, 2, 10, 1)
    with pytest.raises(BuildError, match="element size"):
        be._memset_params(0x3000, 0, 8, 10)
    with pytest.raises(BuildError, match="does not fit"):
        be._memset_params(0x3000, 0x100, 1, 10)
    with pytest.raises(BuildError):
        be._memset_params(0x3000, 0, 4, 0)


def test_check_raises_driver_error_with_call_name(driver):
    from dagbuild.errors import DriverError

    be = _bare_backend(CudaBackend, driver)
    assert be._check("cuX", (driver.CUresult.CUDA_SUCCESS,)) is None
    assert be._check("cuX", (driver.CUresult.CUDA_SUCCESS, 5)) == 5
    assert be._check("cuX", (driver.CUresult.CUDA_SUCCESS, 5, 6)) == (5, 6)
    with pytest.raises(DriverError) as exc:
        be._check("cuGraphLaunch", (driver.CUresult.CUDA_ERROR_INVALID_VALUE,))
    assert exc.value.call == "cuGraphLaunch"
    assert "CUDA_ERROR_INVALID_VALUE" in exc.value.status
    assert str(exc.value).startswith("cuGraphLaunch failed: CUDA_ERROR_INVALID_VALUE")


def test_hip_backend_overrides_only_the_kernel_and_memcpy_structs():
    from dagbuild.backends.hip import HipBackend

    assert issubclass(HipBackend, CudaBackend)
    overridden = {k for k, v in vars(HipBackend).items() if callable(v) and not k.startswith("__")}
    assert overridden == {"_kernel_params", "_memcpy_params"}  # see tests/test_hip_python.py for why
    assert HipBackend.conditional_nodes is False and CudaBackend.conditional_nodes is True
    assert HipBackend.name == "hip"


def test_hip_kernel_params_uses_dim3_fields():
    """The HIP struct builder against a stand-in module (tests/test_hip_python.py uses hip-python's own
    types where it is installed)."""
    from types import SimpleNamespace

    from dagbuild.backends.hip import hip_kernel_params

    class Dim3:
        def __init__(self, x=1, y=1, z=1):
            self.x, self.y, self.z = x, y, z

    class Params:  # like hip-python's: dim3 fields exist and are set in place
        def __init__(self):
            self.gridDim, self.blockDim = Dim3(), Dim3()

    fake = SimpleNamespace(CUDA_KERNEL_NODE_PARAMS=Params)
    p = hip_kernel_params(fake, 0x99, (4, 5, 6), (32, 2, 1), 128, 0x1234)
    assert (p.gridDim.x, p.gridDim.y, p.gridDim.z) == (4, 5, 6)
    assert (p.blockDim.x, p.blockDim.y, p.blockDim.z) == (32, 2, 1)
    assert (p.func, p.sharedMemBytes, p.kernelParams, p.extra) == (0x99, 128, 0x1234, 0)
    assert not hasattr(p, "gridDimX")


# -- imports and backend selection -------------------------------------------------------------------


def test_backends_import_without_gpu_packages():
    """Importing dagbuild.backends (and its modules) must not import cupy or cuda-bindings."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'cupy' or name.startswith(('cupy.', 'cuda')):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import dagbuild.backends, dagbuild.backends.cuda, dagbuild.backends.hip, dagbuild.kernels\n"
        "from dagbuild.errors import DagbuildError\n"
        "try:\n"
        "    dagbuild.backends.get_backend('auto')\n"
        "except DagbuildError as e:\n"
        "    print('ERR', e)\n"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    assert "ERR no GPU backend available" in out
    assert "pip install 'dagbuild[cuda13]'" in out


def test_get_backend_rejects_unknown_name():
    backends = importlib.import_module("dagbuild.backends")
    with pytest.raises(DagbuildError, match="unknown backend"):
        backends.get_backend("metal")


def test_get_backend_cuda_without_cupy_says_what_to_install(monkeypatch):
    backends = importlib.import_module("dagbuild.backends")
    monkeypatch.setattr(backends, "_cuda_problem", lambda: "cupy is not importable (test)")
    with pytest.raises(DagbuildError) as exc:
        backends.get_backend("cuda")
    assert "cupy is not importable" in str(exc.value) and "dagbuild[cuda13]" in str(exc.value)


class _ChildDriver:
    """A stand-in driver for child-graph nodes: counts what the backend asks of it."""

    def __init__(self):
        self.added, self.destroyed = [], []

    def cuGraphAddChildGraphNode(self, graph, deps, n, body):
        self.added.append((graph, body))
        return (0, f"node{len(self.added)}")

    def cuGraphDestroy(self, g):
        self.destroyed.append(g)
        return (0,)


def test_child_bodies_recorded_once_per_calls_while_kept():
    """By default add_child_graph records every body and frees it once the node holds its clone. Between
    keep_child_bodies() and drop_child_bodies() (a pool's lifetime) equal calls share one recording (buckets
    whose GEMM rows are padded alike repeat them), and drop frees each kept body once."""
    be = object.__new__(CudaBackend)
    be._drv, be._blas, be._capture_stream, be._bodies = _ChildDriver(), None, None, None
    recorded = []
    be.capture = lambda calls: recorded.append(calls) or f"body{len(recorded)}"
    gemm = (("gemm", (("m", "i32", 64), ("a", "f16", 4096))),)
    other = (("gemm", (("m", "i32", 128), ("a", "f16", 4096))),)
    be.add_child_graph("parent", [], gemm)
    be.add_child_graph("parent", [], gemm)
    assert recorded == [gemm, gemm] and be._drv.destroyed == ["body1", "body2"]
    recorded.clear()
    be._drv = _ChildDriver()
    be.keep_child_bodies()
    for calls in (gemm, other, gemm, gemm):
        be.add_child_graph("parent", [], calls)
    assert recorded == [gemm, other] and be._drv.destroyed == []
    assert [b for _, b in be._drv.added] == ["body1", "body2", "body1", "body1"]
    be.drop_child_bodies()
    assert sorted(be._drv.destroyed) == ["body1", "body2"] and be._bodies is None
    be.close()  # nothing kept: nothing more freed
    assert len(be._drv.destroyed) == 2
