"""The bound graph as plain data: what binding produces and every later layer reads.

A :class:`Plan` holds every number a launch, memcpy or memset needs, the byte ranges each node reads
and writes, and (once analysed) the reduced edges. Each node carries one typed payload per kind
(:class:`KernelOp`, :class:`MemcpyOp`, :class:`MemsetOp`, :class:`EmptyOp`, :class:`ChildOp`); a new kind is one more
payload class here plus one registration in :mod:`dagbuild.nodekinds`. Nothing here allocates,
compiles or analyses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from .dtypes import ITEMSIZE
from .util import format_bytes

#: Format limits of a launch (the device's own limits are checked when an executable is built).
MAX_THREADS_PER_BLOCK = 1024
MAX_BLOCK = (1024, 1024, 64)
MAX_GRID = (2**31 - 1, 65535, 65535)

#: How a node waits for its producers: ``plain`` (the producer has finished) or ``programmatic``
#: (a kernel launched early that calls ``griddepcontrol.wait`` before touching produced data).
Launch = Literal["plain", "programmatic"]


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


@dataclass(frozen=True, slots=True)
class View:
    """A contiguous byte range of one buffer: a whole buffer or ``name[i, j]``.

    ``text`` is the view as written (``act[layers % 2]``); ``index`` the bound indices (``(0,)``)."""

    buffer: str
    offset: int
    nbytes: int
    text: str
    index: tuple[int, ...] | None = None

    @property
    def label(self) -> str:
        """The bound view: ``act[0]`` where the spec wrote ``act[layers % 2]``."""
        if self.index is None:
            return self.buffer
        return f"{self.buffer}[{', '.join(map(str, self.index))}]"

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
    source: str  # the CUDA C++ text, local includes inlined
    path: Path | None  # where it was read from, if a file
    options: tuple[str, ...]
    launch: Launch = "plain"  # how its nodes wait for producer kernels, unless a node says otherwise
    line: int | None = None  # YAML line of its declaration
    resident: bool = False  # every block of a launch must be resident at once (its blocks wait for each other)


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


@dataclass(frozen=True, slots=True)
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


# ---- node payloads: one per kind --------------------------------------------------------------------


@dataclass(frozen=True)
class KernelOp:
    kind: ClassVar[str] = "kernel"
    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared: int
    args: tuple[KernelArg, ...]
    launch: Launch = "plain"

    @property
    def threads(self) -> int:
        return math.prod(self.block)

    def accesses(self) -> tuple[tuple[View, bool], ...]:
        return tuple((a.view, not a.param.const) for a in self.args if a.view is not None)

    def label(self) -> str:
        dims = lambda d: "×".join(str(x) for x in d if x != 1) or "1"
        return f"{self.kernel}  {dims(self.grid)} × {dims(self.block)}" + (
            f"\nshared {format_bytes(self.shared)}" if self.shared else "")


@dataclass(frozen=True)
class MemcpyOp:
    kind: ClassVar[str] = "memcpy"
    src: View
    dst: View
    direction: str  # H2D | D2H | D2D | H2H

    @property
    def count(self) -> int:
        return self.src.nbytes

    def accesses(self) -> tuple[tuple[View, bool], ...]:
        return ((self.src, False), (self.dst, True))

    def label(self) -> str:
        return f"{self.direction} {format_bytes(self.count)}\n{self.src.label} → {self.dst.label}"


@dataclass(frozen=True)
class MemsetOp:
    kind: ClassVar[str] = "memset"
    dst: View
    value: int | float  # as written
    value_bits: int  # element bit pattern
    element_size: int  # 1, 2 or 4 bytes (8-byte zeros are two 4-byte zero elements)

    @property
    def count(self) -> int:
        return self.dst.nbytes // self.element_size

    def accesses(self) -> tuple[tuple[View, bool], ...]:
        return ((self.dst, True),)

    def label(self) -> str:
        return f"memset {self.dst.label} = {self.value}\n{format_bytes(self.dst.nbytes)}"


@dataclass(frozen=True)
class EmptyOp:
    kind: ClassVar[str] = "empty"

    def accesses(self) -> tuple[tuple[View, bool], ...]:
        return ()

    def label(self) -> str:
        return ""


@dataclass(frozen=True)
class LibCall:
    """One library call of a child graph's body (a cuBLAS/hipBLAS GEMM, ...): the call's name and its bound
    arguments, named by :mod:`dagbuild.libcalls`' signature of the call (``const T*`` read, ``T*`` written)."""

    call: str
    args: tuple[KernelArg, ...]

    def arg(self, name: str) -> KernelArg | None:
        return next((a for a in self.args if a.param.name == name), None)

    def accesses(self) -> tuple[tuple[View, bool], ...]:
        return tuple((a.view, not a.param.const) for a in self.args if a.view is not None)

    def label(self) -> str:
        scalars = ", ".join(f"{a.param.name}={a.value}" for a in self.args if a.view is None)
        views = ", ".join(f"{a.param.name}={a.view.label}" for a in self.args if a.view is not None)
        return f"{self.call}({views}; {scalars})" if scalars else f"{self.call}({views})"


