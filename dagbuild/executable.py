"""Plan + backend → Executable: buffers by name, one explicit graph, launch, update, rebind, driver DOT.

Every node is added by hand with exactly the reduced DAG's edges (programmatic where the plan says so);
no stream capture. The executable keeps each node's handle and payload, so one node (``update``) or every
user of a buffer (``rebind``) can be changed in the instantiated graph without re-instantiating it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from . import expr
from .bind import NodeError, bind_dims3, bind_scalar, bind_shared, check_threads, memset_bits, resolve_view
from .buffers import Arena, ArrayRef, BufferMap, array_ref, device_view, pinned_ref
from .errors import BuildError, DagbuildError, DriverError, Issue, SpecError
from .ir import (
    LOOP_ENTER,
    LOOP_NEXT,
    MAX_BLOCK,
    MAX_GRID,
    ChildOp,
    KernelArg,
    KernelOp,
    LoopOp,
    MemcpyOp,
    MemsetOp,
    Plan,
    PlanKernel,
    PlanNode,
    View,
)
from .kernels import ModuleCache, programmatic_issues
from .nodekinds import kind_of

log = logging.getLogger("dagbuild")

DEFAULT_SHARED_LIMIT = 48 * 1024


@dataclass(frozen=True)
class ExecOptions:
    """How an executable is built.

    ``check_signatures``: compile each kernel's PTX once through NVRTC and check the declared params (and
    programmatic waits) against it. ``upload``: upload the graph after instantiating it. ``concurrent``:
    False chains the nodes in one topological order (the driver then keeps far less memory per
    executable, at the price of running independent work one after another). ``programmatic``: False
    makes every edge plain (to measure what programmatic launch buys). ``build_graph``: False stops
    after buffers and kernels (what eager and stream-captured baselines need). ``loops``: ``conditional``
    builds each loop node as a WHILE conditional node, ``unroll`` as its body ``max`` times in a row (what
    backends without conditional nodes get; the body's work after ``until`` is set must then be a no-op,
    as the loop kernels cannot skip it), ``auto`` the first where the backend has it."""

    device: int = 0
    check_signatures: bool = True
    upload: bool = True
    concurrent: bool = True
    programmatic: bool = True
    build_graph: bool = True
    loops: str = "auto"  # auto | conditional | unroll: how loop nodes are built (see Executable)


class Executable:
    """One instantiated graph over named buffers. Use as a context manager, or call :meth:`close`.

    ``bound`` maps buffer names to memory the caller owns (CuPy/PyTorch arrays, or an
    :class:`~dagbuild.buffers.Arena`'s arrays); the rest is allocated here. ``modules`` shares compiled
    kernels between executables. ``derive_from``: instantiate that executable's graph again and set only
    the parameters that differ (a pool's buckets share one topology). ``phases``: the host seconds the build
    spent by phase (``compile``, ``allocate``, ``<kind> nodes`` with their parameters, ``edges``,
    ``instantiate``, ``set``), which ``dagbuild pool`` and ``tools/bench_pool.py`` report.
    """

    def __init__(self, plan: Plan, options: ExecOptions | None = None, *, backend: Any = None,
                 bound: Mapping[str, Any] | None = None, modules: ModuleCache | None = None,
                 stream: Any = None, derive_from: Executable | None = None):
        self.plan = plan
        self.options = options = options or ExecOptions()
        self.graph = None
        self.exec = None
        self.handles: dict[str, Any] = {}
        self.buffers = BufferMap()
        self._refs: dict[str, ArrayRef] = {}
        self._nodes: dict[str, PlanNode] = {n.id: n for n in plan.nodes}
        self._funcs: dict[str, int] = {}
        self._arena: Arena | None = None
        self._closed = False
        self._own_graph = derive_from is None
        self._built_params: dict[str, tuple] | None = None
        self._copies: dict[str, list] = {}  # node id → every handle built for it (unrolled loops: one per copy)
        self._named: dict[str, Any] = {}  # every node of the graphs by name (loop internals, copies `id#i`)
        self._loops: dict[str, Any] = {}  # loop id → its nodekinds.LoopNodes (conditional loops)
        self._bodies: list[Any] = []  # the body graphs of conditional loops
        self.phases: dict[str, float] = {}
        t = time.perf_counter()
        try:
            import cupy

            if plan.analysis is None:
                raise BuildError(f"plan {plan.name!r} has not been analysed: make it with dagbuild.plan()")
            self._own_backend = backend is None  # made here: closed with this executable
            if backend is None:
                from .backends import get_backend

                backend = get_backend("auto", options.device)
            self.backend = backend
            self.modules = modules if modules is not None else ModuleCache()
            self._own_modules = modules is None
            self.limits = backend.limits()
            self.stream = stream if stream is not None else cupy.cuda.Stream(non_blocking=True)
            self._check_limits()
            arch = f"sm_{''.join(map(str, self.limits['compute_capability']))}" if options.check_signatures else None
            self.loop_mode = self._loop_mode()
            self._compile(arch)
            self._check_resident()
            t = self._timed("compile", t)
            self._allocate(bound or {})
            self._timed("allocate", t)
            if not options.build_graph:
                return
            if derive_from is None:
                self._build()
            else:
                self._derive(derive_from)
            if options.upload:
                self.backend.upload(self.exec, self.stream.ptr)
        except BaseException:
            self.close()
            raise

    # ---- build -------------------------------------------------------------------------------------
    def _timed(self, phase: str, t0: float) -> float:
        """Add the host time since ``t0`` to ``phase``; returns now (the next phase's start)."""
        t = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + t - t0
        return t

    def _check_limits(self) -> None:
        lim, issues = self.limits, []
        optin = lim.get("max_shared_per_block_optin", DEFAULT_SHARED_LIMIT)
        for n in self.plan.nodes:
            op = n.op
            if not isinstance(op, KernelOp):
                continue
            bad = None
            if op.threads > lim["max_threads_per_block"]:
                bad = (f"block {list(op.block)} has {op.threads} threads; the device allows "
                       f"{lim['max_threads_per_block']}")
            elif any(b > m for b, m in zip(op.block, lim["max_block_dim"], strict=True)):
                bad = f"block {list(op.block)} exceeds the device's block dims {list(lim['max_block_dim'])}"
            elif any(g > m for g, m in zip(op.grid, lim["max_grid_dim"], strict=True)):
                bad = f"grid {list(op.grid)} exceeds the device's grid dims {list(lim['max_grid_dim'])}"
            elif op.shared > optin:
                bad = (f"shared = {op.shared} bytes of dynamic shared memory; the device allows at most "
                       f"{optin} per block")
            if bad:
                issues.append(Issue("launch_config", f"node {n.id!r} (kernel {op.kernel!r}): {bad}",
                                    nodes=(n.id,), line=self.plan.spec.line_of(n.path)))
        if issues:
            raise SpecError(issues)

    def _compile(self, arch: str | None) -> None:
        self.modules.prepare(self._kernels())
        shared_need: dict[str, int] = {}
        for n in self.plan.nodes:
            op = n.op
            if isinstance(op, KernelOp):
                if op.kernel not in self._funcs:
                    self._funcs[op.kernel] = self.modules.function(self.plan.kernels[op.kernel], arch)
                shared_need[op.kernel] = max(shared_need.get(op.kernel, 0), op.shared)
            elif isinstance(op, LoopOp) and self.loop_mode == "conditional":
                for name in (LOOP_ENTER, LOOP_NEXT):
                    if name not in self._funcs:
                        self._funcs[name] = self.modules.function(self.plan.kernels[name], arch)
        if arch and self.options.programmatic and self.plan.analysis.programmatic:
            issues = programmatic_issues(self.plan, arch)
            if issues:
                raise SpecError(issues)
        for name, need in shared_need.items():
            if need > DEFAULT_SHARED_LIMIT:
                self.backend.set_max_dynamic_shared(self._funcs[name], need)

    def _kernels(self) -> list[PlanKernel]:
        """The kernels this executable loads: its kernel nodes' (and its conditional loops')."""
        loops = [self.plan.kernels[k] for k in (LOOP_ENTER, LOOP_NEXT)] if self.loop_mode == "conditional" else []
        return self.plan.kernels_run() + loops

    def _resident_problem(self, op: KernelOp) -> str | None:
        """Why a launch of ``op`` cannot have every block resident at once, if its kernel needs that
        (``resident: true``: its blocks wait for each other, so a block left waiting for a free SM would hang)."""
        if not self.plan.kernels[op.kernel].resident:
            return None
        sms = self.limits.get("multiprocessor_count")
        per_sm = self.backend.max_active_blocks(self._funcs[op.kernel], op.threads, op.shared)
        blocks = math.prod(op.grid)
        if per_sm is None or not sms or blocks <= per_sm * sms:
            return None
        return (f"its {blocks} blocks wait for each other (kernel {op.kernel!r} is resident: true), but the device "
                f"holds {per_sm} of them a SM x {sms} SMs = {per_sm * sms} at once: make the grid smaller")

    def _check_resident(self) -> None:
        issues, seen = [], {}  # one occupancy query per launch shape (a layer kernel repeats one per layer)
        for n in self.plan.nodes:
            if not isinstance(n.op, KernelOp):
                continue
            shape = (n.op.kernel, n.op.grid, n.op.block, n.op.shared)
            if shape not in seen:
                seen[shape] = self._resident_problem(n.op)
            if bad := seen[shape]:
                issues.append(Issue("launch_config", f"node {n.id!r}: {bad}", nodes=(n.id,),
                                    line=self.plan.spec.line_of(n.path)))
        if issues:
            raise SpecError(issues)

    def _allocate(self, bound: Mapping[str, Any]) -> None:
        for name in bound:
            if name not in self.plan.buffers:
                raise BuildError(f"cannot bind {name!r}: the spec has no buffer of that name "
                                 f"(buffers: {', '.join(self.plan.buffers)})", buffer=name)
        own = {name: b for name, b in self.plan.buffers.items() if name not in bound}
        if own:
            self._arena = Arena(own)
            for name in own:
                self._refs[name] = self._arena.ref(name)
                self.buffers[name] = self._arena.arrays[name]
        for name, arr in bound.items():
            b = self.plan.buffers[name]
            if b.memory == "pinned":
                self._refs[name], self.buffers[name] = pinned_ref(name, arr, b)
            else:
                ref = self._refs[name] = array_ref(name, arr, b.dtype, b.nbytes, exact=False)
                self.buffers.set_lazy(name, lambda ref=ref, b=b: device_view(ref, b.dtype, b.shape))

    def _loop_mode(self) -> str | None:
        """How loop nodes are built (None: the plan has none)."""
        if not any(isinstance(n.op, LoopOp) for n in self.plan.nodes):
            return None
        mode, has = self.options.loops, getattr(self.backend, "conditional_nodes", False)
        if mode not in ("auto", "conditional", "unroll"):
            raise BuildError(f"ExecOptions(loops={mode!r}): expected auto, conditional or unroll")
        if mode == "conditional" and not has:
            raise BuildError(f"the {self.backend.name} backend has no conditional nodes; use loops='unroll'")
        if mode == "auto" and not has:
            log.info("%s: the %s backend has no conditional nodes; each loop body is unrolled max times "
                     "(its work after the stop must be a no-op)", self.plan.name, self.backend.name)
        return "conditional" if mode != "unroll" and has else "unroll"

    def _edges(self, body_programmatic: bool = True) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
        """Plain predecessors per node, and the programmatic edges, as this executable builds them (each
        loop body is a graph of its own: its edges join its own nodes)."""
        if not self.options.concurrent:  # one chain per graph in a topological order: the least driver memory
            preds: dict[str, list[str]] = {}
            last: dict[str | None, str] = {}
            for n in self.plan.topological():
                preds[n.id] = [last[n.scope]] if n.scope in last else []
                last[n.scope] = n.id
            return preds, []
        preds = self.plan.preds()
        programmatic = sorted(self.plan.analysis.programmatic) if self.options.programmatic else []
        if programmatic and not getattr(self.backend, "programmatic_edges", False):
            log.info("%s: the %s backend has no programmatic edges; %d edges are plain instead",
                     self.plan.name, self.backend.name, len(programmatic))
            programmatic = []
        if not body_programmatic:
            scope = {n.id: n.scope for n in self.plan.nodes}
            programmatic = [(u, v) for u, v in programmatic if scope[v] is None]
        for u, v in programmatic:
            preds[v].remove(u)
        return preds, programmatic

    def _build(self) -> None:
        try:
            self._build_graph(body_programmatic=True)
        except DriverError:
            in_bodies = [(u, v) for u, v in self._edges()[1] if self._nodes[v].scope is not None]
            if self.loop_mode != "conditional" or not in_bodies:
                raise
            # the driver may refuse programmatic edges inside a conditional body: build them plain there
            log.info("%s: the driver refused programmatic edges inside loop bodies; %d are plain instead",
                     self.plan.name, len(in_bodies))
            self._reset_graph()
            self._build_graph(body_programmatic=False)

    def _reset_graph(self) -> None:
        if self.exec is not None:
            self.backend.exec_destroy(self.exec)
        if self.graph is not None:
            self.backend.graph_destroy(self.graph)
        self.exec = self.graph = None
        for d in (self.handles, self._copies, self._named, self._loops):
            d.clear()
        self._bodies.clear()

    def _build_graph(self, body_programmatic: bool) -> None:
        be = self.backend
        self.graph = be.graph_create()
        preds, programmatic = self._edges(body_programmatic)
        order: dict[str | None, list[PlanNode]] = {}
        topo = self.plan.topological()
        for n in topo:
            order.setdefault(n.scope, []).append(n)
        succs = {u for u, _ in self.plan.edges}
        self._scope = (order, preds, programmatic, succs, {})
        self._add_scope(self.graph, None, [], "")
        t = time.perf_counter()
        try:
            self.exec = be.instantiate(self.graph)
        except DriverError as e:
            raise DriverError(e.call, e.status, detail=f"instantiating graph {self.plan.name!r}") from None
        self._timed("instantiate", t)
        self._built_params = self._scope[4]  # what the graph holds: executables derived from this one diff against it
        del self._scope

    def _add_scope(self, graph: Any, scope: str | None, first: list, suffix: str) -> tuple[dict[str, Any], list]:
        """Add the nodes directly in one graph (the top, or a loop body: ``scope``) to ``graph``; its nodes
        with no predecessor wait for ``first``. ``suffix`` names the copy of an unrolled body (``#i``).
        Returns each node's handle and the handles of the nodes nothing in the scope waits for."""
        be = self.backend
        order, preds, programmatic, succs, params = self._scope
        added: dict[str, Any] = {}
        with_preds = {v for _, v in programmatic} | {n for n, ps in preds.items() if ps}
        for n in order.get(scope, []):
            t = time.perf_counter()
            deps = [added[p] for p in preds[n.id]] + ([] if n.id in with_preds else first)
            params[n.id] = p = self._params(n)
            try:
                if isinstance(n.op, LoopOp):
                    h = self._add_loop(graph, n, deps, p, suffix)  # its body's nodes are timed as theirs
                else:
                    h = kind_of(n.op).add(be, graph, deps, p)
                    self._timed(f"{n.op.kind} nodes", t)
            except DriverError as e:
                raise DriverError(e.call, e.status, node=n.id + suffix, kernel=getattr(n.op, "kernel", None)) from None
            added[n.id] = h
            self._copies.setdefault(n.id, []).append(self._loops.get(n.id + suffix, h))
            self.handles.setdefault(n.id, h)
            if not (isinstance(n.op, LoopOp) and self.loop_mode != "conditional"):
                self._named[n.id + suffix] = h  # an unrolled loop is no driver node: its joins are named lp#i
        t = time.perf_counter()
        for u, v in programmatic:
            if u in added and v in added:
                try:
                    be.add_dependency(graph, added[u], added[v], "programmatic")
                except DriverError as e:
                    raise DriverError(e.call, e.status, node=v + suffix,
                                      detail=f"programmatic edge from {u!r}") from None
        self._timed("edges", t)
        return added, [h for i, h in added.items() if i not in succs]

    def _add_loop(self, graph: Any, n: PlanNode, deps: list, p: tuple, suffix: str) -> Any:
        """A loop node: a WHILE conditional node (and its two loop kernels), or its body ``max`` times in a
        row, each copy after the one before (an empty node joins each copy's ends). Returns the handle that
        what follows the loop waits for."""
        op: LoopOp = n.op  # type: ignore[assignment]
        be = self.backend
        if self.loop_mode == "conditional":
            kind = kind_of(op)
            ln = kind.add(be, graph, deps, p)
            self._loops[n.id + suffix] = ln
            self._bodies.append(ln.body)
            self._named[f"{n.id}{suffix}.enter"] = ln.enter
            copies = [suffix] if op.unroll == 1 else [f"{suffix}~{i}" for i in range(op.unroll)]
            added, _ = self._add_copies(ln.body, n, [], copies, join_last=False)
            until = op.until
            writers = [h for i, h in added.items()
                       if until is not None and any(w and v.overlaps(until) for v, w in self._nodes[i].accesses())]
            kind.finish(be, ln, writers, p)
            self._named[f"{n.id}{suffix}.next"] = ln.next
            return ln.node
        _, first = self._add_copies(graph, n, deps, [f"{suffix}#{i}" for i in range(op.max)], join_last=True)
        return first[0]

    def _add_copies(self, graph: Any, n: PlanNode, first: list, copies: list[str],
                    join_last: bool) -> tuple[dict[str, Any], list]:
        """A loop's body once per name in ``copies``, in a row: an empty node ``<loop><copy>`` joins each copy's
        ends and the next copy waits for it (the last copy too when ``join_last``). Returns the last copy's
        handles and what a successor waits for."""
        added: dict[str, Any] = {}
        for i, copy in enumerate(copies):
            added, ends = self._add_scope(graph, n.id, first, copy)
            if join_last or i + 1 < len(copies):
                first = [self.backend.add_empty(graph, ends)]
                self._named[f"{n.id}{copy}"] = first[0]
        return added, first

    def _derive(self, source: Executable) -> None:
        """Instantiate ``source``'s graph again and set only the parameters that differ."""
        if [n.id for n in source.plan.nodes] != [n.id for n in self.plan.nodes] or \
                source.plan.edges != self.plan.edges or source.options != self.options:
            raise BuildError(f"graph {self.plan.name!r}: a derived executable needs the source's exact "
                             "topology (same node ids and edges) and options")
        if source._built_params is None:
            raise BuildError(f"graph {self.plan.name!r}: can only derive from an executable that built its graph")
        self.graph, self.handles = source.graph, dict(source.handles)
        self._copies, self._named = {k: list(v) for k, v in source._copies.items()}, dict(source._named)
        self._loops, self._bodies = dict(source._loops), list(source._bodies)
        t = time.perf_counter()
        try:
            self.exec = self.backend.instantiate(self.graph)
        except DriverError as e:
            raise DriverError(e.call, e.status, detail=f"instantiating graph {self.plan.name!r}") from None
        t = self._timed("instantiate", t)
        for n in self.plan.nodes:
            params = self._params(n)
            if params != source._built_params[n.id]:
                self._push(n, params)
        self._timed("set", t)

    # ---- node parameters: the same helpers build and update -----------------------------------------
    def pointer(self, view: View) -> int:
        """The address of a view's first byte in this executable's memory."""
        return self._refs[view.buffer].ptr + view.offset

    def _params(self, n: PlanNode) -> tuple:
        return kind_of(n.op).params(n.op, self.pointer, self._funcs)

    def _push(self, n: PlanNode, params: tuple | None = None) -> None:
        """Write one node's current parameters into the instantiated graph (no re-instantiation)."""
        kind = kind_of(n.op)
        if kind.set is None or (isinstance(n.op, LoopOp) and self.loop_mode != "conditional"):
            return  # an unrolled loop is only its body's nodes
        p = self._params(n) if params is None else params
        try:
            for h in self._copies.get(n.id, [self.handles[n.id]]):
                kind.set(self.backend, self.exec, h, p)
        except DriverError as e:
            raise DriverError(e.call, e.status, node=n.id, kernel=getattr(n.op, "kernel", None)) from None

    # ---- public API ---------------------------------------------------------------------------------
    def node(self, node_id: str) -> PlanNode:
        """A node as this executable runs it now (after any :meth:`update`)."""
        n = self._nodes.get(node_id)
        if n is None:
            raise BuildError(f"no node {node_id!r} in graph {self.plan.name!r}", node=node_id)
        return n

    def node_params(self, node_id: str) -> tuple:
        """The backend parameters of one node as they are now (addresses resolved)."""
        return self._params(self.node(node_id))

    def eager_steps(self) -> list[Any]:
        """One callable ``step(stream)`` per node in a topological order, each an eager CuPy launch (or
        copy, or fill) of what the node does now: the baselines of ``dagbuild bench``."""
        if any(isinstance(n.op, LoopOp) for n in self.plan.nodes):
            raise BuildError(f"graph {self.plan.name!r} has loop nodes: eager and stream-captured baselines "
                             "cannot loop on the device")
        steps = []
        for n in self.plan.topological():
            n = self._nodes[n.id]
            kind = kind_of(n.op)
            if kind.eager is None:
                continue
            fn = None
            if isinstance(n.op, KernelOp):
                k = self.plan.kernels[n.op.kernel]
                fn = self.modules.module(k).get_function(k.entry)
            elif isinstance(n.op, ChildOp):
                fn = self.backend  # a child's eager step issues its library calls through the backend
            steps.append(kind.eager(n.op, self._params(n), fn))
        return steps

    def launch(self, stream: Any = None, sync: bool = False) -> None:
        """One graph launch: the whole DAG. ``sync`` waits for it."""
        self._alive()
        s = self.stream if stream is None else stream
        self.backend.launch(self.exec, s.ptr)
        if sync:
            s.synchronize()

    def synchronize(self) -> None:
        self.stream.synchronize()

    def update(self, node_id: str, *, args: Mapping[str, Any] | None = None, grid: list | None = None,
               block: list | None = None, shared: Any = None, value: int | float | None = None,
               src: str | None = None, dst: str | None = None) -> None:
        """Change one node's parameters in place. Kernel ``args`` take numbers/expressions for scalars
        and views of the *same* buffer (same byte size) for pointers, so the DAG stays valid. The same
        rules as binding apply (integer ranges, finite floats, launch limits)."""
        self._alive()
        n = self.node(node_id)
        env = n.env(self.plan.env)
        op = n.op
        try:
            if isinstance(op, KernelOp):
                op = self._updated_kernel(n, op, env, args or {}, grid, block, shared)
            elif isinstance(op, MemsetOp):
                if value is not None:
                    try:
                        bits, esize, _ = memset_bits(self.plan.buffers[op.dst.buffer].dtype, value)
                    except (TypeError, ValueError) as e:
                        raise BuildError(f"node {node_id!r}: memset value: {e}", node=node_id) from None
                    op = replace(op, value=value, value_bits=bits, element_size=esize)
                if dst is not None:
                    op = replace(op, dst=self._same_range_view(n, op.dst, dst, env))
            elif isinstance(op, MemcpyOp):
                op = replace(op, src=self._same_range_view(n, op.src, src, env) if src else op.src,
                             dst=self._same_range_view(n, op.dst, dst, env) if dst else op.dst)
        except NodeError as e:
            raise BuildError(f"node {node_id!r}: {e}", node=node_id, code=e.code) from None
        except expr.ExprError as e:
            raise BuildError(f"node {node_id!r}: {e}", node=node_id, code=e.code) from None
        updated = replace(n, op=op)
        self._check_ordered(n, updated)
        self._push(updated)
        self._nodes[node_id] = updated

    def _check_ordered(self, old: PlanNode, n: PlanNode) -> None:
        """A moved view must not race: every node touching its new bytes (one side writing) must be
        ordered with ``n`` by the graph's edges, as validation guaranteed for the old views."""
        moved = [(v, w) for v, w in n.accesses() if (v, w) not in old.accesses()]
        if not moved:
            return
        import networkx as nx

        if not hasattr(self, "_reach"):
            g = nx.DiGraph(self.plan.edges)
            g.add_nodes_from(m.id for m in self.plan.nodes)
            for loop in self.plan.loops:  # a body node runs after what precedes its loop and before the loop ends
                start = ("start", loop.id)
                g.add_edges_from((u, start) for u in list(g.predecessors(loop.id)))
                for m in loop.op.body:
                    g.add_edge(start, m)
                    g.add_edge(m, loop.id)
            self._reach = g
        ordered = nx.ancestors(self._reach, n.id) | nx.descendants(self._reach, n.id) | {n.id}
        for m in self._nodes.values():
            if m.id in ordered:
                continue
            for v, w in moved:
                for mv, mw in m.accesses():
                    if (w or mw) and v.overlaps(mv):
                        raise BuildError(f"node {n.id!r}: {v.label!r} would overlap {mv.label!r} of node {m.id!r} "
                                         f"with no path between the two nodes (a race); rebuild the graph",
                                         node=n.id, buffer=v.buffer, code="race")

    def _same_range_view(self, n: PlanNode, old: View, text: str, env: dict) -> View:
        view = resolve_view(text, self.plan.buffers, env)
        if view.buffer != old.buffer or view.nbytes != old.nbytes:
            raise BuildError(f"node {n.id!r}: {text!r} is not a same-sized view of buffer {old.buffer!r} "
                             f"({old.nbytes} bytes); other buffers change the DAG's data flow — "
                             "use rebind() or rebuild", node=n.id, buffer=view.buffer)
        return view

    def _updated_kernel(self, n: PlanNode, op: KernelOp, env, args, grid, block, shared) -> KernelOp:
        params = {a.param.name: a for a in op.args}
        unknown = set(args) - set(params)
        if unknown:
            raise BuildError(f"node {n.id!r}: kernel {op.kernel!r} has no param {sorted(unknown)[0]!r} "
                             f"(params: {', '.join(params)})", node=n.id)
        new_args = []
        for a in op.args:
            if a.param.name not in args:
                new_args.append(a)
                continue
            v = args[a.param.name]
            if a.param.pointer:
                if not isinstance(v, str):
                    raise BuildError(f"node {n.id!r}: pointer param `{a.param}` takes a view of buffer "
                                     f"{a.view.buffer!r}; to swap memory use rebind()", node=n.id)
                new_args.append(KernelArg(a.param, view=self._same_range_view(n, a.view, v, env)))
            else:
                new_args.append(KernelArg(a.param, value=bind_scalar(a.param, v, env)))
        g = bind_dims3(grid, "grid", env, MAX_GRID) if grid is not None else op.grid
        b = bind_dims3(block, "block", env, MAX_BLOCK) if block is not None else op.block
        check_threads(b)
        sh = bind_shared(shared, env) if shared is not None else op.shared
        if math.prod(b) > self.limits["max_threads_per_block"] or sh > self.limits.get(
                "max_shared_per_block_optin", DEFAULT_SHARED_LIMIT):
            raise BuildError(f"node {n.id!r}: block {list(b)} / shared {sh} exceeds the device's limits",
                             node=n.id, code="launch_config")
        if sh > DEFAULT_SHARED_LIMIT:
            self.backend.set_max_dynamic_shared(self._funcs[op.kernel], sh)
        new = replace(op, args=tuple(new_args), grid=g, block=b, shared=sh)
        if bad := self._resident_problem(new):
            raise BuildError(f"node {n.id!r}: {bad}", node=n.id, code="launch_config")
        return new

    def rebind(self, buffer: str, array: Any) -> None:
        """Point every node that uses ``buffer`` at ``array`` (same dtype, same byte size)."""
        self._alive()
        b = self.plan.buffers.get(buffer)
        if b is None:
            raise BuildError(f"cannot rebind {buffer!r}: no such buffer (buffers: {', '.join(self.plan.buffers)})",
                             buffer=buffer)
        if b.memory != "device":
            raise BuildError(f"cannot rebind pinned buffer {buffer!r}: write into exe.buffers[{buffer!r}] "
                             "instead", buffer=buffer)
        ref = array_ref(buffer, array, b.dtype, b.nbytes, exact=True)
        users = [n for n in self._nodes.values() if any(v.buffer == buffer for v, _ in n.accesses())]
        old = self._refs[buffer]
        self._refs[buffer] = ref
        try:
            for n in users:
                self._push(n)
        except DagbuildError:
            self._refs[buffer] = old
            for n in users:
                self._push(n)
            raise
        self.buffers[buffer] = device_view(ref, b.dtype, b.shape)

    def driver_dot(self) -> str:
        """The driver's own DOT of the graph (``cuGraphDebugDotPrint``); a loop's body graph that the
        driver's text leaves out is added as a cluster of its own."""
        self._alive()
        text = self.backend.debug_dot(self.graph)
        for i, body in enumerate(self._bodies):
            nodes = self.backend.graph_nodes(body)
            if not nodes or f"{self.backend.node_id(nodes[0]):x}" in text.lower():
                continue
            inner = self.backend.debug_dot(body)
            inner = inner[inner.index("{") + 1:inner.rindex("}")]
            end = text.rindex("}")
            text = f"{text[:end]}subgraph cluster_loop_body_{i} {{\nlabel=\"loop body {i}\";\n{inner}}}\n{text[end:]}"
        return text

    def driver_graph(self) -> tuple[dict[str, str], dict[tuple[str, str], str]]:
        """What the driver holds: node name → node type, and edge (src, dst) → ``plain``/``programmatic``,
        over the top graph and every loop body. Names are node ids; a loop adds ``<id>.enter`` and (in its
        body) ``<id>.next``; an unrolled loop's copies are ``<id>#<i>`` and its joins ``<loop>#<i>``; the copies
        of a body that a conditional loop runs ``unroll`` times per iteration are ``<id>~<i>``, their joins
        ``<loop>~<i>``."""
        self._alive()
        be = self.backend
        by_handle = {be.node_id(h): i for i, h in self._named.items()}
        kinds, edges = {}, {}
        for graph in [self.graph, *self._bodies]:
            for h in be.graph_nodes(graph):
                nid = by_handle[be.node_id(h)]
                kinds[nid] = be.node_type(h)
                for d, kind in be.node_dep_edges(h):
                    edges[(by_handle[be.node_id(d)], nid)] = kind
        return kinds, edges

    def _alive(self) -> None:
        if self._closed:
            raise BuildError(f"executable {self.plan.name!r} is closed")

    def close(self) -> None:
        """Free the exec, the graph, modules this executable compiled, memory it allocated, and the backend's
        library handles when it made the backend."""
        if self._closed:
            return
        self._closed = True
        be = getattr(self, "backend", None)
        try:
            if getattr(self, "stream", None) is not None and self.exec is not None:
                self.stream.synchronize()
        finally:
            if be is not None and self.exec is not None:
                be.exec_destroy(self.exec)
            if be is not None and self.graph is not None and self._own_graph:
                be.graph_destroy(self.graph)
            self.exec = self.graph = None
            self.handles.clear()
            for d in (self._copies, self._named, self._loops):
                d.clear()
            self._bodies.clear()
            self.buffers.clear()
            self._refs.clear()
            self._built_params = None
            if self._arena is not None:
                self._arena.close()
            if getattr(self, "_own_modules", False):
                self.modules.clear()
            if be is not None and getattr(self, "_own_backend", False):
                be.close()  # its BLAS handle and capture stream (a backend given to us is the giver's)

    def __enter__(self) -> Executable:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
