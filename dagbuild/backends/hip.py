"""The HIP backend: :class:`CudaBackend` over HIP Python's CUDA interop layer.

``hip-python-as-cuda`` (``pip install 'dagbuild[rocm]'``) exposes the CUDA driver-API names
(``cuGraphCreate``, ``CUDA_KERNEL_NODE_PARAMS``, ...) backed by HIP, so everything in
:mod:`dagbuild.backends.cuda` applies unchanged except two things, which this module is the one place for:

* the kernel-node params struct (``hipKernelNodeParams``) has ``gridDim``/``blockDim`` ``dim3`` fields
  instead of ``gridDimX..Z``/``blockDimX..Z``, and no ``kern``/``ctx`` fields;
* there are no conditional graph nodes and no programmatic edges (executables make those edges plain,
  said once in the log).

UNTESTED: neither the machine this was written on nor the lent NVIDIA GPUs can run HIP, so this path has
never been executed. Only its seam (that it overrides ``_kernel_params`` and nothing else that builds
structs) is unit-tested.
"""

from __future__ import annotations

from typing import Any

from dagbuild.backends.cuda import CudaBackend

__all__ = ["HipBackend", "hip_kernel_params"]


def hip_kernel_params(
    drv: Any,
    func: int,
    grid: tuple[int, int, int],
    block: tuple[int, int, int],
    shared: int,
    argv_address: int,
) -> Any:
    """A ``hipKernelNodeParams`` (exposed as ``CUDA_KERNEL_NODE_PARAMS``) with dim3 grid/block."""
    dim3 = getattr(drv, "dim3", None)
    if dim3 is None:  # the interop module keeps a reference to hip.hip as `hip`
        dim3 = drv.hip.dim3
    p = drv.CUDA_KERNEL_NODE_PARAMS()
    p.func = int(func)
    p.gridDim = dim3(x=grid[0], y=grid[1], z=grid[2])
    p.blockDim = dim3(x=block[0], y=block[1], z=block[2])
    p.sharedMemBytes = int(shared)
    p.kernelParams = int(argv_address)
    p.extra = 0
    return p


class HipBackend(CudaBackend):
    """:class:`CudaBackend` with HIP's kernel-node struct and no conditional nodes (untested; see above)."""

    name = "hip"
    conditional_nodes = False
    programmatic_edges = False  # HIP has no programmatic dependent launch: executables make those edges plain

    def _kernel_params(self, func, grid, block, shared, argv_address):
        return hip_kernel_params(self._drv, func, grid, block, shared, argv_address)
