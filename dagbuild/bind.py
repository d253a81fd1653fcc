"""GraphSpec → bound nodes: dims bound, repeats expanded, views resolved to byte ranges, args checked.

:func:`bind` returns the :class:`~dagbuild.ir.Plan` of every node that bound and every issue found; it
allocates nothing and orders nothing (:mod:`dagbuild.dag` does). The argument rules live here once:
:func:`bind_scalar`, :func:`resolve_view` and :func:`bind_dims3` serve the validating binder, its
compiled fast path (through :class:`_Fallback`) and :meth:`Executable.update` alike.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import expr
from .dtypes import DTYPES, ELEMENT_TYPES, SCALAR_TYPES, check_scalar, scalar_bits
from .errors import Issue
from .ir import (
    LOOP_ENTER,
    LOOP_NEXT,
    MAX_BLOCK,
    MAX_GRID,
    MAX_THREADS_PER_BLOCK,
    ChildOp,
    EmptyOp,
    KernelArg,
    KernelOp,
    LibCall,
    LoopOp,
    MemcpyOp,
    MemsetOp,
    Param,
    Plan,
    PlanBuffer,
    PlanKernel,
    PlanNode,
    RepeatFrame,
    View,
)
from .spec import MAX_NODES, ChildNode, EmptyNode, GraphSpec, KernelNode, LoopNode, MemcpyNode, MemsetNode, RepeatBlock

#: Documented size limits: a spec that expands past them is refused with a ``size_limit`` issue, fast.
MAX_BUFFER_BYTES = 2**63 - 1  # byte offsets are 64-bit

#: Files a kernel ``source`` may name (anything else is refused unread).
KERNEL_SUFFIXES = (".cu", ".cuh", ".hip")

_PARAM = re.compile(r"^\s*(const\s+)?([A-Za-z_]\w*)\s*(\*)?\s*([A-Za-z_]\w*)\s*$")
_VIEW = re.compile(r"^\s*([A-Za-z_]\w*)\s*(?:\[(.*)\])?\s*$", re.S)
TEMPLATE = expr.TEMPLATE


class NodeError(Exception):
    """One node failed to bind: ``code`` is the Issue code, ``field`` the path inside the node."""

    def __init__(self, code: str, message: str, buffer: str | None = None, field: tuple = ()):
        super().__init__(message)
        self.code, self.buffer, self.field = code, buffer, field


class _Fallback(Exception):
    """The compiled fast path met something only the validating binder can explain."""


class _Issues:
    """Collects issues with YAML lines looked up from the spec's line map."""

    def __init__(self, spec: GraphSpec):
        self.spec, self.items = spec, []
        self.once: set[tuple] = set()  # keys of issues a repeat would otherwise report per iteration
        self.bad_types: set[str] = set()  # `types:` entries already reported as invalid

    def add(self, code: str, message: str, *, nodes: tuple = (), buffer: str | None = None,
            path: tuple = (), field: str | None = None, once: tuple | None = None) -> None:
        """``once``: a key; a second issue with the same key is dropped (repeat iterations, nested repeats)."""
        if once is not None:
            if once in self.once:
                return
            self.once.add(once)
        self.items.append(Issue(code, message, tuple(nodes), buffer, self.spec.line_of(path), field))


# ---- the argument rules ------------------------------------------------------------------------------


def parse_param(text: str, types: Mapping[str, str]) -> Param:
    """``"const f16* w"`` → Param; type parameters (``wt``) resolve through ``types``."""
    m = _PARAM.match(text)
    if not m:
        raise ValueError(f"cannot parse param {text!r}; write it like `const f16* w` or `i32 n`")
    const, dtype, star, name = m.groups()
    dtype = types.get(dtype, dtype)
    if dtype not in ELEMENT_TYPES:
        raise ValueError(f"unknown type {m.group(2)!r} in param {text!r} "
                         f"(types: {', '.join(ELEMENT_TYPES)}, or one of `types:`)")
    if not star and dtype not in SCALAR_TYPES:
        raise ValueError(f"scalar param {text!r} must be one of {', '.join(SCALAR_TYPES)}")
    if const and not star:
        raise ValueError(f"`const` applies to pointer params only: {text!r}")
    return Param(name, dtype, bool(star), bool(const))


def memset_bits(dtype: str, value: int | float) -> tuple[int, int, int]:
    """(bit pattern, element size, repeat factor) that a memset node writes for one element.

    Raises ValueError (value not representable, with why) or TypeError (a float for an integer buffer)."""
    d = DTYPES[dtype]
    if d.itemsize == 8:
        if value != 0:
            raise ValueError(f"8-byte dtype {dtype} can only be memset to 0")
        return 0, 4, 2
    if d.int_range is not None and isinstance(value, float):
        raise TypeError(f"{value!r} is not an integer, but the buffer is {dtype}")
    return scalar_bits(dtype, value), d.itemsize, 1


def bind_scalar(p: Param, value: Any, env: Mapping[str, int | float]) -> int | float:
    """A scalar argument's value: evaluated, then checked against ``p``'s type (integral, in range,
    finite in f32). Raises NodeError naming the param."""
    try:
        v = expr.evaluate(value, env)
    except expr.ExprError as err:
        raise NodeError(err.code, f"arg {p.name!r}: {err}", field=("args", p.name)) from None
    try:
        return check_scalar(p.dtype, v)
    except ValueError as e:
        shown = f"{value!r} = {v}" if isinstance(value, str) else repr(v)
        code = "expression" if DTYPES[p.dtype].int_range is not None and isinstance(v, float) else "out_of_bounds"
        raise NodeError(code, f"arg {p.name!r} = {shown}: {e} (param `{p}`)", field=("args", p.name)) from None


@functools.lru_cache(maxsize=8192)
def parse_view(text: str) -> tuple[str, tuple[str, ...] | None] | None:
    """``"w[l, 0]"`` → ``("w", ("l", "0"))``; ``"w"`` → ``("w", None)``; None when it is no view."""
    m = _VIEW.match(text)
    if not m:
        return None
    return m.group(1), None if m.group(2) is None else tuple(expr.split_top_level(m.group(2)))


def view_at(buf: PlanBuffer, text: str, index: tuple[int, ...] | None) -> View:
    """The byte range of ``buf[index]`` (leading axes); indices must already be in range."""
    if index is None:
        return View(buf.name, 0, buf.nbytes, text)
    offset = sum(i * s for i, s in zip(index, buf.strides, strict=False))
    return View(buf.name, offset * buf.itemsize, buf.strides[len(index) - 1] * buf.itemsize, text, index)


