"""Plan + backend → Executable: buffers by name, one explicit graph, launch, update, rebind, driver DOT.

Every node is added by hand with exactly the reduced DAG's edges (programmatic where the plan says so);
no stream capture. The executable keeps each node's handle and payload, so one node (``update``) or every
user of a buffer (``rebind``) can be changed in the instantiated graph without re-instantiating it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from . import expr
from .bind import NodeError, bind_dims3, bind_scalar, bind_shared, check_threads, memset_bits, resolve_view
from .buffers import Arena, ArrayRef, BufferMap, array_ref, device_view, pinned_ref
from .errors import BuildError, DagbuildError, DriverError, Issue, SpecError
from .ir import MAX_BLOCK, MAX_GRID, ChildOp, KernelArg, KernelOp, MemcpyOp, MemsetOp, Plan, PlanNode, View
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
    after buffers and kernels (what eager and stream-captured baselines need)."""

    device: int = 0
    check_signatures: bool = True
    upload: bool = True
    concurrent: bool = True
    programmatic: bool = True
    build_graph: bool = True


class Executable:
    """One instantiated graph over named buffers. Use as a context manager, or call :meth:`close`.

    ``bound`` maps buffer names to memory the caller owns (CuPy/PyTorch arrays, or an
    :class:`~dagbuild.buffers.Arena`'s arrays); the rest is allocated here. ``modules`` shares compiled
    kernels between executables. ``derive_from``: instantiate that executable's graph again and set only
    the parameters that differ (a pool's buckets share one topology).
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
        try:
            import cupy

            if plan.analysis is None:
                raise BuildError(f"plan {plan.name!r} has not been analysed: make it with dagbuild.plan()")
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
            self._compile(arch)
            self._allocate(bound or {})
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
        shared_need: dict[str, int] = {}
        for n in self.plan.nodes:
            op = n.op
            if isinstance(op, KernelOp):
                if op.kernel not in self._funcs:
                    self._funcs[op.kernel] = self.modules.function(self.plan.kernels[op.kernel], arch)
                shared_need[op.kernel] = max(shared_need.get(op.kernel, 0), op.shared)
        if arch and self.options.programmatic and self.plan.analysis.programmatic:
            issues = programmatic_issues(self.plan, arch)
            if issues:
                raise SpecError(issues)
        for name, need in shared_need.items():
            if need > DEFAULT_SHARED_LIMIT:
                self.backend.set_max_dynamic_shared(self._funcs[name], need)

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

    def _edges(self) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
        """Plain predecessors per node, and the programmatic edges, as this executable builds them."""
        order = self.plan.topological()
        if not self.options.concurrent:  # one chain in a topological order: the least driver memory
            return {n.id: [order[i - 1].id] if i else [] for i, n in enumerate(order)}, []
        preds = self.plan.preds()
        programmatic = sorted(self.plan.analysis.programmatic) if self.options.programmatic else []
        if programmatic and not getattr(self.backend, "programmatic_edges", False):
            log.info("%s: the %s backend has no programmatic edges; %d edges are plain instead",
                     self.plan.name, self.backend.name, len(programmatic))
            programmatic = []
        for u, v in programmatic:
            preds[v].remove(u)
        return preds, programmatic

    def _build(self) -> None:
        be = self.backend
        self.graph = be.graph_create()
        preds, programmatic = self._edges()
        params = {}
        for n in self.plan.topological():
            deps = [self.handles[p] for p in preds[n.id]]
            params[n.id] = p = self._params(n)
            try:
                self.handles[n.id] = kind_of(n.op).add(be, self.graph, deps, p)
            except DriverError as e:
                raise DriverError(e.call, e.status, node=n.id, kernel=getattr(n.op, "kernel", None)) from None
        for u, v in programmatic:
            try:
                be.add_dependency(self.graph, self.handles[u], self.handles[v], "programmatic")
            except DriverError as e:
                raise DriverError(e.call, e.status, node=v, detail=f"programmatic edge from {u!r}") from None
        try:
            self.exec = be.instantiate(self.graph)
        except DriverError as e:
            raise DriverError(e.call, e.status, detail=f"instantiating graph {self.plan.name!r}") from None
        self._built_params = params  # what the graph holds: executables derived from this one diff against it

    def _derive(self, source: Executable) -> None:
        """Instantiate ``source``'s graph again and set only the parameters that differ."""
        if [n.id for n in source.plan.nodes] != [n.id for n in self.plan.nodes] or \
                source.plan.edges != self.plan.edges or source.options != self.options:
            raise BuildError(f"graph {self.plan.name!r}: a derived executable needs the source's exact "
                             "topology (same node ids and edges) and options")
        if source._built_params is None:
            raise BuildError(f"graph {self.plan.name!r}: can only derive from an executable that built its graph")
        self.graph, self.handles = source.graph, dict(source.handles)
        try:
            self.exec = self.backend.instantiate(self.graph)
        except DriverError as e:
            raise DriverError(e.call, e.status, detail=f"instantiating graph {self.plan.name!r}") from None
        for n in self.plan.nodes:
            params = self._params(n)
            if params != source._built_params[n.id]:
                self._push(n, params)

    # ---- node parameters: the same helpers build and update -----------------------------------------
    def pointer(self, view: View) -> int:
        """The address of a view's first byte in this executable's memory."""
        return self._refs[view.buffer].ptr + view.offset

    def _params(self, n: PlanNode) -> tuple:
        return kind_of(n.op).params(n.op, self.pointer, self._funcs)

    def _push(self, n: PlanNode, params: tuple | None = None) -> None:
        """Write one node's current parameters into the instantiated graph (no re-instantiation)."""
        kind = kind_of(n.op)
        if kind.set is None:
            return
        try:
            kind.set(self.backend, self.exec, self.handles[n.id], self._params(n) if params is None else params)
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
        return replace(op, args=tuple(new_args), grid=g, block=b, shared=sh)

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
        """The driver's own DOT of the graph (``cuGraphDebugDotPrint``)."""
        self._alive()
        return self.backend.debug_dot(self.graph)

    def driver_graph(self) -> tuple[dict[str, str], dict[tuple[str, str], str]]:
        """What the driver holds: node id → node type, and edge (src, dst) → ``plain``/``programmatic``."""
        self._alive()
        be = self.backend
        by_handle = {be.node_id(h): i for i, h in self.handles.items()}
        kinds, edges = {}, {}
        for h in be.graph_nodes(self.graph):
            nid = by_handle[be.node_id(h)]
            kinds[nid] = be.node_type(h)
            for d, kind in be.node_dep_edges(h):
                edges[(by_handle[be.node_id(d)], nid)] = kind
        return kinds, edges

    def _alive(self) -> None:
        if self._closed:
            raise BuildError(f"executable {self.plan.name!r} is closed")

    def close(self) -> None:
        """Free the exec, the graph, modules this executable compiled, and memory it allocated."""
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
            self.buffers.clear()
            self._refs.clear()
            self._built_params = None
            if self._arena is not None:
                self._arena.close()
            if getattr(self, "_own_modules", False):
                self.modules.clear()

    def __enter__(self) -> Executable:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
