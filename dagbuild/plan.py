"""GraphSpec → Plan: dims bound, repeats expanded, views resolved to byte ranges, args type-checked.

A Plan is plain data: every number a kernel launch, memcpy or memset needs, and what bytes each node
reads and writes. It allocates nothing; :mod:`dagbuild.dag` orders it and a backend builds it.
"""

from __future__ import annotations

import functools
import math
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import expr
from .errors import Issue, SpecError
from .spec import (
    ELEMENT_TYPES,
    ITEMSIZE,
    SCALAR_TYPES,
    EmptyNode,
    GraphSpec,
    KernelNode,
    MemcpyNode,
    MemsetNode,
    RepeatBlock,
)

MAX_THREADS_PER_BLOCK = 1024
MAX_BLOCK = (1024, 1024, 64)
MAX_GRID = (2**31 - 1, 65535, 65535)
INT_RANGE = {"i32": (-(2**31), 2**31 - 1), "u32": (0, 2**32 - 1),
             "i64": (-(2**63), 2**63 - 1), "u64": (0, 2**64 - 1),
             "i8": (-128, 127), "u8": (0, 255)}

_PARAM = re.compile(r"^\s*(const\s+)?([A-Za-z_]\w*)\s*(\*)?\s*([A-Za-z_]\w*)\s*$")
_VIEW = re.compile(r"^\s*([A-Za-z_]\w*)\s*(?:\[(.*)\])?\s*$", re.S)
TEMPLATE = re.compile(r"\{([^{}]+)\}")  # {expr} in ids and `after`


@dataclass(frozen=True)
class Param:
    """One declared kernel param: ``const f16* w`` is a read-only pointer to f16."""

    name: str
    dtype: str
    pointer: bool
    const: bool

    @property
    def kind(self) -> str:
        """What the launch packs: ``ptr`` or the scalar type."""
        return "ptr" if self.pointer else self.dtype

    def __str__(self) -> str:
        return f"{'const ' if self.const else ''}{self.dtype}{'*' if self.pointer else ''} {self.name}"


@dataclass(slots=True)
class View:
    """A contiguous byte range of one buffer: a whole buffer or ``name[i, j]``."""

    buffer: str
    offset: int
    nbytes: int
    text: str

    def overlaps(self, other: View) -> bool:
        return (self.buffer == other.buffer and self.offset < other.offset + other.nbytes
                and other.offset < self.offset + self.nbytes)

    def covers(self, other: View) -> bool:
        return (self.buffer == other.buffer and self.offset <= other.offset
                and other.offset + other.nbytes <= self.offset + self.nbytes)


@dataclass(frozen=True)
class PlanKernel:
    name: str
    entry: str
    params: tuple[Param, ...]
    source: str  # the CUDA C++ text
    path: Path | None  # where it was read from, if a file
    options: tuple[str, ...]


@dataclass(frozen=True)
class PlanBuffer:
    name: str
    dtype: str
    shape: tuple[int, ...]
    memory: str  # device | pinned
    dims_used: frozenset[str]  # dims its shape refers to (a pool buckets some of them)
    itemsize: int = field(init=False)
    nbytes: int = field(init=False)
    strides: tuple[int, ...] = field(init=False)  # in elements, row-major

    def __post_init__(self) -> None:
        object.__setattr__(self, "itemsize", ITEMSIZE[self.dtype])
        object.__setattr__(self, "nbytes", math.prod(self.shape) * self.itemsize)
        object.__setattr__(self, "strides", tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape))))


@dataclass(slots=True)
class KernelArg:
    param: Param
    value: int | float | None = None  # scalars
    view: View | None = None  # pointers


@dataclass(frozen=True)
class RepeatFrame:
    """Where a node sits inside ``repeat`` blocks: which block (by spec path), var, and value."""

    block: tuple
    var: str
    value: int
    count: int