def resolve_view(text: str, buffers: Mapping[str, PlanBuffer], env: Mapping[str, int | float],
                 spec_buffers: Mapping[str, Any] | None = None) -> View:
    """``"w[l]"`` → the byte range of that row of ``w``; raises NodeError naming the culprit."""
    parsed = parse_view(text) if isinstance(text, str) else None
    if parsed is None:
        raise NodeError("expression", f"cannot parse buffer view {text!r}; write `name` or `name[i, j]`")
    name, parts = parsed
    buf = buffers.get(name)
    if buf is None:
        if spec_buffers is not None and name in spec_buffers:
            raise NodeError("skip", "")  # the buffer itself is invalid and already reported
        raise NodeError("unknown_reference", f"unknown buffer {name!r}", buffer=name)
    if parts is None:
        return view_at(buf, text.strip(), None)
    if len(parts) > len(buf.shape):
        raise NodeError("out_of_bounds", f"view {text!r} has {len(parts)} indices but buffer {name!r} "
                         f"has {len(buf.shape)} axes", buffer=name)
    index = []
    for axis, part in enumerate(parts):
        try:
            i = expr.evaluate_int(part, env)
        except expr.ExprError as err:
            raise NodeError(err.code, f"view {text!r}: {err}", buffer=name) from None
        if not 0 <= i < buf.shape[axis]:
            raise NodeError("out_of_bounds", f"view {text!r}: index {i} is outside axis {axis} of "
                             f"buffer {name!r} (size {buf.shape[axis]})", buffer=name)
        index.append(i)
    return view_at(buf, text.strip(), tuple(index))


def bind_dims3(values: list, what: str, env, limits: tuple[int, int, int]) -> tuple[int, int, int]:
    """A grid or block: 1 to 3 positive integers within the format's limits."""
    if not 1 <= len(values) <= 3:
        raise NodeError("launch_config", f"{what} needs 1 to 3 dimensions, got {len(values)}", field=(what,))
    out = []
    for i, v in enumerate(values):
        try:
            n = expr.evaluate_int(v, env)
        except expr.ExprError as err:
            raise NodeError(err.code, f"{what}[{i}]: {err}", field=(what, i)) from None
        if n < 1:
            shown = f"{v!r} = {n}" if isinstance(v, str) else str(n)
            raise NodeError("launch_config", f"{what}[{i}] = {shown}, must be ≥ 1", field=(what, i))
        if n > limits[i]:
            raise NodeError("launch_config", f"{what}[{i}] = {n} exceeds the limit {limits[i]}", field=(what, i))
        out.append(n)
    return tuple(out + [1] * (3 - len(out)))  # type: ignore[return-value]


def check_threads(block: tuple[int, int, int]) -> None:
    threads = block[0] * block[1] * block[2]
    if threads > MAX_THREADS_PER_BLOCK:
        raise NodeError("launch_config", f"block {list(block)} has {threads} threads, more than "
                         f"{MAX_THREADS_PER_BLOCK}", field=("block",))


def bind_shared(value: Any, env) -> int:
    try:
        shared = expr.evaluate_int(value, env)
    except expr.ExprError as err:
        raise NodeError(err.code, f"shared: {err}", field=("shared",)) from None
    if shared < 0:
        raise NodeError("launch_config", f"shared = {shared} bytes, must be ≥ 0", field=("shared",))
    return shared


# ---- spec sections -------------------------------------------------------------------------------------


def _resolve_overrides(spec: GraphSpec, overrides: Mapping[str, Any], issues: _Issues):
    dims, types, consts = dict(spec.dims), dict(spec.types), dict(spec.consts)
    for name, value in overrides.items():
        if name in consts:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                issues.add("schema", f"override {name}={value!r}: const {name!r} needs a finite number",
                           field=name)
            else:
                consts[name] = float(value)
        elif name in dims:
            if isinstance(value, bool) or not isinstance(value, int):
                issues.add("schema", f"override {name}={value!r}: dim {name!r} needs an integer, got "
                           f"{type(value).__name__} (nothing is rounded or converted)", field=name)
            else:
                dims[name] = int(value)
        elif name in types:
            if not isinstance(value, str):
                issues.add("schema", f"override {name}={value!r}: type {name!r} needs a type name such as "
                           "f16", field=name)
            else:
                types[name] = value
        else:
            issues.add("unknown_reference",
                       f"override {name}: no dim, const or type named {name!r} "
                       f"(dims: {', '.join(dims) or 'none'}; consts: {', '.join(consts) or 'none'}; "
                       f"types: {', '.join(types) or 'none'})",
                       field=name)
    for name, t in types.items():
        if t not in ELEMENT_TYPES:
            issues.bad_types.add(name)
            issues.add("schema", f"type {name!r} = {t!r} is not one of {', '.join(ELEMENT_TYPES)}",
                       path=("types", name), field=f"types.{name}")
    return dims, types, consts


def _read_source(name: str, decl, spec: GraphSpec, issues: _Issues, cache: dict) -> tuple[str, Path | None]:
    """A kernel's source text, includes inlined; read once per file per bind (and once for all the binds
    that share ``cache``: a pool's buckets)."""
    if decl.code is not None:
        return decl.code, None
    from .sources import read_kernel_source

    root = spec.base_dir or Path.cwd()
    path = cache.get(("source path", root, decl.source))  # resolve() walks the path: once per pool, not per bucket
    if path is None:
        path = cache[("source path", root, decl.source)] = (root / decl.source).resolve()
    if ("source", path) in cache:
        return cache[("source", path)], path
    where = dict(path=("kernels", name, "source"), field=f"kernels.{name}.source")
    if path.suffix not in KERNEL_SUFFIXES:
        issues.add("unknown_reference", f"kernel {name!r}: source {decl.source!r} is not a kernel source "
                   f"file (one of {', '.join(KERNEL_SUFFIXES)}); it was not read", **where)
        return "", path
    try:
        cache[("source", path)] = text = read_kernel_source(path)
        return text, path
    except FileNotFoundError:
        issues.add("unknown_reference", f"kernel {name!r}: source file {decl.source!r} not found "
                   f"(looked at {path})", **where)
    except Exception as e:  # DagbuildError from the include reader: bad include, not UTF-8, unreadable
        issues.add("unknown_reference", f"kernel {name!r}: {e}", **where)
    return "", path


