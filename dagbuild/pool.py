"""A pool of executables, one per bucket of some dims (e.g. batch), over one shared memory arena.

Padding rule: ``pool.get(batch=n)`` returns the executable of the smallest bucket ≥ n. Rows n..bucket-1
are computed like any other row and their results ignored. Buffers whose shape depends on a bucketed
dim (activations, staging) are allocated once at the largest bucket and each bucket views a prefix, so a
buffer's *leading* bucketed axis keeps every row at the same address in every bucket. State that must
survive bucket switches (weights, KV caches) must not depend on a bucketed dim: size it with a fixed dim
(the Llama spec's ``cache_batch``). Kernels must make padded rows harmless (the Llama kernels skip rows
whose position is negative), so padding never corrupts a real sequence's state.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from . import expr
from .bind import TEMPLATE, bind, parse_view
from .buffers import Arena
from .dag import data_flow
from .errors import BuildError, Issue, SpecError
from .executable import ExecOptions, Executable
from .ir import ChildOp, Plan
from .kernels import ModuleCache
from .plan import plan as make_plan
from .spec import ChildNode, GraphSpec, KernelNode, LoopNode, MemcpyNode, MemsetNode, RepeatBlock
from .util import paused_gc


class GraphPool:
    """Executables per bucket, built eagerly (all at once) or lazily (on first use).

    ``method`` picks how buckets after the first are built: ``"fresh"`` adds every node anew;
    ``"derive"`` instantiates the largest bucket's graph again and sets the parameters that differ;
    ``"auto"`` (default) derives serialized graphs and builds concurrent ones fresh (what measured
    faster: NOTES.md). ``concurrent=False`` chains each graph's nodes in one order: independent branches
    then run one after another, and the driver keeps far less memory per executable. ``options`` are
    every executable's build options (``concurrent`` overrides its field).
    """

    def __init__(self, spec: GraphSpec, buckets: Mapping[str, list[int]], *, eager: bool = True,
                 overrides: Mapping[str, Any] | None = None, method: str = "auto", device: int = 0,
                 backend: Any = None, concurrent: bool = True, options: ExecOptions | None = None,
                 bound: Mapping[str, Any] | None = None):
        if not buckets:
            raise BuildError("GraphPool needs at least one bucketed dim, e.g. buckets={'batch': [1, 2, 4]}")
        for dim, values in buckets.items():
            if dim not in spec.dims:
                raise SpecError([Issue("unknown_reference", f"bucketed dim {dim!r} is not a dim of spec "
                                       f"{spec.name!r} (dims: {', '.join(spec.dims)})", field="buckets")])
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise BuildError(f"buckets for {dim!r} must be integers ≥ 1, got {list(values)}")
        if method not in ("auto", "derive", "fresh"):
            raise BuildError(f"method must be 'auto', 'derive' or 'fresh', not {method!r}")
        if method == "auto":  # child graphs are re-recorded per bucket: a library may pick other kernels
            method = "fresh" if concurrent or _has_child(spec.nodes) else "derive"
        self.spec, self.method, self.concurrent = spec, method, concurrent
        self.options = replace(options or ExecOptions(device=device), concurrent=concurrent, upload=False)
        self.buckets = {d: sorted({int(v) for v in vs}) for d, vs in buckets.items()}
        self.overrides = dict(overrides or {})
        self.executables: dict[tuple[int, ...], Executable] = {}
        self.build_ms: dict[tuple[int, ...], float] = {}
        self.phases: dict[str, float] = {}  # host seconds of the buckets' builds: bind, then Executable.phases
        self._plans: dict[tuple[int, ...], Plan] = {}
        self._bindings: dict = {}  # compiled kernel-node bindings shared by every bucket's bind
        self._flow_fixed = _flow_fixed(spec, set(buckets))
        self._closed = False
        self.arena: Arena | None = None
        self._first: Executable | None = None  # the largest bucket's executable: others derive from it
        # built graphs by kernel choice (variants pick kernels by dims): a bucket derives from one that runs
        # the same kernel in every node, so set-params never swaps a node's function
        self._sources: dict[tuple, Executable] = {}
        try:
            import cupy

            self._own_backend = backend is None  # made here: closed with the pool
            if backend is None:
                from .backends import get_backend

                backend = get_backend("auto", self.options.device)
            self.backend = backend
            if hasattr(backend, "keep_child_bodies"):  # buckets with equal child calls share one recording
                backend.keep_child_bodies()
            self.modules = ModuleCache()
            self.stream = cupy.cuda.Stream(non_blocking=True)
            self.largest = tuple(vs[-1] for vs in self.buckets.values())
            self.largest_plan = self.plan_for(self.largest)
            # `bound`: buffers that live elsewhere (another pool's weights and KV cache); the rest is ours
            self.bound = dict(bound or {})
            self.arena = Arena({n: b for n, b in self.largest_plan.buffers.items() if n not in self.bound})
            if eager:
                keys = list(itertools.product(*self.buckets.values()))
                with paused_gc():
                    # every bucket's modules compiled side by side first (a fresh machine compiles each it loads)
                    plans = [self.plan_for(key) for key in keys]
                    self.modules.prepare(k for p in plans for k in p.kernels_run())
                    for key in keys:
                        self._build(key)
        except BaseException:
            self.close()
            raise

    # ---- planning ----------------------------------------------------------------------------------
    def plan_for(self, key: tuple[int, ...]) -> Plan:
        """The plan of one bucket. Reuses the largest bucket's analysis when the data flow (every inferred
        and ``after`` edge) is the same, else analyses this bucket in full."""
        if key in self._plans:
            return self._plans[key]
        t0 = time.perf_counter()
        dims = {**self.overrides, **dict(zip(self.buckets, key, strict=True))}
        largest = getattr(self, "largest_plan", None)
        if largest is None:
            p = make_plan(self.spec, dims)
            self._largest_flow = data_flow(p)
        else:
            p, issues = bind(self.spec, dims, self._bindings)
            if issues:
                raise SpecError(issues)
            same_ids = [n.id for n in p.nodes] == [n.id for n in largest.nodes]
            if same_ids and (self._flow_fixed or data_flow(p) == self._largest_flow):
                a = largest.analysis
                p = replace(p, analysis=replace(a, summary={**a.summary, "dims": dict(p.dims)}))
            else:
                p = make_plan(self.spec, dims)
        self._plans[key] = p
        self.phases["bind"] = self.phases.get("bind", 0.0) + time.perf_counter() - t0
        return p

    def activations(self) -> list[str]:
        """Buffers whose size follows a bucketed dim (viewed as prefixes by smaller buckets)."""
        bucketed = set(self.buckets)
        return [n for n, b in self.largest_plan.buffers.items() if b.dims_used & bucketed]

    @property
    def arena_bytes(self) -> int:
        """Device bytes the pool allocated itself (bound buffers are someone else's)."""
        bufs = self.largest_plan.buffers
        return sum(b.nbytes for n, b in bufs.items() if b.memory == "device" and n not in self.bound)

    # ---- building ----------------------------------------------------------------------------------
    def _build(self, key: tuple[int, ...]) -> Executable:
        if key in self.executables:
            return self.executables[key]
        if self._first is None and key != self.largest:
            self._build(self.largest)
        t0 = time.perf_counter()
        p = self.plan_for(key)
        kernels = _kernel_choice(p)
        source = self._sources.get(kernels)
        # a library's child graph is re-recorded per bucket and may hold other kernels (cuBLAS picks them by
        # shape), which an executable's child-graph update refuses: such buckets are built fresh
        if not (source is not None and self.method == "derive" and p.edges == source.plan.edges and
                [n.id for n in p.nodes] == [n.id for n in source.plan.nodes] and
                not any(isinstance(n.op, ChildOp) for n in p.nodes)):
            source = None
        exe = Executable(p, self.options, backend=self.backend, bound={**self.arena, **self.bound},
                         modules=self.modules, stream=self.stream, derive_from=source)
        if self._first is None:
            self._first = exe
        if source is None:
            self._sources.setdefault(kernels, exe)
        self.executables[key] = exe
        self.build_ms[key] = (time.perf_counter() - t0) * 1e3
        for phase, s in exe.phases.items():
            self.phases[phase] = self.phases.get(phase, 0.0) + s
        return exe

    def bucket_for(self, **dims: int) -> tuple[int, ...]:
        """The smallest bucket ≥ each requested dim (dims not given take their largest bucket)."""
        unknown = set(dims) - set(self.buckets)
        if unknown:
            raise BuildError(f"{sorted(unknown)[0]!r} is not bucketed in this pool (bucketed: "
                             f"{', '.join(self.buckets)})")
        key = []
        for d, values in self.buckets.items():
            want = dims.get(d, values[-1])
            if want < 1:
                raise BuildError(f"{d}={want} must be ≥ 1")
            fit = [v for v in values if v >= want]
            if not fit:
                raise BuildError(f"{d}={want} is above the largest bucket ({values[-1]}); build the pool with "
                                 f"a larger bucket")
            key.append(fit[0])
        return tuple(key)

    def get(self, **dims: int) -> Executable:
        """The executable for these dims (built now if the pool is lazy and it is the first use)."""
        if self._closed:
            raise BuildError("the pool is closed")
        key = self.bucket_for(**dims)
        exe = self.executables.get(key)
        if exe is None:
            with paused_gc():
                exe = self._build(key)
        return exe

    def upload(self) -> None:
        for exe in self.executables.values():
            exe.backend.upload(exe.exec, self.stream.ptr)
        self.stream.synchronize()

    def close(self) -> None:
        """Free every executable (derived ones first, then the one that owns the graph), the arena, and the
        backend's library handles when the pool made the backend."""
        if self._closed:
            return
        self._closed = True
        owners = {id(e) for e in getattr(self, "_sources", {}).values()}
        first = getattr(self, "_first", None)
        if first is not None:
            owners.add(id(first))
        for exe in list(self.executables.values()):
            if id(exe) not in owners:  # derived ones first: they instantiate their source's graph
                exe.close()
        for exe in list(self.executables.values()):
            if id(exe) in owners:
                exe.close()
        self.executables.clear()
        be = getattr(self, "backend", None)
        if be is not None and getattr(self, "_own_backend", False):
            be.close()  # the kept child bodies, the BLAS handle and the capture stream
        elif hasattr(be, "drop_child_bodies"):
            be.drop_child_bodies()  # a backend given to us: only what this pool asked it to keep
        if self.arena is not None:
            self.arena.close()
        if hasattr(self, "modules"):
            self.modules.clear()

    def __enter__(self) -> GraphPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _kernel_choice(p: Plan) -> tuple:
    """Which kernel each kernel node runs (variants choose by dims): equal tuples can share a graph."""
    return tuple(getattr(n.op, "kernel", None) for n in p.nodes)


def _has_child(nodes) -> bool:
    return any(_has_child(n.nodes) if isinstance(n, RepeatBlock) else isinstance(n, ChildNode) for n in nodes)


def _flow_fixed(spec: GraphSpec, bucketed: set[str]) -> bool:
    """True when no view index and no ``after`` template mentions a bucketed dim. Then buckets with the
    same node ids have the same edges: views address leading-axis blocks of row-major buffers, and two
    such views overlap exactly when one index tuple is a prefix of the other, whatever the shapes."""
    def index_names(text: object) -> set[str]:
        view = parse_view(text) if isinstance(text, str) else None
        if view is None or view[1] is None:
            return set()
        try:
            return set().union(*(expr.names(part) for part in view[1]))
        except expr.ExprError:
            return set(bucketed)  # let the full analysis decide

    def walk(nodes) -> bool:
        for n in nodes:
            if isinstance(n, RepeatBlock):
                if not walk(n.nodes):
                    return False
                continue
            texts: list = []
            if isinstance(n, KernelNode):
                texts = list(n.args.values()) + [a for v in n.variants for a in v.args.values()]
            elif isinstance(n, MemcpyNode):
                texts = [n.memcpy.src, n.memcpy.dst]
            elif isinstance(n, MemsetNode):
                texts = [n.memset.dst]
            elif isinstance(n, LoopNode):
                if not walk(n.nodes):
                    return False
                texts = [n.loop.until]
            names = set().union(*(index_names(t) for t in texts)) if texts else set()
            for a in n.after:
                for m in TEMPLATE.findall(a):
                    names |= expr.names(m)
            if names & bucketed:
                return False
        return True

    return walk(spec.nodes)