@dataclass
class PlanNode:
    id: str
    kind: str  # kernel | memcpy | memset | empty
    order: int
    path: tuple  # spec path of the node it came from, e.g. ('nodes', 4, 'nodes', 0)
    repeats: tuple[RepeatFrame, ...] = ()
    after: tuple[str, ...] = ()
    kernel: str | None = None
    grid: tuple[int, int, int] = (1, 1, 1)
    block: tuple[int, int, int] = (1, 1, 1)
    shared: int = 0
    args: tuple[KernelArg, ...] = ()
    src: View | None = None
    dst: View | None = None
    direction: str | None = None  # H2D | D2H | D2D | H2H
    value: int | float | None = None  # memset value as written
    value_bits: int = 0  # memset element bit pattern
    element_size: int = 1
    count: int = 0
    reads: tuple[View, ...] = ()
    writes: tuple[View, ...] = ()

    @property
    def threads(self) -> int:
        return math.prod(self.block)


@dataclass
class Plan:
    """Everything bound: the input of DAG analysis and of every backend."""

    name: str
    dims: dict[str, int]
    types: dict[str, str]
    deps: str
    kernels: dict[str, PlanKernel]
    buffers: dict[str, PlanBuffer]
    nodes: list[PlanNode]
    spec: GraphSpec = field(repr=False)
    edges: list[tuple[str, str]] = field(default_factory=list)  # reduced DAG, set by dag.analyze
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def node_by_id(self) -> dict[str, PlanNode]:
        return {n.id: n for n in self.nodes}

    def topological(self) -> list[PlanNode]:
        """Nodes in an order the edges allow, list order breaking ties (Kahn's algorithm on a heap)."""
        import heapq

        preds_left = {n.id: 0 for n in self.nodes}
        succs: dict[str, list[str]] = {n.id: [] for n in self.nodes}
        for u, v in self.edges:
            succs[u].append(v)
            preds_left[v] += 1
        by_id = {n.id: n for n in self.nodes}
        ready = [(n.order, n.id) for n in self.nodes if preds_left[n.id] == 0]
        heapq.heapify(ready)
        out = []
        while ready:
            _, nid = heapq.heappop(ready)
            out.append(by_id[nid])
            for v in succs[nid]:
                preds_left[v] -= 1
                if preds_left[v] == 0:
                    heapq.heappush(ready, (by_id[v].order, v))
        return out

    def preds(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {n.id: [] for n in self.nodes}
        for u, v in self.edges:
            out[v].append(u)
        return out


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
    """(bit pattern, element size, repeat factor) that a memset node writes for one element."""
    size = ITEMSIZE[dtype]
    if size == 8:
        if value != 0:
            raise ValueError(f"8-byte dtype {dtype} can only be memset to 0")
        return 0, 4, 2
    if dtype in INT_RANGE:
        if isinstance(value, float) and not value.is_integer():
            raise TypeError(f"{value!r} is not an integer, but the buffer is {dtype}")
        lo, hi = INT_RANGE[dtype]
        v = int(value)
        if not lo <= v <= hi:
            raise OverflowError(f"{v} does not fit in {dtype} [{lo}, {hi}]")
        return v & ((1 << (8 * size)) - 1), size, 1
    if dtype == "f32":
        return struct.unpack("<I", struct.pack("<f", float(value)))[0], 4, 1
    if dtype == "f16":
        with np.errstate(over="ignore"):
            half = np.array(value, np.float16)
        if np.isinf(half) and not math.isinf(value):
            raise OverflowError(f"{value} does not fit in f16 (max 65504)")
        return int(half.view(np.uint16)), 2, 1
    if dtype == "bf16":
        bits = struct.unpack("<I", struct.pack("<f", float(value)))[0]
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF, 2, 1  # round to nearest even
    raise ValueError(f"cannot memset dtype {dtype}")


def _template(text: str, env: Mapping[str, int | float]) -> str:
    """Substitute ``{expr}`` in ids and ``after`` entries: ``"proj.{l}"``, ``"norm.{l-1}"``."""
    def sub(m: re.Match) -> str:
        v = expr.evaluate(m.group(1), env)
        return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)

    return TEMPLATE.sub(sub, text)