def _bind_kernels(spec: GraphSpec, types: dict[str, str], issues: _Issues, cache: dict) -> dict[str, PlanKernel]:
    out = {}
    for name, decl in spec.kernels.items():
        params, ok = [], True
        for i, text in enumerate(decl.params):
            try:
                params.append(parse_param(text, types))
            except ValueError as e:
                m = _PARAM.match(text)
                if not (m and m.group(2) in issues.bad_types):  # else reported once, at `types:`
                    issues.add("schema", f"kernel {name!r}: {e}", path=("kernels", name, "params", i),
                               field=f"kernels.{name}.params[{i}]")
                ok = False
        names = [p.name for p in params]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            issues.add("schema", f"kernel {name!r}: param {dup!r} declared twice",
                       path=("kernels", name, "params"), field=f"kernels.{name}.params")
            ok = False
        try:
            entry = re.sub(r"\{(\w+)\}", lambda m: types[m.group(1)], decl.entry)
        except KeyError as e:
            issues.add("unknown_reference", f"kernel {name!r}: entry {decl.entry!r} names unknown type {e}",
                       path=("kernels", name, "entry"), field=f"kernels.{name}.entry")
            ok = False
        source, path = _read_source(name, decl, spec, issues, cache)
        if ok:
            out[name] = PlanKernel(name, entry, tuple(params), source, path, tuple(decl.options), decl.launch,
                                   spec.line_of(("kernels", name)), decl.resident)
    return out


def _bind_buffers(spec: GraphSpec, dims: dict[str, int], types: dict[str, str], issues: _Issues):
    out = {}
    for name, decl in spec.buffers.items():
        path = ("buffers", name)
        dtype = types.get(decl.dtype, decl.dtype)
        if dtype not in ELEMENT_TYPES:
            if decl.dtype in issues.bad_types:  # reported once, at `types:`
                continue
            issues.add("schema", f"buffer {name!r}: unknown dtype {decl.dtype!r} "
                       f"(one of {', '.join(ELEMENT_TYPES)}, or a name in `types:`)",
                       buffer=name, path=(*path, "dtype"), field=f"buffers.{name}.dtype")
            continue
        shape, used, ok = [], set(), True
        if not decl.shape:
            issues.add("schema", f"buffer {name!r}: shape needs at least one axis", buffer=name,
                       path=(*path, "shape"), field=f"buffers.{name}.shape")
            continue
        for i, e in enumerate(decl.shape):
            where = dict(buffer=name, path=(*path, "shape", i), field=f"buffers.{name}.shape[{i}]")
            try:
                n = expr.evaluate_int(e, dims)
                used |= expr.names(e)
            except expr.ExprError as err:
                issues.add(err.code, f"buffer {name!r}: shape[{i}]: {err}", **where)
                ok = False
                continue
            if n < 1:
                shown = f"{e!r} = {n}" if isinstance(e, str) else str(n)
                issues.add("out_of_bounds", f"buffer {name!r}: shape[{i}] = {shown}, must be ≥ 1", **where)
                ok = False
            shape.append(n)
        if not ok:
            continue
        nbytes = DTYPES[dtype].itemsize
        for n in shape:
            nbytes *= n
        if nbytes > MAX_BUFFER_BYTES:
            issues.add("out_of_bounds", f"buffer {name!r}: shape {shape} of {dtype} is {nbytes} bytes, more than "
                       f"64-bit byte offsets can address ({MAX_BUFFER_BYTES})", buffer=name,
                       path=(*path, "shape"), field=f"buffers.{name}.shape")
            continue
        out[name] = PlanBuffer(name, dtype, tuple(shape), decl.memory, frozenset(used))
    return out


def _checks(spec: GraphSpec, dims: dict[str, int], issues: _Issues) -> None:
    """A spec's ``checks``: each expression over the dims must hold (be non-zero)."""
    for i, check in enumerate(spec.checks):
        where = dict(path=("checks", i, "expr"), field=f"checks[{i}]")
        try:
            ok = expr.evaluate(check.expr, dims)
        except expr.ExprError as err:
            issues.add(err.code, f"checks[{i}]: {err}", **where)
            continue
        if not ok:
            used = sorted(expr.names(check.expr))
            values = ", ".join(f"{n}={dims[n]}" for n in used)
            issues.add("check", f"{check.message} (check {check.expr!r} fails with {values})", **where)


# ---- nodes ---------------------------------------------------------------------------------------------


def _bind_kernel_node(node: KernelNode, kernel: PlanKernel | None, buffers, spec, env) -> KernelOp:
    if kernel is None:
        if node.kernel in spec.kernels:
            raise NodeError("skip", "")
        raise NodeError("unknown_reference", f"unknown kernel {node.kernel!r} "
                         f"(declared: {', '.join(spec.kernels) or 'none'})", field=("kernel",))
    grid = bind_dims3(node.grid, "grid", env, MAX_GRID)
    block = bind_dims3(node.block, "block", env, MAX_BLOCK)
    check_threads(block)
    shared = bind_shared(node.shared, env)
    declared = {p.name for p in kernel.params}
    problems = [f"unknown arg {a!r}" for a in node.args if a not in declared]
    problems += [f"missing arg {p.name!r} ({p})" for p in kernel.params if p.name not in node.args]
    if problems:
        raise NodeError("arg_mismatch", f"kernel {kernel.name!r}: {'; '.join(problems)} "
                         f"(params: {', '.join(str(p) for p in kernel.params)})", field=("args",))
    args = []
    for p in kernel.params:
        value = node.args[p.name]
        parsed = parse_view(value) if isinstance(value, str) else None
        named = parsed[0] if parsed else None
        if p.pointer:
            if named is None or named in env:
                raise NodeError("arg_mismatch", f"kernel {kernel.name!r}: pointer param `{p}` was given "
                                 f"the scalar {value!r}; pass a buffer name or view", field=("args", p.name))
            if named not in buffers and named not in spec.buffers:
                raise NodeError("unknown_reference", f"arg {p.name!r}: unknown buffer {named!r}",
                                 buffer=named, field=("args", p.name))
            try:
                view = resolve_view(value, buffers, env, spec.buffers)
            except NodeError as e:
                e.field = ("args", p.name)
                raise
            dtype = buffers[view.buffer].dtype
            if dtype != p.dtype:
                raise NodeError("arg_mismatch", f"kernel {kernel.name!r}: param `{p}` expects {p.dtype} "
                                 f"but buffer {view.buffer!r} is {dtype}", buffer=view.buffer,
                                 field=("args", p.name))
            args.append(KernelArg(p, view=view))
        else:
            if named is not None and named in spec.buffers:
                raise NodeError("arg_mismatch", f"kernel {kernel.name!r}: scalar param `{p}` was given the "
                                 f"buffer {value!r}", buffer=named, field=("args", p.name))
            args.append(KernelArg(p, value=bind_scalar(p, value, env)))
    return KernelOp(kernel.name, grid, block, shared, tuple(args), node.launch or kernel.launch)


def _closure(v):
    """An expression (or a literal) as a closure over the env."""
    return expr.compiled(v) if isinstance(v, str) else (lambda env, v=v: v)


def _view_payload(text: str) -> tuple[str, tuple | None, str]:
    """A view that already bound once, as (buffer, index closures or None, text)."""
    name, index = parse_view(text)
    return name, None if index is None else tuple(_closure(i) for i in index), text.strip()


