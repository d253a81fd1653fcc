"""Plan + backend → Executable: buffers by name, one explicit graph, launch, update, rebind, driver DOT.

Every node is added by hand with exactly the reduced DAG's edges; no stream capture. The executable keeps
each node's handle and its bound parameters, so one node (``update``) or every user of a buffer
(``rebind``) can be changed in the instantiated graph without re-instantiating it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import expr
from .errors import BuildError, DagbuildError, DriverError, Issue, SpecError
from .plan import KernelArg, Plan, PlanNode, View, memset_bits, resolve_view
from .spec import ITEMSIZE

#: NumPy dtypes of buffer elements; bf16 is held as raw uint16 bits (NumPy has no bfloat16).
NP_DTYPE = {"i8": np.int8, "u8": np.uint8, "f16": np.float16, "bf16": np.uint16, "i32": np.int32,
            "u32": np.uint32, "f32": np.float32, "i64": np.int64, "u64": np.uint64, "f64": np.float64}
_ALSO_OK = {"bf16": {np.dtype(np.int16)}}

DEFAULT_SHARED_LIMIT = 48 * 1024


@dataclass(frozen=True)
class ArrayRef:
    """Where a buffer lives: its base address, byte size, and the object that keeps it alive."""

    ptr: int
    nbytes: int
    owner: Any
    external: bool = False


def _array_ref(name: str, array: Any, dtype: str, need: int, exact: bool) -> ArrayRef:
    """Accept CuPy arrays, PyTorch tensors (``__cuda_array_interface__``) or DLPack producers."""
    if type(array).__name__ == "ndarray" and type(array).__module__.startswith("cupy"):  # the common case
        got, want = array.dtype, np.dtype(NP_DTYPE[dtype])
        if (got == want or got in _ALSO_OK.get(dtype, set())) and array.flags.c_contiguous and (
                array.nbytes == need if exact else array.nbytes >= need):
            return ArrayRef(int(array.data.ptr), int(array.nbytes), array, external=True)
    iface = getattr(array, "__cuda_array_interface__", None)
    if iface is None and hasattr(array, "__dlpack__"):
        import cupy

        array = cupy.from_dlpack(array)
        iface = array.__cuda_array_interface__
    if iface is None:
        raise BuildError(f"buffer {name!r}: cannot bind a {type(array).__name__}; pass device memory "
                         "(a CuPy array, a PyTorch CUDA tensor, or anything with __cuda_array_interface__)",
                         buffer=name)
    got = np.dtype(iface["typestr"])
    want = np.dtype(NP_DTYPE[dtype])
    if got != want and got not in _ALSO_OK.get(dtype, set()):
        raise BuildError(f"buffer {name!r} is {dtype} (NumPy {want}), but the array bound to it is {got}",
                         buffer=name)
    shape = tuple(iface["shape"])
    nbytes = math.prod(shape) * got.itemsize
    strides = iface.get("strides")
    if strides is not None:
        expect = tuple(int(np.prod(shape[i + 1:])) * got.itemsize for i in range(len(shape)))
        if tuple(strides) != expect and nbytes:
            raise BuildError(f"buffer {name!r}: the array bound to it is not C-contiguous", buffer=name)
    if (nbytes != need) if exact else (nbytes < need):
        raise BuildError(f"buffer {name!r} needs {'exactly ' if exact else 'at least '}{need} bytes, "
                         f"but the array bound to it has {nbytes}", buffer=name)
    return ArrayRef(int(iface["data"][0]), nbytes, array, external=True)


class BufferMap(MutableMapping):
    """``exe.buffers``: buffer name → array. Views of memory bound from outside (a pool's arena) are made
    on first access: a pool bucket whose buffers nobody reads never pays for them."""

    def __init__(self) -> None:
        self._arrays: dict[str, Any] = {}
        self._lazy: dict[str, Any] = {}

    def set_lazy(self, name: str, make: Any) -> None:
        self._arrays.pop(name, None)
        self._lazy[name] = make

    def __getitem__(self, name: str) -> Any:
        if name in self._lazy:
            self._arrays[name] = self._lazy.pop(name)()
        return self._arrays[name]

    def __setitem__(self, name: str, array: Any) -> None:
        self._lazy.pop(name, None)
        self._arrays[name] = array

    def __delitem__(self, name: str) -> None:
        if self._lazy.pop(name, None) is None:
            del self._arrays[name]

    def __iter__(self):
        return iter([*self._arrays, *self._lazy])

    def __len__(self) -> int:
        return len(self._arrays) + len(self._lazy)

    def clear(self) -> None:
        self._arrays.clear()
        self._lazy.clear()


class ModuleCache:
    """Compiled modules and function handles, shared by every executable that is given it (a pool)."""

    def __init__(self) -> None:
        self.modules: dict[tuple, Any] = {}
        self.functions: dict[tuple, int] = {}
        self.checked: set[tuple] = set()

    def function(self, plan: Plan, kernel_name: str, arch: str | None) -> int:
        from . import kernels

        k = plan.kernels[kernel_name]
        key = (k.source, k.options)
        if key not in self.modules:
            self.modules[key] = kernels.load_module(k.source, kernel_name, k.options)
        if arch and (key, k.entry, k.params) not in self.checked:
            from .compile import check_kernel

            issues = check_kernel(k, arch)
            if issues:
                raise SpecError(issues)
            self.checked.add((key, k.entry, k.params))
        fkey = (key, k.entry)
        if fkey not in self.functions:
            self.functions[fkey] = kernels.function_handle(self.modules[key], k.entry, kernel=kernel_name)
        return self.functions[fkey]

    def clear(self) -> None:
        self.modules.clear()
        self.functions.clear()


class Executable:
    """One instantiated graph over named buffers. Use as a context manager, or call :meth:`close`.

    ``bound`` maps buffer names to memory the caller owns (CuPy/PyTorch arrays); the rest is allocated
    here (device buffers as CuPy arrays, pinned buffers as NumPy arrays over page-locked memory).
    ``modules`` shares compiled kernels between executables. ``check_signatures`` compiles each kernel's
    PTX once through NVRTC and checks the declared params against its ``.entry``. ``build_graph=False``
    stops after buffers and kernels (what eager and stream-captured baselines need). ``concurrent=False``
    chains the nodes in one topological order: the driver then keeps far less memory per executable
    (independent branches cost it memory), at the price of running independent work one after another.
    """

    def __init__(self, plan: Plan, *, backend: Any = None, device: int = 0,
                 bound: Mapping[str, Any] | None = None, modules: ModuleCache | None = None,
                 stream: Any = None, check_signatures: bool = True, upload: bool = True,
                 template: Executable | None = None, build_graph: bool = True, concurrent: bool = True):
        self.plan = plan
        self.graph = None
        self.exec = None
        self.nodes: dict[str, Any] = {}
        self.buffers = BufferMap()
        self._refs: dict[str, ArrayRef] = {}
        self._state: dict[str, PlanNode] = {n.id: n for n in plan.nodes}
        self._funcs: dict[str, int] = {}
        self._closed = False
        self._own_graph = template is None
        self.concurrent = concurrent
        try:
            import cupy

            if backend is None:
                from .backends import get_backend

                backend = get_backend("auto", device)
            self.backend = backend
            self.modules = modules if modules is not None else ModuleCache()
            self._own_modules = modules is None
            self.limits = backend.limits()
            self.stream = stream if stream is not None else cupy.cuda.Stream(non_blocking=True)
            self._check_limits()
            arch = f"sm_{''.join(map(str, self.limits['compute_capability']))}" if check_signatures else None
            self._compile(arch)
            self._allocate(bound or {})
            if not build_graph:  # buffers and kernels only: for eager or stream-captured baselines
                return
            if template is None:
                self._build()
            else:
                self._derive(template)
            if upload:
                self.backend.upload(self.exec, self.stream.ptr)
        except BaseException:
            self.close()
            raise

    # ---- build -------------------------------------------------------------------------------------
    def _check_limits(self) -> None:
        lim, issues = self.limits, []
        optin = lim.get("max_shared_per_block_optin", DEFAULT_SHARED_LIMIT)
        for n in self.plan.nodes:
            if n.kind != "kernel":
                continue
            bad = None
            if n.threads > lim["max_threads_per_block"]:
                bad = f"block {list(n.block)} has {n.threads} threads; the device allows {lim['max_threads_per_block']}"
            elif any(b > m for b, m in zip(n.block, lim["max_block_dim"], strict=True)):
                bad = f"block {list(n.block)} exceeds the device's block dims {list(lim['max_block_dim'])}"
            elif any(g > m for g, m in zip(n.grid, lim["max_grid_dim"], strict=True)):
                bad = f"grid {list(n.grid)} exceeds the device's grid dims {list(lim['max_grid_dim'])}"
            elif n.shared > optin:
                bad = (f"shared = {n.shared} bytes of dynamic shared memory; the device allows at most "
                       f"{optin} per block")
            if bad:
                issues.append(Issue("launch_config", f"node {n.id!r} (kernel {n.kernel!r}): {bad}",
                                    nodes=(n.id,), line=self.plan.spec.line_of(n.path)))
        if issues:
            raise SpecError(issues)

    def _compile(self, arch: str | None) -> None:
        shared_need: dict[str, int] = {}
        for n in self.plan.nodes:
            if n.kind == "kernel":
                if n.kernel not in self._funcs:
                    self._funcs[n.kernel] = self.modules.function(self.plan, n.kernel, arch)
                shared_need[n.kernel] = max(shared_need.get(n.kernel, 0), n.shared)
        for name, need in shared_need.items():
            if need > DEFAULT_SHARED_LIMIT:
                self.backend.set_max_dynamic_shared(self._funcs[name], need)

    def _allocate(self, bound: Mapping[str, Any]) -> None:
        import cupy
        import cupyx

        allocated = False
        for name in bound:
            if name not in self.plan.buffers:
                raise BuildError(f"cannot bind {name!r}: the spec has no buffer of that name "
                                 f"(buffers: {', '.join(self.plan.buffers)})", buffer=name)
        for name, b in self.plan.buffers.items():
            dt = NP_DTYPE[b.dtype]
            if name in bound:
                arr = bound[name]
                if b.memory == "pinned":
                    if not isinstance(arr, np.ndarray) or arr.nbytes < b.nbytes:
                        raise BuildError(f"pinned buffer {name!r} must be bound to a NumPy array over pinned "
                                         f"memory of at least {b.nbytes} bytes", buffer=name)
                    flat = arr.reshape(-1).view(np.uint8)[: b.nbytes].view(dt).reshape(b.shape)
                    self._refs[name] = ArrayRef(flat.ctypes.data, b.nbytes, arr, external=True)
                    self.buffers[name] = flat
                    continue
                ref = _array_ref(name, arr, b.dtype, b.nbytes, exact=False)
                self._refs[name] = ref
                self.buffers.set_lazy(name, lambda ref=ref, b=b: _device_view(ref, b.dtype, b.shape))
            elif b.memory == "pinned":
                arr = cupyx.zeros_pinned(b.shape, dtype=dt)
                self._refs[name] = ArrayRef(arr.ctypes.data, arr.nbytes, arr)
                self.buffers[name] = arr
            else:
                arr = cupy.zeros(b.shape, dtype=dt)
                self._refs[name] = ArrayRef(arr.data.ptr, arr.nbytes, arr)
                self.buffers[name] = arr
                allocated = True
        if allocated:  # the zero fills ran on CuPy's current stream; the graph runs on its own
            cupy.cuda.get_current_stream().synchronize()

    def _build(self) -> None:
        be = self.backend
        self.graph = be.graph_create()
        order = self.plan.topological()
        if self.concurrent:
            preds = self.plan.preds()
        else:  # one chain in a topological order: no concurrency, and the least driver memory
            preds = {n.id: [order[i - 1].id] if i else [] for i, n in enumerate(order)}
        for n in order:
            deps = [self.nodes[p] for p in preds[n.id]]
            try:
                if n.kind == "kernel":
                    self.nodes[n.id] = be.add_kernel(self.graph, deps, *self._kernel_params(n))
                elif n.kind == "memcpy":
                    self.nodes[n.id] = be.add_memcpy(self.graph, deps, *self._memcpy_params(n))
                elif n.kind == "memset":
                    self.nodes[n.id] = be.add_memset(self.graph, deps, *self._memset_params(n))
                else:
                    self.nodes[n.id] = be.add_empty(self.graph, deps)
            except DriverError as e:
                raise DriverError(e.call, e.status, node=n.id, kernel=n.kernel) from None
        try:
            self.exec = be.instantiate(self.graph)
        except DriverError as e:
            raise DriverError(e.call, e.status, detail=f"instantiating graph {self.plan.name!r}") from None
        # what the graph's nodes were made with (addresses only: the snapshot must not keep memory alive)
        self._built_at = (dict(self._state), {k: replace(r, owner=None) for k, r in self._refs.items()})
        self._built_cache: dict[str, tuple] | None = None

    def _derive(self, template: Executable) -> None:
        """Instantiate ``template``'s graph again and set only the parameters that differ (a pool's
        buckets share one topology; their grids, scalar args and buffer addresses differ)."""
        if [n.id for n in template.plan.nodes] != [n.id for n in self.plan.nodes] or \
                template.plan.edges != self.plan.edges:
            raise BuildError(f"graph {self.plan.name!r}: a derived executable needs the template's exact "
                             "topology (same node ids and edges)")
        self.graph, self.nodes = template.graph, dict(template.nodes)
        try:
            self.exec = self.backend.instantiate(self.graph)
        except DriverError as e:
            raise DriverError(e.call, e.status, detail=f"instantiating graph {self.plan.name!r}") from None
        base = template._built_params()
        for n in self.plan.nodes:
            params = self._params(n)
            if params != base[n.id]:
                self._push(n, params)

    def _built_params(self) -> dict[str, tuple]:
        """Each node's parameters as the graph (not the instantiated exec) holds them; computed on first
        use, since only a template for derived executables needs them."""
        if self._built_cache is None:
            state, refs = self._built_at
            current, self._refs = self._refs, refs
            try:
                self._built_cache = {i: self._params(n) for i, n in state.items()}
            finally:
                self._refs = current
        return self._built_cache

    def _params(self, n: PlanNode) -> tuple:
        if n.kind == "kernel":
            return self._kernel_params(n)
        if n.kind == "memcpy":
            return self._memcpy_params(n)
        if n.kind == "memset":
            return self._memset_params(n)
        return ()

    # ---- node parameters: the same helpers build and update -----------------------------------------
    def _ptr(self, view: View) -> int:
        return self._refs[view.buffer].ptr + view.offset

    def _kernel_params(self, n: PlanNode) -> tuple:
        args = [(a.param.kind, self._ptr(a.view) if a.view is not None else a.value) for a in n.args]
        return self._funcs[n.kernel], n.grid, n.block, n.shared, args

    def _memcpy_params(self, n: PlanNode) -> tuple:
        return self._ptr(n.dst), self._ptr(n.src), n.count

    def _memset_params(self, n: PlanNode) -> tuple:
        return self._ptr(n.dst), n.value_bits, n.element_size, n.count

    def _push(self, n: PlanNode, params: tuple | None = None) -> None:
        """Write one node's current parameters into the instantiated graph (no re-instantiation)."""
        be, handle = self.backend, self.nodes[n.id]
        params = self._params(n) if params is None else params
        try:
            if n.kind == "kernel":
                be.set_kernel(self.exec, handle, *params)
            elif n.kind == "memcpy":
                be.set_memcpy(self.exec, handle, *params)
            elif n.kind == "memset":
                be.set_memset(self.exec, handle, *params)
        except DriverError as e:
            raise DriverError(e.call, e.status, node=n.id, kernel=n.kernel) from None

    # ---- public API ---------------------------------------------------------------------------------
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
        and views of the *same* buffer (same byte size) for pointers, so the DAG stays valid."""
        self._alive()
        n = self._state.get(node_id)
        if n is None:
            raise BuildError(f"no node {node_id!r} in graph {self.plan.name!r}", node=node_id)
        env = dict(self.plan.dims)
        for f in n.repeats:
            env[f.var] = f.value
        try:
            if n.kind == "kernel":
                n = self._updated_kernel(n, env, args or {}, grid, block, shared)
            elif n.kind == "memset":
                if value is not None:
                    try:
                        bits, esize, _ = memset_bits(self.plan.buffers[n.dst.buffer].dtype, value)
                    except (TypeError, ValueError, OverflowError) as e:
                        raise BuildError(f"node {node_id!r}: memset value: {e}", node=node_id) from None
                    n = replace(n, value=value, value_bits=bits, element_size=esize)
                if dst is not None:
                    n = replace(n, dst=self._same_range_view(n, n.dst, dst, env))
            elif n.kind == "memcpy":
                n = replace(n, src=self._same_range_view(n, n.src, src, env) if src else n.src,
                            dst=self._same_range_view(n, n.dst, dst, env) if dst else n.dst)
        except expr.ExprError as e:
            raise BuildError(f"node {node_id!r}: {e}", node=node_id) from None
        n = _with_accesses(n)
        self._check_ordered(n)
        self._push(n)
        self._state[node_id] = n

    def _check_ordered(self, n: PlanNode) -> None:
        """A moved view must not race: every node touching its new bytes (one side writing) must be
        ordered with ``n`` by the graph's edges, as validation guaranteed for the old views."""
        old = self._state[n.id]
        moved = [(v, w) for v, w in _accesses(n) if (v, w) not in _accesses(old)]
        if not moved:
            return
        import networkx as nx

        if not hasattr(self, "_reach"):
            g = nx.DiGraph(self.plan.edges)
            g.add_nodes_from(m.id for m in self.plan.nodes)
            self._reach = g
        ordered = nx.ancestors(self._reach, n.id) | nx.descendants(self._reach, n.id) | {n.id}
        for m in self._state.values():
            if m.id in ordered:
                continue
            for v, w in moved:
                for mv, mw in _accesses(m):
                    if (w or mw) and v.overlaps(mv):
                        raise BuildError(f"node {n.id!r}: {v.text!r} would overlap {mv.text!r} of node {m.id!r} "
                                         f"with no path between the two nodes (a race); rebuild the graph",
                                         node=n.id, buffer=v.buffer, code="race")

    def _same_range_view(self, n: PlanNode, old: View, text: str, env: dict) -> View:
        from .plan import NodeError

        try:
            view = resolve_view(text, self.plan.buffers, env)
        except NodeError as e:
            raise BuildError(f"node {n.id!r}: {e}", node=n.id) from None
        if view.buffer != old.buffer or view.nbytes != old.nbytes:
            raise BuildError(f"node {n.id!r}: {text!r} is not a same-sized view of buffer {old.buffer!r} "
                             f"({old.nbytes} bytes); other buffers change the DAG's data flow — "
                             "use rebind() or rebuild", node=n.id, buffer=view.buffer)
        return view

    def _updated_kernel(self, n: PlanNode, env, args, grid, block, shared) -> PlanNode:
        from .plan import MAX_BLOCK, MAX_GRID, NodeError, _dims3

        params = {a.param.name: a for a in n.args}
        unknown = set(args) - set(params)
        if unknown:
            raise BuildError(f"node {n.id!r}: kernel {n.kernel!r} has no param {sorted(unknown)[0]!r} "
                             f"(params: {', '.join(params)})", node=n.id)
        new_args = []
        for a in n.args:
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
                val = expr.evaluate(v, env)
                if a.param.dtype.startswith(("i", "u")):
                    if isinstance(val, float) and not val.is_integer():
                        raise BuildError(f"node {n.id!r}: `{a.param}` needs an integer, got {val}", node=n.id)
                    val = int(val)
                else:
                    val = float(val)
                new_args.append(KernelArg(a.param, value=val))
        try:
            g = _dims3(grid, "grid", env, MAX_GRID) if grid is not None else n.grid
            b = _dims3(block, "block", env, MAX_BLOCK) if block is not None else n.block
        except NodeError as e:
            raise BuildError(f"node {n.id!r}: {e}", node=n.id, code=e.code) from None
        sh = expr.evaluate_int(shared, env) if shared is not None else n.shared
        if math.prod(b) > self.limits["max_threads_per_block"] or sh > self.limits.get(
                "max_shared_per_block_optin", DEFAULT_SHARED_LIMIT):
            raise BuildError(f"node {n.id!r}: block {list(b)} / shared {sh} exceeds the device's limits",
                             node=n.id, code="launch_config")
        if sh > DEFAULT_SHARED_LIMIT:
            self.backend.set_max_dynamic_shared(self._funcs[n.kernel], sh)
        return replace(n, args=tuple(new_args), grid=g, block=b, shared=sh)

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
        ref = _array_ref(buffer, array, b.dtype, b.nbytes, exact=True)
        old = self._refs[buffer]
        self._refs[buffer] = ref
        try:
            for n in self._state.values():
                if any(v.buffer == buffer for v in (*n.reads, *n.writes)):
                    self._push(n)
        except DagbuildError:
            self._refs[buffer] = old
            for n in self._state.values():
                if any(v.buffer == buffer for v in (*n.reads, *n.writes)):
                    self._push(n)
            raise
        self.buffers[buffer] = _device_view(ref, b.dtype, b.shape)

    def driver_dot(self) -> str:
        """The driver's own DOT of the graph (``cuGraphDebugDotPrint``)."""
        self._alive()
        return self.backend.debug_dot(self.graph)

    def driver_graph(self) -> tuple[dict[str, str], set[tuple[str, str]]]:
        """What the driver holds: node id → node type, and edges by node id."""
        self._alive()
        be = self.backend
        by_handle = {be.node_id(h): i for i, h in self.nodes.items()}
        kinds, edges = {}, set()
        for h in be.graph_nodes(self.graph):
            nid = by_handle[be.node_id(h)]
            kinds[nid] = be.node_type(h)
            for d in be.node_deps(self.graph, h):
                edges.add((by_handle[be.node_id(d)], nid))
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
            self.nodes.clear()
            self.buffers.clear()
            self._refs.clear()
            self._built_at = self._built_cache = None
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


def _accesses(n: PlanNode) -> list[tuple[View, bool]]:
    return [(v, False) for v in n.reads] + [(v, True) for v in n.writes]


def _with_accesses(n: PlanNode) -> PlanNode:
    """``n`` with reads/writes recomputed from its (possibly updated) args, src and dst."""
    if n.kind == "kernel":
        reads = tuple(a.view for a in n.args if a.view is not None and a.param.const)
        writes = tuple(a.view for a in n.args if a.view is not None and not a.param.const)
        return replace(n, reads=reads, writes=writes)
    if n.kind == "memcpy":
        return replace(n, reads=(n.src,), writes=(n.dst,))
    if n.kind == "memset":
        return replace(n, writes=(n.dst,))
    return n


def _device_view(ref: ArrayRef, dtype: str, shape: tuple[int, ...]) -> Any:
    """A CuPy array of ``shape`` over the first bytes of ``ref`` (the memory stays owned by ref.owner)."""
    import cupy

    n = math.prod(shape) * ITEMSIZE[dtype]
    mem = cupy.cuda.UnownedMemory(ref.ptr, n, ref.owner)
    return cupy.ndarray(shape, dtype=NP_DTYPE[dtype], memptr=cupy.cuda.MemoryPointer(mem, 0))