def _resolve_overrides(spec: GraphSpec, overrides: Mapping[str, Any], issues: _Issues):
    dims, types = dict(spec.dims), dict(spec.types)
    for name, value in overrides.items():
        if name in dims:
            try:
                dims[name] = int(value)
            except (TypeError, ValueError):
                issues.add("schema", f"--set {name}={value!r}: dim {name!r} needs an integer", field=name)
        elif name in types:
            types[name] = str(value)
        else:
            issues.add("unknown_reference",
                       f"--set {name}: no dim or type named {name!r} "
                       f"(dims: {', '.join(dims) or 'none'}; types: {', '.join(types) or 'none'})",
                       field=name)
    for name, t in types.items():
        if t not in ELEMENT_TYPES:
            issues.bad_types.add(name)
            issues.add("schema", f"type {name!r} = {t!r} is not one of {', '.join(ELEMENT_TYPES)}",
                       path=("types", name), field=f"types.{name}")
    return dims, types


def _read_source(name: str, decl, spec: GraphSpec, issues: _Issues) -> tuple[str, Path | None]:
    if decl.code is not None:
        return decl.code, None
    base = spec.base_dir or Path.cwd()
    path = (base / decl.source).resolve()
    try:
        return path.read_text(), path
    except OSError:
        issues.add("unknown_reference", f"kernel {name!r}: source file {decl.source!r} not found "
                   f"(looked at {path})", path=("kernels", name, "source"), field=f"kernels.{name}.source")
        return "", path


def _bind_kernels(spec: GraphSpec, types: dict[str, str], issues: _Issues) -> dict[str, PlanKernel]:
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
        for dup in {n for n in names if names.count(n) > 1}:
            issues.add("schema", f"kernel {name!r}: param {dup!r} declared twice",
                       path=("kernels", name, "params"), field=f"kernels.{name}.params")
            ok = False
        try:
            entry = re.sub(r"\{(\w+)\}", lambda m: types[m.group(1)], decl.entry)
        except KeyError as e:
            issues.add("unknown_reference", f"kernel {name!r}: entry {decl.entry!r} names unknown type {e}",
                       path=("kernels", name, "entry"), field=f"kernels.{name}.entry")
            ok = False
        source, path = _read_source(name, decl, spec, issues)
        if ok:
            out[name] = PlanKernel(name, entry, tuple(params), source, path, tuple(decl.options))
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
            try:
                n = expr.evaluate_int(e, dims)
                used |= expr.names(e)
            except expr.ExprError as err:
                code = "unknown_reference" if "unknown name" in str(err) else "expression"
                issues.add(code, f"buffer {name!r}: shape[{i}]: {err}", buffer=name,
                           path=(*path, "shape", i), field=f"buffers.{name}.shape[{i}]")
                ok = False
                continue
            if n < 1:
                issues.add("out_of_bounds", f"buffer {name!r}: shape[{i}] = {e!r} = {n}, must be ≥ 1",
                           buffer=name, path=(*path, "shape", i), field=f"buffers.{name}.shape[{i}]")
                ok = False
            shape.append(n)
        if ok:
            out[name] = PlanBuffer(name, dtype, tuple(shape), decl.memory, frozenset(used))
    return out


class NodeError(Exception):
    def __init__(self, code: str, message: str, buffer: str | None = None, field: tuple = ()):
        super().__init__(message)
        self.code, self.buffer, self.field = code, buffer, field


def _expr_error(err: expr.ExprError, what: str, field: tuple = ()) -> NodeError:
    code = "unknown_reference" if "unknown name" in str(err) else "expression"
    return NodeError(code, f"{what}: {err}", field=field)


@functools.lru_cache(maxsize=8192)
def parse_view(text: str) -> tuple[str, tuple[str, ...] | None] | None:
    """``"w[l, 0]"`` → ``("w", ("l", "0"))``; ``"w"`` → ``("w", None)``; None when it is no view."""
    m = _VIEW.match(text)
    if not m:
        return None
    return m.group(1), None if m.group(2) is None else tuple(expr.split_top_level(m.group(2)))