def _view_with(payload: tuple[str, tuple | None, str], buffers, values: tuple | None,
               whole: dict | None = None) -> View:
    """The byte range a compiled view names, its index already evaluated (``values``; None for a whole buffer),
    by the rules of :func:`resolve_view`; _Fallback where the validating binder has something to say (a missing
    buffer, an index out of range or not an integer). ``whole`` keeps the whole-buffer views made, by text, with
    their buffer: a repeat's copies of a node (22 layers) then share one View while the buffer is the same object
    (:func:`bind` reuses an earlier bind's equal buffers)."""
    name, _, text = payload
    buf = buffers.get(name)
    if buf is None:
        raise _Fallback
    if values is None:
        if whole is None:
            return view_at(buf, text, None)
        made = whole.get(text)
        if made is None or made[0] is not buf:
            made = whole[text] = (buf, view_at(buf, text, None))
        return made[1]
    if len(values) > len(buf.shape):
        raise _Fallback
    idx = tuple(_int(v) for v in values)
    if any(not 0 <= i < n for i, n in zip(idx, buf.shape, strict=False)):
        raise _Fallback
    return view_at(buf, text, idx)


@dataclass(slots=True)
class _CompiledBinding:
    """A kernel node's numbers as compiled expression closures, made after the node bound once with every
    check. Later binds (other repeat iterations, other dims) evaluate these and apply the same rules
    (:func:`check_scalar`, the view and launch limits); anything unusual falls back to the validating
    binder, which names the culprit."""

    grid: tuple
    block: tuple
    shared: Any
    args: tuple  # (Param, closure) for scalars; (Param, (buffer, index closures | None, text)) for views
    launch: str
    # the args made, by (place, buffer id, index) or (place, value's type, value): a weight's view and most
    # scalars are the same in every bucket of a pool (the entry holds the buffer, so its id stays its)
    made: dict = field(default_factory=dict)

    @classmethod
    def of(cls, node: KernelNode, kernel: PlanKernel) -> _CompiledBinding:
        args = tuple((p, _view_payload(node.args[p.name]) if p.pointer else _closure(node.args[p.name]))
                     for p in kernel.params)
        return cls(tuple(_closure(g) for g in node.grid), tuple(_closure(b) for b in node.block),
                   _closure(node.shared), args, node.launch or kernel.launch)

    def run(self, kernel: PlanKernel, buffers, env) -> KernelOp:
        try:
            grid = [_int(c(env)) for c in self.grid]
            block = [_int(c(env)) for c in self.block]
            shared = _int(self.shared(env))
        except expr.ExprError:
            raise _Fallback from None
        grid += [1] * (3 - len(grid))
        block += [1] * (3 - len(block))
        (g0, g1, g2), (b0, b1, b2) = grid, block
        if not (0 < g0 <= MAX_GRID[0] and 0 < g1 <= MAX_GRID[1] and 0 < g2 <= MAX_GRID[2] and 0 < b0 <= MAX_BLOCK[0]
                and 0 < b1 <= MAX_BLOCK[1] and 0 < b2 <= MAX_BLOCK[2] and b0 * b1 * b2 <= MAX_THREADS_PER_BLOCK
                and shared >= 0):
            raise _Fallback
        args = []
        made = self.made
        for i, (p, payload) in enumerate(self.args):
            try:
                if p.pointer:
                    buf = buffers.get(payload[0])
                    if buf is None or buf.dtype != p.dtype:
                        raise _Fallback
                    idx = None if payload[1] is None else tuple(_int(c(env)) for c in payload[1])
                    key: tuple = (i, id(buf), idx)
                    arg = made.get(key)
                    if arg is None:
                        arg = made[key] = (KernelArg(p, view=_view_with(payload, buffers, idx)), buf)
                else:
                    v = payload(env)
                    key = (i, type(v), v)
                    arg = made.get(key)
                    if arg is None:
                        arg = made[key] = (KernelArg(p, value=check_scalar(p.dtype, v)), None)
            except (expr.ExprError, ValueError, OverflowError):
                raise _Fallback from None
            args.append(arg[0])
        return KernelOp(kernel.name, tuple(grid), tuple(block), shared, tuple(args), self.launch)  # type: ignore[arg-type]


def _int(v: Any) -> int:
    if type(v) is int:
        return v
    raise _Fallback


def _bind_memcpy(node: MemcpyNode, buffers, spec, env) -> MemcpyOp:
    views = {}
    for side in ("src", "dst"):
        try:
            views[side] = resolve_view(getattr(node.memcpy, side), buffers, env, spec.buffers)
        except NodeError as e:
            e.field = ("memcpy", side)
            raise
    src, dst = views["src"], views["dst"]
    if src.nbytes != dst.nbytes:
        raise NodeError("out_of_bounds", f"memcpy sizes differ: src {src.text!r} is {src.nbytes} bytes, "
                         f"dst {dst.text!r} is {dst.nbytes} bytes", buffer=dst.buffer, field=("memcpy",))
    if src.overlaps(dst):
        raise NodeError("out_of_bounds", f"memcpy source {src.text!r} and destination {dst.text!r} overlap "
                         "(undefined in CUDA); copy through another buffer", buffer=dst.buffer, field=("memcpy",))
    mem = {"device": "D", "pinned": "H"}
    return MemcpyOp(src, dst, f"{mem[buffers[src.buffer].memory]}2{mem[buffers[dst.buffer].memory]}")


def _bind_memset(node: MemsetNode, buffers, spec, env) -> MemsetOp:
    try:
        dst = resolve_view(node.memset.dst, buffers, env, spec.buffers)
    except NodeError as e:
        e.field = ("memset", "dst")
        raise
    dtype = buffers[dst.buffer].dtype
    try:
        bits, esize, _ = memset_bits(dtype, node.memset.value)
    except TypeError as e:
        raise NodeError("arg_mismatch", f"memset value: {e}", buffer=dst.buffer, field=("memset", "value")) from None
    except ValueError as e:
        raise NodeError("out_of_bounds", f"memset value: {e}", buffer=dst.buffer, field=("memset", "value")) from None
    return MemsetOp(dst, node.memset.value, bits, esize)