@dataclass(frozen=True)
class ChildOp:
    """A child-graph node: library work recorded by stream capture, inserted as one node. The DAG sees the
    node's *declared* reads and writes (binding checked that they cover every access of the body)."""

    kind: ClassVar[str] = "child"
    reads: tuple[View, ...]
    writes: tuple[View, ...]
    body: tuple[LibCall, ...]

    def accesses(self) -> tuple[tuple[View, bool], ...]:
        return tuple((v, False) for v in self.reads) + tuple((v, True) for v in self.writes)

    def label(self) -> str:
        return "child graph\n" + "\n".join(c.label() for c in self.body)


@dataclass(frozen=True)
class LoopOp:
    """A device-side loop over a body of nodes (the plan's nodes whose ``scope`` is this node's id).

    ``counter`` is the loop's own iteration counter (a plan buffer bind adds); ``access`` is every byte
    range the body touches (and ``until``, read), so the parent graph orders the loop as one node."""

    kind: ClassVar[str] = "loop"
    max: int
    until: View | None
    counter: View
    body: tuple[str, ...] = ()  # ids of the nodes directly in the body, in list order
    access: tuple[tuple[View, bool], ...] = ()
    unroll: int = 1  # body copies per WHILE iteration (divides max)

    def accesses(self) -> tuple[tuple[View, bool], ...]:
        return self.access

    def label(self) -> str:
        return (f"loop ≤ {self.max}" + (f" ({self.unroll} per iteration)" if self.unroll > 1 else "")
                + (f" until {self.until.label}" if self.until else ""))


#: The internal kernels of a loop (kernels/loop.cu): set the WHILE node's condition before and after each
#: iteration. Their names cannot clash with a spec's kernels (those are identifiers).
LOOP_ENTER, LOOP_NEXT = "dagbuild.loop_enter", "dagbuild.loop_next"

Op = KernelOp | MemcpyOp | MemsetOp | EmptyOp | ChildOp | LoopOp


@dataclass(frozen=True)
class PlanNode:
    """One bound node: its id, where it came from in the spec, its ``after`` ids and its payload."""

    id: str
    order: int
    path: tuple  # spec path of the node it came from, e.g. ('nodes', 4, 'nodes', 0)
    op: Op
    repeats: tuple[RepeatFrame, ...] = ()
    after: tuple[str, ...] = ()
    scope: str | None = None  # id of the innermost loop whose body holds it (None: the top graph)

    @property
    def kind(self) -> str:
        return self.op.kind

    def accesses(self) -> tuple[tuple[View, bool], ...]:
        """(view, writes?) for every byte range the node touches; a ``T*`` param is read and written."""
        return self.op.accesses()

    @property
    def reads(self) -> tuple[View, ...]:
        return tuple(v for v, w in self.op.accesses() if not w)

    @property
    def writes(self) -> tuple[View, ...]:
        return tuple(v for v, w in self.op.accesses() if w)

    def env(self, dims: dict[str, int | float]) -> dict[str, int | float]:
        """The names its expressions see: the plan's dims (and consts) plus its repeat vars."""
        return {**dims, **{f.var: f.value for f in self.repeats}}


@dataclass(frozen=True)
class Analysis:
    """What DAG analysis found: the reduced edges (in a stable order), the programmatic ones among them,
    and a summary for ``info``/``validate``."""

    edges: tuple[tuple[str, str], ...]
    programmatic: frozenset[tuple[str, str]]
    summary: dict[str, Any]


@dataclass
class Plan:
    """Everything bound: the input of DAG analysis and of every backend.

    ``analysis`` is None until :func:`dagbuild.plan.plan` (or a pool) attaches the result of
    :func:`dagbuild.dag.analyze`; a plan is then never changed again."""

    name: str
    dims: dict[str, int]
    types: dict[str, str]
    deps: str
    kernels: dict[str, PlanKernel]
    buffers: dict[str, PlanBuffer]
    nodes: list[PlanNode]
    spec: Any = field(repr=False)  # the GraphSpec it was bound from
    analysis: Analysis | None = None
    consts: dict[str, float] = field(default_factory=dict)  # named floats, bound like dims

    @property
    def env(self) -> dict[str, int | float]:
        """The names every expression of the plan sees (before repeat vars): dims and consts."""
        return {**self.dims, **self.consts}

    @property
    def edges(self) -> list[tuple[str, str]]:
        """The reduced DAG's edges (empty before analysis)."""
        return list(self.analysis.edges) if self.analysis else []

    @property
    def summary(self) -> dict[str, Any]:
        return self.analysis.summary if self.analysis else {}

    def edge_kind(self, src: str, dst: str) -> Launch:
        return "programmatic" if self.analysis and (src, dst) in self.analysis.programmatic else "plain"

    @property
    def loops(self) -> list[PlanNode]:
        """The loop nodes, in list order (an outer loop before the loops in its body)."""
        return [n for n in self.nodes if isinstance(n.op, LoopOp)]

    def scoped(self, scope: str | None) -> list[PlanNode]:
        """The nodes directly in one graph: the top (None) or a loop's body (its id)."""
        return [n for n in self.nodes if n.scope == scope]

    @property
    def node_by_id(self) -> dict[str, PlanNode]:
        return {n.id: n for n in self.nodes}

    def kernels_run(self) -> list[PlanKernel]:
        """The kernels its kernel nodes run, by name (variants leave other declared kernels unused)."""
        return [self.kernels[k] for k in sorted({n.op.kernel for n in self.nodes if isinstance(n.op, KernelOp)})]

    def preds(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {n.id: [] for n in self.nodes}
        for u, v in self.edges:
            out[v].append(u)
        return out

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
