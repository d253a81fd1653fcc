"""The HIP backend's params structs against hip-python's own types (no GPU, no ROCm runtime needed:
hip-python imports and builds structs without either). Skipped where hip-python is not installed (CI does
not install it: ~300 MB). Run them with e.g.::

    python3 -m venv /tmp/hipvenv && /tmp/hipvenv/bin/pip install hip-python-interop pydantic networkx \\
        pyyaml numpy pytest && /tmp/hipvenv/bin/python -m pytest tests/test_hip_python.py

(``hip-python-interop`` provides ``cuda.bindings.driver`` itself, so it must not share a venv with NVIDIA's
cuda-bindings; ``hip-python`` alone is enough for these tests and coexists with it.)
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import pytest

from dagbuild.backends.cuda import CudaBackend, pack_args
from dagbuild.backends.hip import HipBackend, hip_kernel_params, hip_memcpy_params
from dagbuild.errors import BuildError


def _hip_driver():
    """(driver module as HipBackend sees it, hip.hip, how it was found) or (None, None, why not)."""
    try:
        from hip import hip
    except Exception as e:
        return None, None, f"hip-python is not installed ({type(e).__name__}: {e}); pip install hip-python"
    try:
        from cuda.bindings import driver

        if getattr(driver, "HIP_PYTHON", False):
            return driver, hip, "hip-python-interop"
    except Exception:
        pass
    # hip-python without its interop layer: the CUDA names the backend uses, bound to hip-python's types
    # exactly as the interop layer aliases them (its classes subclass these)
    ns = SimpleNamespace(
        hip=hip,
        CUDA_KERNEL_NODE_PARAMS=hip.hipKernelNodeParams,
        CUDA_MEMCPY3D=hip.HIP_MEMCPY3D,
        CUDA_MEMSET_NODE_PARAMS=hip.hipMemsetParams,
    )
    return ns, hip, "hip-python"


DRV, HIP, HOW = _hip_driver()
pytestmark = pytest.mark.skipif(DRV is None, reason=str(HOW))


def _backend():
    be = HipBackend.__new__(HipBackend)  # no __init__: that needs CuPy and a device
    be._drv = DRV
    return be


def test_kernel_params_struct():
    packed = pack_args([("ptr", 0x7F00_0000_1000), ("i32", -5), ("f32", 0.5)])
    p = hip_kernel_params(DRV, 0xABC0, (7, 3, 2), (128, 2, 1), 4096, packed.address)
    assert isinstance(p, HIP.hipKernelNodeParams)
    assert (p.gridDim.x, p.gridDim.y, p.gridDim.z) == (7, 3, 2)
    assert (p.blockDim.x, p.blockDim.y, p.blockDim.z) == (128, 2, 1)
    assert p.sharedMemBytes == 4096
    assert int(p.func) == 0xABC0 and int(p.kernelParams) == packed.address and int(p.extra) == 0
    # the void** the driver will read: each entry points at the packed argument
    argv = ctypes.cast(int(p.kernelParams), ctypes.POINTER(ctypes.c_void_p))
    assert ctypes.cast(argv[1], ctypes.POINTER(ctypes.c_int32)).contents.value == -5


def test_kernel_node_through_the_backend():
    p, packed = _backend()._kernel_node(0x10, (9,), [64, 4], 0, [("f32", 2.0), ("u64", 2**63)])
    assert isinstance(p, HIP.hipKernelNodeParams)
    assert (p.gridDim.x, p.gridDim.y, p.gridDim.z) == (9, 1, 1)
    assert (p.blockDim.x, p.blockDim.y, p.blockDim.z) == (64, 4, 1)
    assert int(p.kernelParams) == packed.address and len(packed) == 2


def test_dim3_fields_are_not_assignable_in_hip_python():
    """Why hip_kernel_params sets x/y/z in place: a whole dim3 cannot be assigned."""
    p = DRV.CUDA_KERNEL_NODE_PARAMS()
    with pytest.raises(AttributeError):
        p.gridDim = HIP.dim3(x=1, y=1, z=1)


def test_memcpy_struct():
    c = _backend()._memcpy_params(dst=0x2000, src=0x1000, nbytes=256)
    assert isinstance(c, HIP.HIP_MEMCPY3D)
    unified = HIP.hipMemoryType.hipMemoryTypeUnified
    assert c.srcMemoryType == unified and c.dstMemoryType == unified
    assert (int(c.srcDevice), int(c.dstDevice)) == (0x1000, 0x2000)
    assert (c.WidthInBytes, c.Height, c.Depth, c.srcPitch, c.dstPitch, c.srcHeight, c.dstHeight) == (
        256, 1, 1, 256, 256, 1, 1)
    with pytest.raises(BuildError):
        hip_memcpy_params(DRV, 0x2000, 0x1000, 0)


@pytest.mark.skipif(HOW != "hip-python-interop", reason="needs hip-python-interop's CUmemorytype")
def test_cuda_memcpy_builder_fails_on_hip_types():
    """Why HipBackend overrides _memcpy_params: the interop enum is refused by HIP_MEMCPY3D."""
    be = CudaBackend.__new__(CudaBackend)
    be._drv = DRV
    with pytest.raises(TypeError, match="hipMemoryType"):
        be._memcpy_params(0x2000, 0x1000, 256)


def test_memset_struct_from_the_shared_builder():
    m = _backend()._memset_params(dst=0x3000, value=0xBEEF, element_size=2, count=10)
    assert isinstance(m, HIP.hipMemsetParams)
    assert (int(m.dst), m.value, m.elementSize, m.width, m.height, m.pitch) == (0x3000, 0xBEEF, 2, 10, 1, 20)
    with pytest.raises(BuildError, match="element size"):
        _backend()._memset_params(0x3000, 0, 8, 10)