def _bind_child(node: ChildNode, buffers, spec, env) -> ChildOp:
    """Declared views, each body call's args (checked by :mod:`dagbuild.libcalls`), and coverage: every
    byte range a call reads must lie in one declared read or write, every range it writes in one declared
    write; otherwise the DAG would miss an edge, so it is an error naming the call, param and view."""
    from .libcalls import LIBCALLS

    declared: dict[str, list[View]] = {}
    for side in ("reads", "writes"):
        declared[side] = []
        for i, text in enumerate(getattr(node.child, side)):
            try:
                declared[side].append(resolve_view(text, buffers, env, spec.buffers))
            except NodeError as e:
                e.field = ("child", side, i)
                raise
    body = []
    for ci, call in enumerate(node.child.body):
        where = ("child", "body", ci)
        sig = LIBCALLS.get(call.call)
        if sig is None:
            raise NodeError("unknown_reference", f"body call #{ci}: unknown library call {call.call!r} "
                            f"(known: {', '.join(sorted(LIBCALLS))})", field=(*where, "call"))
        unknown = [a for a in call.args if sig.param(a) is None]
        if unknown:
            raise NodeError("arg_mismatch", f"body call #{ci} ({sig.name}): no param {unknown[0]!r} "
                            f"(params: {', '.join(p.name for p in sig.params)})", field=(*where, "args", unknown[0]))
        args: list[KernelArg] = []
        for p in sig.params:
            if p.name not in call.args:
                if p.name not in sig.defaults:
                    raise NodeError("arg_mismatch", f"body call #{ci} ({sig.name}): missing arg {p.name!r}",
                                    field=(*where, "args"))
                if sig.defaults[p.name] is not None:
                    args.append(KernelArg(p, value=sig.defaults[p.name]))
                elif not p.pointer:
                    args.append(KernelArg(p, value=None))
                continue
            value = call.args[p.name]
            try:
                if p.pointer:
                    view = resolve_view(value, buffers, env, spec.buffers) if isinstance(value, str) else None
                    if view is None:
                        raise NodeError("arg_mismatch", f"pointer param {p.name!r} takes a buffer view, got {value!r}")
                    args.append(KernelArg(Param(p.name, buffers[view.buffer].dtype, True, p.const), view=view))
                else:
                    args.append(KernelArg(p, value=bind_scalar(p, value, env)))
            except NodeError as e:
                raise NodeError(e.code, f"body call #{ci} ({sig.name}): {e}", buffer=e.buffer,
                                field=(*where, "args", p.name)) from None
        by_name = {a.param.name: a for a in args if a.view is not None or a.value is not None}
        problem = sig.check(by_name, buffers)
        if problem:
            raise NodeError("arg_mismatch", f"body call #{ci} ({sig.name}): {problem}", field=(*where, "args"))
        lib = LibCall(sig.name, tuple(a for a in args if a.view is not None or a.value is not None))
        for view, writes in lib.accesses():
            pool = declared["writes"] if writes else declared["reads"] + declared["writes"]
            if not any(d.covers(view) for d in pool):
                name = next(a.param.name for a in lib.args if a.view is view)
                raise NodeError("undeclared", f"body call #{ci} ({sig.name}) {'writes' if writes else 'reads'} "
                                f"{view.label!r} (param {name!r}), which the node does not declare in "
                                f"child.{'writes' if writes else 'reads or child.writes'}: declare it, or edges "
                                "and race checks would miss it", buffer=view.buffer, field=(*where, "args", name))
        body.append(lib)
    return ChildOp(tuple(declared["reads"]), tuple(declared["writes"]), tuple(body))


@dataclass(slots=True)
class _CompiledChild:
    """A child node's views and body args as compiled closures, made after the node bound once with every check
    (as :class:`_CompiledBinding` for kernels: a pool binds 89 child nodes a GEMM bucket). Later binds apply the
    same rules (the library call's check, the coverage of its accesses by the declared views); anything unusual
    falls back to :func:`_bind_child`, which names the culprit."""

    reads: tuple  # view payloads
    writes: tuple
    calls: tuple  # (signature, ((Param, "view" | "scalar" | "fixed", payload | closure | KernelArg), ...))
    declared: frozenset  # (view text, written) of the body's views that a declared view of the same text covers
    numbers: tuple  # closures of its scalars (in call order), then of each view's index: with the buffers, all that
    # its op depends on
    indices: dict  # view text → (start, end) of its index's values in `numbers`
    buffers: tuple[str, ...]  # the buffers it views
    whole: dict = field(default_factory=dict)  # whole-buffer views made (see _view_with)
    params: dict = field(default_factory=dict)  # (Param, dtype) → the Param with the buffer's dtype
    made: dict = field(default_factory=dict)  # (numbers' values, their types, buffer ids) → (ChildOp, buffers): run()

    @classmethod
    def of(cls, node: ChildNode) -> _CompiledChild:
        from .libcalls import LIBCALLS

        calls = []
        for call in node.child.body:
            sig, entries = LIBCALLS[call.call], []
            for p in sig.params:
                if p.name in call.args:
                    value = call.args[p.name]
                    entries.append((p, "view", _view_payload(value)) if p.pointer else (p, "scalar", _closure(value)))
                elif sig.defaults[p.name] is not None:
                    entries.append((p, "fixed", KernelArg(p, value=sig.defaults[p.name])))
            calls.append((sig, tuple(entries)))
        reads = tuple(_view_payload(t) for t in node.child.reads)
        writes = tuple(_view_payload(t) for t in node.child.writes)
        # the same text names the same bytes: a write is covered by a declared write, a read by either
        declared = {(v[2], True) for v in writes} | {(v[2], False) for v in reads + writes}
        payloads = {v[2]: v for v in reads + writes}
        numbers = []
        for _, entries in calls:
            for _, how, payload in entries:
                if how == "view":
                    payloads[payload[2]] = payload
                elif how == "scalar":
                    numbers.append(payload)
        indices = {}
        for text, v in payloads.items():
            if v[1] is not None:
                indices[text] = (len(numbers), len(numbers) + len(v[1]))
                numbers += v[1]
        bufs = sorted({v[0] for v in payloads.values()})
        return cls(reads, writes, tuple(calls), frozenset(declared), tuple(numbers), indices, tuple(bufs))

    def run(self, buffers, env) -> ChildOp:
        """The node's op for these buffers and env. Pool buckets whose GEMM rows are padded to one size bind
        equal child nodes (the layers' GEMMs of every bucket of a padding step): the op is a function of its
        indices' and scalars' values and of the buffers it views, so an equal key returns the op made before
        (:func:`bind` reuses equal buffers across binds: equal ones are one object)."""
        try:
            values = tuple(c(env) for c in self.numbers)
        except expr.ExprError:
            raise _Fallback from None
        key = (values, tuple(map(type, values)), tuple(id(buffers.get(b)) for b in self.buffers))
        made = self.made.get(key)
        if made is None:  # the entry holds the buffers it was made with: their ids stay theirs
            made = self.made[key] = (self._run(buffers, values), tuple(buffers.get(b) for b in self.buffers))
        return made[0]

    def _run(self, buffers, values: tuple) -> ChildOp:
        whole, indices = self.whole, self.indices
        views: dict[str, View] = {}  # this bind's views by text: the body names the declared views again
        scalars = iter(values)

        def view_of(payload):
            v = views.get(payload[2])
            if v is None:
                at = indices.get(payload[2])
                v = views[payload[2]] = _view_with(payload, buffers, at and values[at[0]:at[1]], whole)
            return v

        reads = tuple(view_of(v) for v in self.reads)
        writes = tuple(view_of(v) for v in self.writes)
        body = []
        for sig, entries in self.calls:
            args = []
            undeclared = []
            for p, how, payload in entries:
                if how == "view":
                    view = view_of(payload)
                    dtype = buffers[view.buffer].dtype
                    param = self.params.get((p, dtype))
                    if param is None:
                        param = self.params[(p, dtype)] = Param(p.name, dtype, True, p.const)
                    args.append(KernelArg(param, view=view))
                    if (payload[2], not p.const) not in self.declared:
                        undeclared.append((view, not p.const))
                elif how == "scalar":
                    try:
                        args.append(KernelArg(p, value=check_scalar(p.dtype, next(scalars))))
                    except (ValueError, OverflowError):
                        raise _Fallback from None
                else:
                    args.append(payload)
            if sig.check({a.param.name: a for a in args}, buffers):
                raise _Fallback
            for view, w in undeclared:
                if not any(d.covers(view) for d in (writes if w else reads + writes)):
                    raise _Fallback
            body.append(LibCall(sig.name, tuple(args)))
        return ChildOp(reads, writes, tuple(body))