def resolve_view(text: str, buffers: Mapping[str, PlanBuffer], env: Mapping[str, int | float],
                 spec_buffers: Mapping[str, Any] | None = None) -> View:
    """``"w[l]"`` → the byte range of that row of ``w``; raises NodeError naming the culprit."""
    parsed = parse_view(text)
    if parsed is None:
        raise NodeError("expression", f"cannot parse buffer view {text!r}; write `name` or `name[i, j]`")
    name, parts = parsed
    buf = buffers.get(name)
    if buf is None:
        if spec_buffers is not None and name in spec_buffers:
            raise NodeError("skip", "")  # the buffer itself is invalid and already reported
        raise NodeError("unknown_reference", f"unknown buffer {name!r}", buffer=name)
    if parts is None:
        return View(name, 0, buf.nbytes, text.strip())
    if len(parts) > len(buf.shape):
        raise NodeError("out_of_bounds", f"view {text!r} has {len(parts)} indices but buffer {name!r} "
                         f"has {len(buf.shape)} axes", buffer=name)
    strides = buf.strides
    offset = 0
    for axis, part in enumerate(parts):
        try:
            i = expr.evaluate_int(part, env)
        except expr.ExprError as err:
            raise _expr_error(err, f"view {text!r}") from None
        if not 0 <= i < buf.shape[axis]:
            raise NodeError("out_of_bounds", f"view {text!r}: index {i} is outside axis {axis} of "
                             f"buffer {name!r} (size {buf.shape[axis]})", buffer=name)
        offset += i * strides[axis]
    nbytes = strides[len(parts) - 1] * buf.itemsize
    return View(name, offset * buf.itemsize, nbytes, text.strip())


def _dims3(values: list, what: str, env, limits: tuple[int, int, int]) -> tuple[int, int, int]:
    if not 1 <= len(values) <= 3:
        raise NodeError("launch_config", f"{what} needs 1 to 3 dimensions, got {len(values)}", field=(what,))
    out = []
    for i, v in enumerate(values):
        try:
            n = expr.evaluate_int(v, env)
        except expr.ExprError as err:
            raise _expr_error(err, f"{what}[{i}]", (what, i)) from None
        if n < 1:
            raise NodeError("launch_config", f"{what}[{i}] = {v!r} = {n}, must be ≥ 1", field=(what, i))
        if n > limits[i]:
            raise NodeError("launch_config", f"{what}[{i}] = {n} exceeds the limit {limits[i]}",
                             field=(what, i))
        out.append(n)
    return tuple(out + [1] * (3 - len(out)))  # type: ignore[return-value]


def _bind_kernel_node(node: KernelNode, pn: PlanNode, kernels, buffers, spec, env) -> None:
    kernel = kernels.get(node.kernel)
    if kernel is None:
        if node.kernel in spec.kernels:
            raise NodeError("skip", "")
        raise NodeError("unknown_reference", f"unknown kernel {node.kernel!r} "
                         f"(declared: {', '.join(spec.kernels) or 'none'})", field=("kernel",))
    pn.kernel = kernel.name
    pn.grid = _dims3(node.grid, "grid", env, MAX_GRID)
    pn.block = _dims3(node.block, "block", env, MAX_BLOCK)
    if pn.threads > MAX_THREADS_PER_BLOCK:
        raise NodeError("launch_config", f"block {list(pn.block)} has {pn.threads} threads, more than "
                         f"{MAX_THREADS_PER_BLOCK}", field=("block",))
    try:
        pn.shared = expr.evaluate_int(node.shared, env)
    except expr.ExprError as err:
        raise _expr_error(err, "shared", ("shared",)) from None
    if pn.shared < 0:
        raise NodeError("launch_config", f"shared = {pn.shared} bytes, must be ≥ 0", field=("shared",))
    declared = {p.name for p in kernel.params}
    problems = [f"unknown arg {a!r}" for a in node.args if a not in declared]
    problems += [f"missing arg {p.name!r} ({p})" for p in kernel.params if p.name not in node.args]
    if problems:
        raise NodeError("arg_mismatch", f"kernel {kernel.name!r}: {'; '.join(problems)} "
                         f"(params: {', '.join(str(p) for p in kernel.params)})", field=("args",))
    args, reads, writes = [], [], []
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
            (reads if p.const else writes).append(view)
        else:
            if named is not None and named in spec.buffers:
                raise NodeError("arg_mismatch", f"kernel {kernel.name!r}: scalar param `{p}` was given the "
                                 f"buffer {value!r}", buffer=named,
                                 field=("args", p.name))
            try:
                v = expr.evaluate(value, env)
            except expr.ExprError as err:
                raise _expr_error(err, f"arg {p.name!r}", ("args", p.name)) from None
            if p.dtype in INT_RANGE:
                if isinstance(v, float):
                    if not v.is_integer():
                        raise NodeError("expression", f"arg {p.name!r} = {value!r} = {v} is not an integer, "
                                         f"but `{p}` needs one", field=("args", p.name))
                    v = int(v)
                lo, hi = INT_RANGE[p.dtype]
                if not lo <= v <= hi:
                    raise NodeError("out_of_bounds", f"arg {p.name!r} = {v} does not fit in {p.dtype}",
                                     field=("args", p.name))
            else:
                try:
                    v = float(v)
                except OverflowError:
                    raise NodeError("out_of_bounds", f"arg {p.name!r} = {v} does not fit in {p.dtype}",
                                    field=("args", p.name)) from None
            args.append(KernelArg(p, value=v))
    pn.args, pn.reads, pn.writes = tuple(args), tuple(reads), tuple(writes)


