"""Graph backends. Importing this package needs neither CuPy nor cuda-bindings: they load on first use.

``get_backend("cuda" | "hip" | "auto", device)`` returns a :class:`~dagbuild.backends.cuda.CudaBackend`
or :class:`~dagbuild.backends.hip.HipBackend`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dagbuild.errors import DagbuildError

if TYPE_CHECKING:
    from dagbuild.backends.cuda import CudaBackend

__all__ = ["BACKENDS", "get_backend", "gpu_problem"]

BACKENDS = ("auto", "cuda", "hip")

_CUDA_HINT = "pip install 'dagbuild[cuda13]'"
_HIP_HINT = "pip install 'dagbuild[rocm]'"


def _cuda_problem() -> str | None:
    """None when CuPy (CUDA build), cuda-bindings and a CUDA device are all there, else what is missing."""
    try:
        import cupy
    except Exception as e:
        return f"cupy is not importable ({type(e).__name__}: {e})"
    if getattr(cupy.cuda.runtime, "is_hip", False):
        return "cupy is a ROCm build"
    try:
        from cuda.bindings import driver  # noqa: F401
    except Exception as e:
        return f"cuda-bindings is not importable ({type(e).__name__}: {e})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"no CUDA device ({type(e).__name__}: {e})"
    return None if n > 0 else "no CUDA device"


def _libcuda_loads() -> bool:
    """Whether the NVIDIA driver library loads (no CuPy needed: CuPy without a driver says "CUDA driver
    version is insufficient", which misleads on a machine that has no NVIDIA GPU at all)."""
    import ctypes
    import sys

    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


def gpu_problem() -> str | None:
    """None when a GPU is usable (a CUDA device through CuPy and cuda-bindings, or a HIP one through HIP
    Python), else one sentence saying why not. The one GPU probe of the CLI and the tests."""
    if not _libcuda_loads():
        return None if _hip_problem() is None else "no NVIDIA driver found (libcuda is not loadable)"
    problem = _cuda_problem()
    if problem is not None and _hip_problem() is None:
        return None
    return problem


def _hip_problem() -> str | None:
    try:
        import cupy
    except Exception as e:
        return f"cupy is not importable ({type(e).__name__}: {e})"
    if not getattr(cupy.cuda.runtime, "is_hip", False):
        return "cupy is not a ROCm build"
    try:
        from dagbuild.backends.cuda import load_driver

        drv = load_driver()
    except Exception as e:
        return f"hip-python-as-cuda is not importable ({type(e).__name__}: {e})"
    if not getattr(drv, "HIP_PYTHON", False):
        return "the CUDA driver module is not HIP Python's interop layer"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"no HIP device ({type(e).__name__}: {e})"
    return None if n > 0 else "no HIP device"


def get_backend(name: str = "auto", device: int = 0) -> CudaBackend:
    """The graph backend ``name`` on ``device``: ``cuda``, ``hip``, or ``auto`` (CUDA where cuda-bindings
    imports and a device is present, else HIP, else a DagbuildError saying what to install)."""
    if name not in BACKENDS:
        raise DagbuildError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    cuda_problem = _cuda_problem() if name in ("cuda", "auto") else "not asked for"
    if name == "cuda" and cuda_problem:
        raise DagbuildError(f"CUDA backend unavailable: {cuda_problem}; install with: {_CUDA_HINT}")
    if cuda_problem is None:
        from dagbuild.backends.cuda import CudaBackend

        return CudaBackend(device)
    hip_problem = _hip_problem()
    if name == "hip" and hip_problem:
        raise DagbuildError(f"HIP backend unavailable: {hip_problem}; install with: {_HIP_HINT}")
    if hip_problem is None:
        from dagbuild.backends.hip import HipBackend

        return HipBackend(device)
    raise DagbuildError(
        f"no GPU backend available (CUDA: {cuda_problem}; HIP: {hip_problem}); "
        f"for NVIDIA GPUs install with: {_CUDA_HINT} (for ROCm: {_HIP_HINT})"
    )