@functools.lru_cache(maxsize=4096)
def _uses_var(node_id: str, var: str) -> bool:
    """Whether a ``{expr}`` template of ``node_id`` refers to ``var`` (unparsable ones count: bind reports them)."""
    for m in TEMPLATE.finditer(node_id):
        try:
            if var in expr.names(m.group(1)):
                return True
        except expr.ExprError:
            return True
    return False


def _fill_ids(text: str, env: Mapping[str, int | float]) -> str:
    """Substitute ``{expr}`` in ids and ``after`` entries: ``"proj.{l}"``, ``"norm.{l-1}"``."""
    parts = _id_parts(text)
    if len(parts) == 1:
        return text
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out.append(part)
        else:
            v = expr.evaluate(part, env)
            out.append(str(int(v)) if isinstance(v, float) and v.is_integer() else str(v))
    return "".join(out)


@functools.lru_cache(maxsize=4096)
def _id_parts(text: str) -> tuple[str, ...]:
    """An id template split into literal text (even places) and expressions (odd places)."""
    return tuple(TEMPLATE.split(text))


class _SizeLimit(Exception):
    pass


def _leaves(nodes, env: dict) -> int:
    """How many nodes ``nodes`` expand to, counting inner repeats at their first iteration's counts."""
    total = 0
    for node in nodes:
        if isinstance(node, RepeatBlock):
            try:
                count = expr.evaluate_int(node.repeat.count, env)
            except expr.ExprError:
                continue  # reported when expanded
            total += max(count, 0) * _leaves(node.nodes, {**env, node.repeat.var: 0})
            if total > MAX_NODES:
                return total
        elif isinstance(node, LoopNode):
            total += 1 + _leaves(node.nodes, env)
        else:
            total += 1
    return total


def _expand(nodes, base_path: tuple, env: dict, frames: tuple, issues: _Issues,
            budget: list[int], scope: str | None = None, out: list | None = None) -> list[tuple]:
    """(spec node, spec path, env, repeat frames, scope) for every node, repeat blocks expanded in order; a loop
    node comes first, then its body's nodes with ``scope`` its id. Appends to ``out`` (a list, not a generator:
    nested generators cost each node a resumption per level).

    ``budget`` holds the nodes still allowed; a spec that would pass :data:`MAX_NODES` raises _SizeLimit
    before expanding (repeat counts are multiplied out first), so a huge count fails at once."""
    if out is None:
        out = []
    for i, node in enumerate(nodes):
        path = (*base_path, i)
        if not isinstance(node, RepeatBlock):
            budget[0] -= 1
            if budget[0] < 0:
                raise _SizeLimit
            out.append((node, path, env, frames, scope))
            if isinstance(node, LoopNode):
                try:
                    inner = _fill_ids(node.id, env)
                except expr.ExprError:
                    continue  # bind reports the id; the body has no loop to belong to
                _expand(node.nodes, (*path, "nodes"), env, frames, issues, budget, inner, out)
            continue
        var = node.repeat.var
        where = dict(path=(*path, "repeat", "count"), field="repeat.count")
        try:
            count = expr.evaluate_int(node.repeat.count, env)
        except expr.ExprError as err:
            issues.add(err.code, f"repeat {var!r}: count: {err}", once=("count", path), **where)
            continue
        if count < 0:  # 0 is a switch: the block's nodes are left out (e.g. one kernel or five per layer)
            shown = f"{node.repeat.count!r} = {count}" if isinstance(node.repeat.count, str) else str(count)
            issues.add("out_of_bounds", f"repeat {var!r}: count = {shown}, must be ≥ 0", once=("count", path),
                       **where)
            continue
        if var in env:
            issues.add("schema", f"repeat var {var!r} shadows a dim or an outer repeat var",
                       path=(*path, "repeat", "var"), field="repeat.var", once=("var", path))
            continue
        if count == 0:  # switched off (a fused layer has a dozen such switches): nothing to expand or check
            continue
        # a huge count fails before expanding; a switch (count 1) spends the budget node by node as it expands
        if count > 1 and count * _leaves(node.nodes, {**env, var: 0}) > budget[0]:
            raise _SizeLimit
        for j, child in enumerate(node.nodes):  # a count of 0 or 1 is a switch: its ids may stay plain
            if count > 1 and not isinstance(child, RepeatBlock) and not _uses_var(child.id, var):
                issues.add("duplicate_id", f"node id {child.id!r} inside repeat {var!r} must use "
                           f"{{{var}}} so that each copy has its own id", nodes=(child.id,),
                           path=(*path, "nodes", j, "id"), field="id",
                           once=("duplicate_id", (*path, "nodes", j)))
        for value in range(count):
            frame = RepeatFrame(path, var, value, count)
            _expand(node.nodes, (*path, "nodes"), {**env, var: value}, (*frames, frame), issues, budget, scope, out)
    return out