class _Fallback(Exception):
    """The compiled fast path met something only the validating binder can explain."""


@dataclass(slots=True)
class _KernelProgram:
    """A kernel node's numbers as compiled closures, made after the node bound once with every check.
    Later binds (other repeat iterations, other dims) evaluate these and check only the numbers."""

    grid: tuple
    block: tuple
    shared: Any
    args: tuple  # (Param, closure) for scalars; (Param, (buffer, index closures | None, text)) for views


def _compile_kernel_node(node: KernelNode, kernel: PlanKernel) -> _KernelProgram:
    def closure(v):
        return expr.compiled(v) if isinstance(v, str) else (lambda env, v=v: v)

    args = []
    for p in kernel.params:
        value = node.args[p.name]
        if p.pointer:
            name, index = parse_view(value)
            args.append((p, (name, None if index is None else tuple(closure(i) for i in index), value.strip())))
        else:
            args.append((p, closure(value)))
    return _KernelProgram(tuple(closure(g) for g in node.grid), tuple(closure(b) for b in node.block),
                          closure(node.shared), tuple(args))


def _int(v: Any) -> int:
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    raise _Fallback


def _run_kernel_program(prog: _KernelProgram, pn: PlanNode, kernel: PlanKernel, buffers, env) -> None:
    try:
        grid = [_int(c(env)) for c in prog.grid]
        block = [_int(c(env)) for c in prog.block]
        shared = _int(prog.shared(env))
    except expr.ExprError:
        raise _Fallback from None
    grid += [1] * (3 - len(grid))
    block += [1] * (3 - len(block))
    if (min(grid) < 1 or min(block) < 1 or shared < 0 or block[0] * block[1] * block[2] > MAX_THREADS_PER_BLOCK
            or any(g > m for g, m in zip(grid, MAX_GRID, strict=True))
            or any(b > m for b, m in zip(block, MAX_BLOCK, strict=True))):
        raise _Fallback
    args, reads, writes = [], [], []
    for p, payload in prog.args:
        if p.pointer:
            name, index, text = payload
            buf = buffers.get(name)
            if buf is None or buf.dtype != p.dtype:
                raise _Fallback
            if index is None:
                view = View(name, 0, buf.nbytes, text)
            else:
                offset, shape, strides = 0, buf.shape, buf.strides
                if len(index) > len(shape):
                    raise _Fallback
                for axis, c in enumerate(index):
                    try:
                        i = _int(c(env))
                    except expr.ExprError:
                        raise _Fallback from None
                    if not 0 <= i < shape[axis]:
                        raise _Fallback
                    offset += i * strides[axis]
                view = View(name, offset * buf.itemsize, strides[len(index) - 1] * buf.itemsize, text)
            args.append(KernelArg(p, view=view))
            (reads if p.const else writes).append(view)
        else:
            try:
                v = payload(env)
            except (expr.ExprError, OverflowError):
                raise _Fallback from None
            rng = INT_RANGE.get(p.dtype)
            if rng is not None:
                v = _int(v)
                if not rng[0] <= v <= rng[1]:
                    raise _Fallback
            else:
                try:
                    v = float(v)
                except OverflowError:
                    raise _Fallback from None
            args.append(KernelArg(p, value=v))
    pn.kernel, pn.grid, pn.block, pn.shared = kernel.name, tuple(grid), tuple(block), shared
    pn.args, pn.reads, pn.writes = tuple(args), tuple(reads), tuple(writes)


