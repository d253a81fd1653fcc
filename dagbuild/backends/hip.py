"""The HIP backend: :class:`CudaBackend` over HIP Python's CUDA interop layer.

``hip-python-as-cuda`` (``pip install 'dagbuild[rocm]'``) exposes the CUDA driver-API names
(``cuGraphCreate``, ``CUDA_KERNEL_NODE_PARAMS``, ...) backed by HIP, so everything in
:mod:`dagbuild.backends.cuda` applies unchanged except three things, which this module is the one place for:

* the kernel-node params struct (``hipKernelNodeParams``) has ``gridDim``/``blockDim`` ``dim3`` fields
  instead of ``gridDimX..Z``/``blockDimX..Z``, and no ``kern``/``ctx`` fields. hip-python exposes those
  fields as read-only views into the struct: their ``x``/``y``/``z`` are set in place (assigning a new
  ``dim3`` raises AttributeError);
* ``HIP_MEMCPY3D``'s memory-type fields take hip-python's own ``hipMemoryType`` enum only: the interop
  layer's ``CUmemorytype.CU_MEMORYTYPE_UNIFIED`` (value 11, the same number) is refused with a TypeError;
* there are no conditional graph nodes and no programmatic edges (executables make those edges plain,
  said once in the log).

Checked without a GPU (tests/test_hip_python.py, where hip-python is installed): the kernel, memcpy and
memset params structs built here against hip-python 7.2's own types. NEVER RUN on an AMD GPU: no graph
has been built, instantiated or launched through this backend.
"""

from __future__ import annotations

from typing import Any

from dagbuild.backends.cuda import CudaBackend, memcpy_params

__all__ = ["HipBackend", "hip_kernel_params", "hip_memcpy_params"]


def hip_kernel_params(
    drv: Any,
    func: int,
    grid: tuple[int, int, int],
    block: tuple[int, int, int],
    shared: int,
    argv_address: int,
) -> Any:
    """A ``hipKernelNodeParams`` (exposed as ``CUDA_KERNEL_NODE_PARAMS``) with dim3 grid/block, whose
    components are set in place (hip-python's dim3 fields are views, not assignable)."""
    p = drv.CUDA_KERNEL_NODE_PARAMS()
    p.func = int(func)
    g, b = p.gridDim, p.blockDim
    g.x, g.y, g.z = (int(v) for v in grid)
    b.x, b.y, b.z = (int(v) for v in block)
    p.sharedMemBytes = int(shared)
    p.kernelParams = int(argv_address)
    p.extra = 0
    return p


def _hip_module(drv: Any) -> Any:
    """hip-python's ``hip.hip`` (the interop module keeps a reference to it as ``hip``)."""
    hip = getattr(drv, "hip", None)
    if hip is None:
        from hip import hip  # type: ignore[no-redef]
    return hip


def hip_memcpy_params(drv: Any, dst: int, src: int, nbytes: int) -> Any:
    """A ``HIP_MEMCPY3D`` (exposed as ``CUDA_MEMCPY3D``) for a 1-D copy of ``nbytes``: the same fields as
    ``CudaBackend._memcpy_params``, with hip-python's ``hipMemoryTypeUnified`` (the direction follows
    from the addresses)."""
    return memcpy_params(drv, dst, src, nbytes, _hip_module(drv).hipMemoryType.hipMemoryTypeUnified)


class HipBackend(CudaBackend):
    """:class:`CudaBackend` with HIP's kernel-node and memcpy structs and no conditional nodes (never run on
    an AMD GPU; see above)."""

    name = "hip"
    conditional_nodes = False
    programmatic_edges = False  # HIP has no programmatic dependent launch: executables make those edges plain

    def _kernel_params(self, func, grid, block, shared, argv_address):
        return hip_kernel_params(self._drv, func, grid, block, shared, argv_address)

    def _memcpy_params(self, dst: int, src: int, nbytes: int) -> Any:
        return hip_memcpy_params(self._drv, dst, src, nbytes)