def bind(spec: GraphSpec, overrides: Mapping[str, Any] | None = None,
         programs: dict | None = None) -> tuple[Plan, list[Issue]]:
    """Bind a spec; returns the (unanalysed) plan of every node that bound, and every issue found.

    ``programs`` carries compiled node bindings, kernel sources and the bound kernels (per set of types) from
    one bind to the next (a pool binds one spec once per bucket); the spec and its kernel files must not change
    in between."""
    issues = _Issues(spec)
    dims, types, consts = _resolve_overrides(spec, overrides or {}, issues)
    top = {**dims, **consts}  # consts are floats: every integer place (sizes, grids, indices) refuses them
    _checks(spec, top, issues)
    if programs is None:
        programs = {}  # per spec node: compiled after its first checked bind; kernel sources by path
    # the kernels depend on the types alone: a pool's buckets share them (bound afresh where they had issues)
    kernels_key = ("kernels", tuple(sorted(types.items())))
    if kernels_key in programs:
        kernels = dict(programs[kernels_key])
    else:
        before = len(issues.items)
        kernels = _bind_kernels(spec, types, issues, programs)
        if len(issues.items) == before:
            programs[kernels_key] = dict(kernels)
    # equal buffers of earlier binds are reused, so that compiled bindings can tell them by identity
    buffers = {n: programs.setdefault(("buffer", b), b) for n, b in _bind_buffers(spec, top, types, issues).items()}
    nodes: list[PlanNode] = []
    seen: dict[str, tuple] = {}
    # what a compiled binding depends on besides its spec node: the kernel's entry, params and launch
    # (one canonical tuple per distinct key, identified by its id: hashing Params per node costs)
    kernel_keys = programs.get(("kernel_keys", kernels_key))
    if kernel_keys is None:
        kernel_keys = {name: (k.entry, k.params, k.launch) for name, k in kernels.items()}
        kernel_keys = {name: id(programs.setdefault(("kernel", key), key)) for name, key in kernel_keys.items()}
        if kernels_key in programs:  # kernels bound without issues: the same for every bind of these types
            programs[("kernel_keys", kernels_key)] = kernel_keys
    try:
        for node, path, env, frames, scope in _expand(spec.nodes, ("nodes",), dict(top), (), issues, [MAX_NODES]):
            pn = _bind_node(node, path, env, frames, len(nodes), spec, kernels, buffers, kernel_keys, programs,
                            seen, issues, scope)
            if pn is not None:
                nodes.append(pn)
    except _SizeLimit:
        issues.add("size_limit", f"the spec expands to more than {MAX_NODES} nodes (the documented limit); "
                   "split the graph or use fewer repeat iterations", path=("nodes",), field="nodes")
        return Plan(spec.name, dims, types, spec.deps, kernels, buffers, [], spec, consts=consts), issues.items
    if any(isinstance(pn.op, LoopOp) for pn in nodes):
        nodes = finish_loops(nodes, issues, spec)
        kernels.update(_loop_kernels(spec, issues, programs))
    # `after` may only name nodes that exist, in the same graph (the top, or the same loop body)
    scope_of = {pn.id: pn.scope for pn in nodes}
    for k, pn in enumerate(nodes):
        missing = [a for a in pn.after if a not in scope_of]
        for a in missing:
            issues.add("unknown_reference", f"node {pn.id!r}: after: unknown node {a!r}",
                       nodes=(pn.id, a), path=(*pn.path, "after"), field="after")
        elsewhere = [a for a in pn.after if a in scope_of and scope_of[a] != pn.scope]
        for a in elsewhere:
            where = lambda s: "the top graph" if s is None else f"the body of loop {s!r}"
            issues.add("unknown_reference", f"node {pn.id!r}: after: {a!r} is in {where(scope_of[a])}, but "
                       f"{pn.id!r} is in {where(pn.scope)}; `after` orders nodes of one graph only (order the "
                       "loop node itself instead)", nodes=(pn.id, a), path=(*pn.path, "after"), field="after")
        if missing or elsewhere:
            nodes[k] = replace(pn, after=tuple(a for a in pn.after if a in scope_of and scope_of[a] == pn.scope))
    return Plan(spec.name, dims, types, spec.deps, kernels, buffers, nodes, spec, consts=consts), issues.items


def _bind_node(node, path, env, frames, order, spec, kernels, buffers, kernel_keys, programs, seen,
               issues: _Issues, scope: str | None = None) -> PlanNode | None:
    try:
        node_id = _fill_ids(node.id, env)
    except expr.ExprError as err:
        issues.add(err.code, f"node id {node.id!r}: {err}", nodes=(node.id,), path=(*path, "id"),
                   field="id", once=("id", path))  # once per spec node, not per repeat iteration
        return None
    if node_id in seen:
        # a repeat's copies of one spec node collide: report it once per spec node (and not at all
        # when _expand already said that the id must use the repeat var)
        issues.add("duplicate_id", f"node id {node_id!r} is used more than once", nodes=(node_id,),
                   path=(*path, "id"), field="id", once=("duplicate_id", path))
        return None
    seen[node_id] = path
    after: tuple[str, ...] = ()
    try:
        after = tuple(_fill_ids(a, env) for a in node.after)
    except expr.ExprError as err:
        issues.add(err.code, f"node {node_id!r}: after: {err}", nodes=(node_id,),
                   path=(*path, "after"), field="after", once=("after", path))
    try:
        if isinstance(node, KernelNode):
            variant = None
            if node.variants:
                node, variant = _choose_variant(node, env, programs)
            kernel = kernels.get(node.kernel)
            key = (id(node), kernel_keys.get(node.kernel))
            compiled = programs.get(key)
            try:
                if compiled is None:
                    raise _Fallback
                op = compiled[1].run(kernel, buffers, env)
            except _Fallback:
                try:
                    op = _bind_kernel_node(node, kernel, buffers, spec, env)  # checks all, names culprits
                except NodeError as e:
                    if variant is not None:
                        raise _variant_error(e, variant, node) from None
                    raise
                programs[key] = (node, _CompiledBinding.of(node, kernel))  # node kept: its id stays its
        else:
            if node.launch == "programmatic":
                raise NodeError("launch_config", f"`launch: programmatic` is for kernel nodes only: a "
                                 f"programmatic edge joins two kernels, and this is a {_kind(node)} node",
                                 field=("launch",))
            if isinstance(node, LoopNode):
                op = _bind_loop(node, node_id, buffers, spec, env)
            elif isinstance(node, MemcpyNode):
                op = _bind_memcpy(node, buffers, spec, env)
            elif isinstance(node, MemsetNode):
                op = _bind_memset(node, buffers, spec, env)
            elif isinstance(node, ChildNode):
                compiled = programs.get(("child", id(node)))
                try:
                    if compiled is None:
                        raise _Fallback
                    op = compiled[1].run(buffers, env)
                except _Fallback:
                    op = _bind_child(node, buffers, spec, env)  # checks all, names culprits
                    programs[("child", id(node))] = (node, _CompiledChild.of(node))  # node kept: its id stays its
            else:
                assert isinstance(node, EmptyNode)
                op = EmptyOp()
    except NodeError as e:
        if e.code != "skip":
            issues.add(e.code, f"node {node_id!r}: {e}", nodes=(node_id,), buffer=e.buffer,
                       path=(*path, *e.field), field=".".join(map(str, e.field)) or None)
        return None
    return PlanNode(node_id, order, path, op, frames, after, scope)