def _bind_memcpy(node: MemcpyNode, pn: PlanNode, buffers, spec, env) -> None:
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
    mem = {"device": "D", "pinned": "H"}
    pn.src, pn.dst = src, dst
    pn.direction = f"{mem[buffers[src.buffer].memory]}2{mem[buffers[dst.buffer].memory]}"
    pn.count = src.nbytes
    pn.reads, pn.writes = (src,), (dst,)


def _bind_memset(node: MemsetNode, pn: PlanNode, buffers, spec, env) -> None:
    try:
        dst = resolve_view(node.memset.dst, buffers, env, spec.buffers)
    except NodeError as e:
        e.field = ("memset", "dst")
        raise
    dtype = buffers[dst.buffer].dtype
    try:
        bits, esize, factor = memset_bits(dtype, node.memset.value)
    except TypeError as e:
        raise NodeError("arg_mismatch", f"memset value: {e}", buffer=dst.buffer, field=("memset", "value")) from None
    except (OverflowError, ValueError) as e:
        raise NodeError("out_of_bounds", f"memset value: {e}", buffer=dst.buffer, field=("memset", "value")) from None
    pn.dst, pn.value, pn.value_bits, pn.element_size = dst, node.memset.value, bits, esize
    pn.count = dst.nbytes // esize
    pn.writes = (dst,)


def _uses_var(node_id: str, var: str) -> bool:
    """Whether a ``{expr}`` template of ``node_id`` refers to ``var`` (unparsable ones count: bind reports them)."""
    for m in TEMPLATE.finditer(node_id):
        try:
            if var in expr.names(m.group(1)):
                return True
        except expr.ExprError:
            return True
    return False


def _expand(nodes, base_path: tuple, env: dict, frames: tuple, issues: _Issues) -> Iterator[tuple]:
    """Yield (spec node, spec path, env, repeat frames), expanding repeat blocks in order."""
    for i, node in enumerate(nodes):
        path = (*base_path, i)
        if isinstance(node, RepeatBlock):
            var = node.repeat.var
            try:
                count = expr.evaluate_int(node.repeat.count, env)
            except expr.ExprError as err:
                code = "unknown_reference" if "unknown name" in str(err) else "expression"
                issues.add(code, f"repeat {var!r}: count: {err}", path=(*path, "repeat", "count"),
                           field="repeat.count", once=("count", path))
                continue
            if count <= 0:
                issues.add("out_of_bounds", f"repeat {var!r}: count = {node.repeat.count!r} = {count}, "
                           "must be ≥ 1", path=(*path, "repeat", "count"), field="repeat.count",
                           once=("count", path))
                continue
            if var in env:
                issues.add("schema", f"repeat var {var!r} shadows a dim or an outer repeat var",
                           path=(*path, "repeat", "var"), field="repeat.var", once=("var", path))
                continue
            for j, child in enumerate(node.nodes):
                if not isinstance(child, RepeatBlock) and not _uses_var(child.id, var):
                    issues.add("duplicate_id", f"node id {child.id!r} inside repeat {var!r} must use "
                               f"{{{var}}} so that each copy has its own id", nodes=(child.id,),
                               path=(*path, "nodes", j, "id"), field="id",
                               once=("duplicate_id", (*path, "nodes", j)))
            for value in range(count):
                frame = RepeatFrame(path, var, value, count)
                yield from _expand(node.nodes, (*path, "nodes"), {**env, var: value}, (*frames, frame),
                                   issues)
        else:
            yield node, path, env, frames


