"""cuBLAS / hipBLAS through ctypes: the library calls a child graph's body records (see dagbuild.libcalls).

Why not CuPy's cuBLAS wrappers: CuPy refuses cuBLAS calls on a capturing stream in some versions, and its
``gemmEx`` calls ``cublasSetStream`` first, which resets the handle's workspace to the default pool; under
capture that pool is allocated with ``cudaMallocAsync``, i.e. memory nodes, which a child graph may not hold.
So this module owns one handle, sets the stream, then the caller's workspace (or none), then calls
``cublasGemmEx`` with host-side alpha/beta (their values are captured into the graph).

Row-major ``c[m, n] = alpha * a[m, k] @ b[n, k].T + beta * c`` is column-major ``c.T = b.T.T @ a.T``: one
``GemmEx(op_T, op_N, n, m, k, b, ldb, a, lda, c, ldc)``. Accumulation is f32 (CUBLAS_COMPUTE_32F, which
never uses TF32).
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from typing import Any

from dagbuild.errors import DagbuildError

# cuBLAS / CUDA enum values (cublas_api.h, library_types.h)
_CUDA = {"f32": 0, "f16": 2, "bf16": 14}
_CUBLAS = {"op_n": 0, "op_t": 1, "compute_32f": 68, "algo": -1, "pointer_host": 0}
# hipBLAS (ROCm 5/6 hipblasDatatype_t interface): never run on an AMD GPU
_HIP = {"f32": 151, "f16": 150, "bf16": 168}
_HIPBLAS = {"op_n": 111, "op_t": 112, "compute_32f": 151, "algo": 160, "pointer_host": 0}


def _load(names: tuple[str, ...], pathfinder_name: str | None) -> ctypes.CDLL:
    """The library by soname (found first among those already loaded: CuPy's, once it has loaded it),
    else through cuda.pathfinder (pip wheels, CUDA_HOME)."""
    errors = []
    if pathfinder_name is not None:
        try:  # CuPy loads its cuBLAS from wherever it finds one; the same soname then resolves to it
            import cupy_backends.cuda.libs.cublas  # noqa: F401
        except Exception:
            pass
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError as e:
            errors.append(str(e))
    if pathfinder_name is not None:
        try:
            from cuda.pathfinder import load_nvidia_dynamic_lib

            return ctypes.CDLL(load_nvidia_dynamic_lib(pathfinder_name).abs_path)
        except Exception as e:  # not installed, or not found
            errors.append(f"cuda.pathfinder: {e}")
    raise DagbuildError(f"cannot load {names[0]} for child-graph library calls ({'; '.join(errors)})")


class Blas:
    """One BLAS handle; :meth:`run` issues a library call on a stream (capturing or not)."""

    def __init__(self, hip: bool = False):
        self.hip = hip
        if hip:
            lib = _load(("libhipblas.so", "libhipblas.so.2", "libhipblas.so.1"), None)
            self._p, self._types, self._e = "hipblas", _HIP, _HIPBLAS
            fn = {"create": "hipblasCreate", "destroy": "hipblasDestroy", "stream": "hipblasSetStream",
                  "workspace": "hipblasSetWorkspace", "pointer": "hipblasSetPointerMode", "gemm": "hipblasGemmEx"}
        else:
            lib = _load(("libcublas.so.13", "libcublas.so.12", "libcublas.so"), "cublas")
            self._p, self._types, self._e = "cublas", _CUDA, _CUBLAS
            fn = {"create": "cublasCreate_v2", "destroy": "cublasDestroy_v2", "stream": "cublasSetStream_v2",
                  "workspace": "cublasSetWorkspace_v2", "pointer": "cublasSetPointerMode_v2", "gemm": "cublasGemmEx"}
        self._lib, self._fn = lib, fn
        vp, i = ctypes.c_void_p, ctypes.c_int
        self._gemm = getattr(lib, fn["gemm"])
        self._gemm.argtypes = [vp, i, i, i, i, i, vp, vp, i, i, vp, i, i, vp, vp, i, i, i, i]
        self._gemm.restype = i
        self._set_ws = getattr(lib, fn["workspace"], None)
        if self._set_ws is not None:
            self._set_ws.argtypes = [vp, vp, ctypes.c_size_t]
            self._set_ws.restype = i
        self.handle = vp()
        self._call("create", ctypes.byref(self.handle))
        self._call("pointer", self.handle, self._e["pointer_host"])

    def _call(self, what: str, *args: Any) -> None:
        f = getattr(self._lib, self._fn[what])
        status = f(*args)
        if status != 0:
            raise DagbuildError(f"{self._fn[what]} failed with status {status}")

    def run(self, call: str, args: Mapping[str, tuple[str, Any]], stream: int) -> None:
        """Issue ``call`` with ``args`` (name → (dtype, value); pointers as addresses) on ``stream``."""
        if call != "gemm":
            raise DagbuildError(f"unknown library call {call!r}")
        self.gemm(stream, args)

    def gemm(self, stream: int, args: Mapping[str, tuple[str, Any]]) -> None:
        v = {name: val for name, (_, val) in args.items()}
        t = {name: dt for name, (dt, _) in args.items()}
        m, n, k = v["m"], v["n"], v["k"]
        lda = v.get("lda") or k
        ldb = v.get("ldb") or k
        ldc = v.get("ldc") or n
        self._call("stream", self.handle, ctypes.c_void_p(stream))
        ws = v.get("workspace")
        if self._set_ws is not None:  # after SetStream, which resets the workspace to the default pool
            status = self._set_ws(self.handle, ws[0] if ws else None, ws[1] if ws else 0)
            if status != 0:
                raise DagbuildError(f"{self._fn['workspace']} failed with status {status}")
        alpha, beta = ctypes.c_float(v.get("alpha", 1.0)), ctypes.c_float(v.get("beta", 0.0))
        e, ty = self._e, self._types
        status = self._gemm(self.handle, e["op_t"], e["op_n"], n, m, k, ctypes.addressof(alpha),
                            v["b"], ty[t["b"]], ldb, v["a"], ty[t["a"]], lda, ctypes.addressof(beta),
                            v["c"], ty[t["c"]], ldc, e["compute_32f"], e["algo"])
        if status != 0:
            raise DagbuildError(f"{self._fn['gemm']} (m={m}, n={n}, k={k}, {t['a']}→{t['c']}) failed with "
                                f"status {status}")

    def close(self) -> None:
        if self.handle:
            self._call("destroy", self.handle)
            self.handle = ctypes.c_void_p()