def _choose_variant(node: KernelNode, env, programs: dict) -> tuple[KernelNode, int | None]:
    """The node as its first variant whose ``when`` holds makes it (or the node itself, and None). The
    effective nodes are made once per spec node and kept in ``programs``, so compiled bindings key on them."""
    for i, v in enumerate(node.variants):
        try:
            hold = expr.evaluate(v.when, env)
        except expr.ExprError as err:
            raise NodeError(err.code, f"variants[{i}].when: {err}", field=("variants", i, "when")) from None
        if not hold:
            continue
        key = ("variant", id(node), i)
        made = programs.get(key)
        if made is None:
            fields = {"kernel": v.kernel, "args": {**node.args, **v.args}, "variants": []}
            fields |= {k: getattr(v, k) for k in ("grid", "block", "shared", "launch") if getattr(v, k) is not None}
            made = programs[key] = (node, node.model_copy(update=fields))  # node kept: its id stays unique
        return made[1], i
    return node, None


def _variant_error(e: NodeError, i: int, node: KernelNode) -> NodeError:
    """A chosen variant's binding error, naming the variant (and its field where it set that field)."""
    own = e.field[:1] and e.field[0] in ("kernel", "grid", "block", "shared", "launch", "args")
    field = ("variants", i, *e.field) if own else e.field
    return NodeError(e.code, f"variants[{i}] (kernel {node.kernel!r}): {e}", buffer=e.buffer, field=field)


def _kind(node: Any) -> str:
    return next(k for k in ("kernel", "memcpy", "memset", "empty", "child", "loop") if hasattr(node, k))


# ---- loops ---------------------------------------------------------------------------------------------

#: dtypes a loop's ``until`` buffer may have (the loop kernels read it as a 32-bit integer).
UNTIL_DTYPES = ("i32", "u32")


def _bind_loop(node: LoopNode, node_id: str, buffers: dict, spec, env) -> LoopOp:
    """A loop's own numbers (its body is bound as nodes of their own; :func:`finish_loops` completes it).

    Adds the loop's iteration counter to ``buffers`` as ``<id>.iter`` (no spec buffer has a dot)."""
    try:
        count = expr.evaluate_int(node.loop.max, env)
    except expr.ExprError as err:
        raise NodeError(err.code, f"loop max: {err}", field=("loop", "max")) from None
    if count < 1:
        shown = f"{node.loop.max!r} = {count}" if isinstance(node.loop.max, str) else str(count)
        raise NodeError("out_of_bounds", f"loop max = {shown}, must be ≥ 1", field=("loop", "max"))
    until = None
    if node.loop.until is not None:
        try:
            until = resolve_view(node.loop.until, buffers, env, spec.buffers)
        except NodeError as e:
            e.field = ("loop", "until")
            raise
        b = buffers[until.buffer]
        if b.dtype not in UNTIL_DTYPES or b.memory != "device" or until.nbytes != 4:
            raise NodeError("arg_mismatch", f"loop until {node.loop.until!r} must be one {' or '.join(UNTIL_DTYPES)} "
                             f"element of device memory (the loop kernels read it), but it is {until.nbytes} bytes "
                             f"of {b.memory} {b.dtype}", buffer=until.buffer, field=("loop", "until"))
    try:
        unroll = expr.evaluate_int(node.loop.unroll, env)
    except expr.ExprError as err:
        raise NodeError(err.code, f"loop unroll: {err}", field=("loop", "unroll")) from None
    if unroll < 1 or count % unroll:
        raise NodeError("out_of_bounds", f"loop unroll = {unroll} must be ≥ 1 and divide max = {count} (the body "
                        "runs unroll times per iteration, never more than max times in all)", field=("loop", "unroll"))
    if not node.nodes:
        raise NodeError("schema", "loop body is empty: give it `nodes`", field=("nodes",))
    name = f"{node_id}.iter"
    buffers[name] = PlanBuffer(name, "i32", (1,), "device", frozenset())
    return LoopOp(count, until, view_at(buffers[name], name, None), unroll=unroll)


def finish_loops(nodes: list[PlanNode], issues: _Issues, spec) -> list[PlanNode]:
    """Give each loop its body (direct members) and every byte range the body touches, innermost loops
    first; drop nodes whose loop failed to bind (its issue is reported). A loop with ``until`` whose body
    never writes it could never stop early: an issue."""
    loops = {pn.id: k for k, pn in enumerate(nodes) if isinstance(pn.op, LoopOp)}
    nodes = [pn for pn in nodes if pn.scope is None or pn.scope in loops]
    loops = {pn.id: k for k, pn in enumerate(nodes) if isinstance(pn.op, LoopOp)}
    members: dict[str, list[PlanNode]] = {lid: [] for lid in loops}
    for pn in nodes:
        if pn.scope is not None:
            members[pn.scope].append(pn)
    for lid, k in sorted(loops.items(), key=lambda t: -t[1]):  # later loops first: inner before outer
        pn, body = nodes[k], [nodes[loops[m.id]] if m.id in loops else m for m in members[lid]]
        op: LoopOp = pn.op  # type: ignore[assignment]
        access: dict[tuple[View, bool], None] = {}
        for m in body:
            for a in m.accesses():
                access[a] = None
        writes_until = op.until is not None and any(w and v.overlaps(op.until) for v, w in access)
        if op.until is not None:
            access[(op.until, False)] = None
        nodes[k] = replace(pn, op=replace(op, body=tuple(m.id for m in body), access=tuple(access)))
        if op.until is not None and not writes_until:
            issues.add("unknown_reference", f"loop {lid!r}: no node of its body writes its until buffer "
                       f"{op.until.label!r}, so the loop could never stop before max = {op.max} (leave `until` "
                       "out for a fixed count)", nodes=(lid,), buffer=op.until.buffer,
                       path=(*pn.path, "loop", "until"), field="loop.until")
    return nodes


def _loop_kernels(spec, issues: _Issues, cache: dict) -> dict[str, PlanKernel]:
    """The two kernels a loop's WHILE node needs (kernels/loop.cu, shipped with dagbuild)."""
    from .data import data_root
    from .sources import read_kernel_source

    try:
        path = data_root() / "kernels" / "loop.cu"
        if ("source", path) not in cache:
            cache[("source", path)] = read_kernel_source(path)
    except Exception as e:
        issues.add("unknown_reference", f"dagbuild's loop kernels could not be read: {e}", field="nodes")
        return {}
    source = cache[("source", path)]
    params = (Param("until", "i32", True, True), Param("counter", "i32", True, False),
              Param("handle", "u64", False, False), Param("max", "i32", False, False))
    return {name: PlanKernel(name, name.removeprefix("dagbuild."), params, source, path, ())
            for name in (LOOP_ENTER, LOOP_NEXT)}