def bind(spec: GraphSpec, overrides: Mapping[str, Any] | None = None,
         programs: dict | None = None) -> tuple[Plan, list[Issue]]:
    """Bind a spec; returns the plan of every node that bound, and every issue found.

    ``programs`` carries compiled kernel-node programs from one bind to the next (a pool binds one
    spec once per bucket); the spec must not change in between."""
    issues = _Issues(spec)
    dims, types = _resolve_overrides(spec, overrides or {}, issues)
    kernels = _bind_kernels(spec, types, issues)
    buffers = _bind_buffers(spec, dims, types, issues)
    nodes: list[PlanNode] = []
    seen: dict[str, tuple] = {}
    if programs is None:
        programs = {}  # per spec node: compiled after its first checked bind
    # what a compiled program depends on besides its spec node: the kernel's entry and params
    kernel_keys = {name: (k.entry, k.params) for name, k in kernels.items()}
    kernel_keys = {name: programs.setdefault(("kernel", key), key) for name, key in kernel_keys.items()}
    for node, path, env, frames in _expand(spec.nodes, ("nodes",), dict(dims), (), issues):
        try:
            node_id = _template(node.id, env)
        except expr.ExprError as err:
            code = "unknown_reference" if "unknown name" in str(err) else "expression"
            issues.add(code, f"node id {node.id!r}: {err}", nodes=(node.id,), path=(*path, "id"),
                       field="id", once=("id", path))  # once per spec node, not per repeat iteration
            continue
        if node_id in seen:
            # a repeat's copies of one spec node collide: report it once per spec node (and not at all
            # when _expand already said that the id must use the repeat var)
            issues.add("duplicate_id", f"node id {node_id!r} is used more than once", nodes=(node_id,),
                       path=(*path, "id"), field="id", once=("duplicate_id", path))
            continue
        seen[node_id] = path
        kind = next(k for k in ("kernel", "memcpy", "memset", "empty") if hasattr(node, k))
        pn = PlanNode(node_id, kind, len(nodes), path, frames)
        try:
            pn.after = tuple(_template(a, env) for a in node.after)
        except expr.ExprError as err:
            code = "unknown_reference" if "unknown name" in str(err) else "expression"
            issues.add(code, f"node {node_id!r}: after: {err}", nodes=(node_id,),
                       path=(*path, "after"), field="after", once=("after", path))
        try:
            if isinstance(node, KernelNode):
                kernel = kernels.get(node.kernel)
                key = (id(node), kernel_keys.get(node.kernel))
                prog = programs.get(key)
                prog = prog[1] if prog is not None else None
                try:
                    if prog is None:
                        raise _Fallback
                    _run_kernel_program(prog, pn, kernel, buffers, env)
                except _Fallback:
                    _bind_kernel_node(node, pn, kernels, buffers, spec, env)  # checks all, names culprits
                    programs[key] = (node, _compile_kernel_node(node, kernel))  # node kept: its id stays its
            elif isinstance(node, MemcpyNode):
                _bind_memcpy(node, pn, buffers, spec, env)
            elif isinstance(node, MemsetNode):
                _bind_memset(node, pn, buffers, spec, env)
            else:
                assert isinstance(node, EmptyNode)
        except NodeError as e:
            if e.code != "skip":
                issues.add(e.code, f"node {node_id!r}: {e}", nodes=(node_id,), buffer=e.buffer,
                           path=(*path, *e.field), field=".".join(map(str, e.field)) or None)
            continue
        nodes.append(pn)
    # `after` may only name nodes that exist
    ids = {n.id for n in nodes} | set(seen)
    for pn in nodes:
        for a in pn.after:
            if a not in ids:
                issues.add("unknown_reference", f"node {pn.id!r}: after: unknown node {a!r}",
                           nodes=(pn.id, a), path=(*pn.path, "after"), field="after")
        pn.after = tuple(a for a in pn.after if a in ids)
    plan = Plan(spec.name, dims, types, spec.deps, kernels, buffers, nodes, spec)
    return plan, issues.items


def plan(spec: GraphSpec, overrides: Mapping[str, Any] | None = None, **dims: Any) -> Plan:
    """Bind and validate a spec: the Plan with its reduced DAG, or SpecError listing every issue."""
    from .dag import analyze

    p, issues = bind(spec, {**(overrides or {}), **dims})
    issues += analyze(p, complete=not issues)
    if issues:
        raise SpecError(issues)
    return p
