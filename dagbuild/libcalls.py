"""Library calls a child-graph node's body may make: their signatures and argument checks (pure data).

A child node (``child: {reads, writes, body: [{call: gemm, args: {...}}]}``) records library work once by
stream capture and inserts it as one graph node. Binding checks each call's arguments here (types, sizes,
leading dimensions) and that the node's declared reads and writes cover every byte range the call touches;
the recording itself is the backend's (:mod:`dagbuild.backends.blas`). A call's signature is written like a
kernel's params: ``const any* a`` is read, ``any* c`` written; ``any`` takes the buffer's dtype, which the
call's check then restricts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .ir import KernelArg, Param, PlanBuffer

#: Element types a GEMM takes for a and b, and what c may be for each.
GEMM_TYPES = {"f16": ("f16", "f32"), "bf16": ("bf16", "f32"), "f32": ("f32",)}


@dataclass(frozen=True)
class LibSignature:
    """One library call: params (pointers of dtype ``any``), defaults of its optional args (None: an
    optional pointer left out) and its check (returns what is wrong, or None)."""

    name: str
    params: tuple[Param, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[dict[str, KernelArg], Mapping[str, PlanBuffer]], str | None] = lambda args, bufs: None
    doc: str = ""

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def _gemm_check(args: dict[str, KernelArg], buffers: Mapping[str, PlanBuffer]) -> str | None:
    """Row-major ``c[i, j] = alpha * sum_l a[i, l] * b[j, l] + beta * c[i, j]`` (i < m, j < n, l < k): a is
    [m, k] with row stride lda, b [n, k] (a weight in PyTorch's layout) with ldb, c [m, n] with ldc."""
    v = {name: a.value for name, a in args.items() if a.view is None}
    ta, tb, tc = (args[x].param.dtype for x in "abc")
    if ta not in GEMM_TYPES:
        return f"a is {ta}; a GEMM takes f16, bf16 or f32"
    if tb != ta:
        return f"a is {ta} but b is {tb}: a and b must have one dtype"
    if tc not in GEMM_TYPES[ta]:
        return f"c is {tc}; with {ta} inputs c must be {' or '.join(GEMM_TYPES[ta])}"
    m, n, k = v["m"], v["n"], v["k"]
    for name in ("m", "n", "k"):
        if v[name] < 1:
            return f"{name} = {v[name]} must be ≥ 1"
    lda, ldb, ldc = (v[x] if v.get(x) is not None else d for x, d in (("lda", k), ("ldb", k), ("ldc", n)))
    for name, ld, least in (("lda", lda, k), ("ldb", ldb, k), ("ldc", ldc, n)):
        if ld < least:
            return f"{name} = {ld} is less than the row length {least}"
    for name, rows, ld, cols in (("a", m, lda, k), ("b", n, ldb, k), ("c", m, ldc, n)):
        view = args[name].view
        need = ((rows - 1) * ld + cols) * buffers[view.buffer].itemsize
        if view.nbytes < need:
            return (f"{name} = {view.label!r} has {view.nbytes} bytes; {rows} rows of {cols} with stride {ld} "
                    f"need {need}")
    ws = args.get("workspace")
    if ws is not None and buffers[ws.view.buffer].dtype != "u8":
        return f"workspace {ws.view.label!r} must be a u8 buffer"
    return None


def _p(text: str) -> Param:
    const = text.startswith("const ")
    body = text.removeprefix("const ")
    dtype, name = body.split()
    pointer = dtype.endswith("*")
    return Param(name, dtype.rstrip("*"), pointer, const)


#: Every library call a child body may make, by name.
LIBCALLS: dict[str, LibSignature] = {
    "gemm": LibSignature(
        "gemm",
        tuple(_p(t) for t in ("const any* a", "const any* b", "any* c", "i32 m", "i32 n", "i32 k", "f32 alpha",
                              "f32 beta", "i32 lda", "i32 ldb", "i32 ldc", "u8* workspace")),
        defaults={"alpha": 1.0, "beta": 0.0, "lda": None, "ldb": None, "ldc": None, "workspace": None},
        check=_gemm_check,
        doc="cuBLAS/hipBLAS GEMM: c = alpha * a @ b.T + beta * c (row-major; f32 accumulation, no TF32); "
            "workspace: the library's scratch (written), or none",
    ),
}
