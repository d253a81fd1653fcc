"""How each node kind reaches a backend: the one dispatch place between payloads and the driver.

Each :mod:`dagbuild.ir` payload class registers a :class:`NodeKind`: how to make its backend parameters
from the payload and buffer addresses, how to add such a node to a graph, how to set them in an
instantiated graph, and how to run it eagerly (for the eager and stream-captured baselines). Building
and updating share ``params``, so they read alike. A new node kind is a payload class plus one entry in
:data:`KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .dtypes import NP_DTYPE
from .ir import LOOP_ENTER, LOOP_NEXT, ChildOp, EmptyOp, KernelOp, LoopOp, MemcpyOp, MemsetOp, Op, View

Pointer = Callable[[View], int]  # a view's device (or pinned host) address


@dataclass(frozen=True)
class NodeKind:
    params: Callable[[Any, Pointer, Mapping[str, int]], tuple]  # (op, pointer of, function handles) → params
    add: Callable[[Any, Any, list, tuple], Any]  # (backend, graph, deps, params) → node handle
    set: Callable[[Any, Any, Any, tuple], None] | None  # (backend, exec, handle, params); None: nothing to set
    eager: Callable[[Any, tuple, Any], Callable[[Any], None]] | None  # (op, params, function) → step(stream)
    # kinds with a body (loops): (backend, handle, deps in the body, params) → None, after the body is added
    finish: Callable[[Any, Any, list, tuple], None] | None = None


@dataclass
class LoopNodes:
    """What a loop node is in a CUDA graph: ``loop_enter`` then the WHILE ``node`` in the parent graph,
    ``loop_next`` (added by ``finish``) last in its ``body`` graph, all sharing the condition ``handle``."""

    enter: Any
    node: Any
    body: Any
    handle: int
    next: Any = None


_ONE = (1, 1, 1)


def _loop_args(p: tuple, handle: int) -> list:
    _enter, _next, until, counter, count = p
    return [("ptr", until), ("ptr", counter), ("u64", handle), ("i32", count)]


def _loop_add(be: Any, graph: Any, deps: list, p: tuple) -> LoopNodes:
    handle = be.conditional_handle(graph)
    enter = be.add_kernel(graph, deps, p[0], _ONE, _ONE, 0, _loop_args(p, int(handle)))
    node, body = be.add_while(graph, [enter], handle)
    return LoopNodes(enter, node, body, int(handle))


def _loop_finish(be: Any, ln: LoopNodes, deps: list, p: tuple) -> None:
    ln.next = be.add_kernel(ln.body, deps, p[1], _ONE, _ONE, 0, _loop_args(p, ln.handle))


def _loop_set(be: Any, ex: Any, ln: LoopNodes, p: tuple) -> None:
    be.set_kernel(ex, ln.enter, p[0], _ONE, _ONE, 0, _loop_args(p, ln.handle))
    be.set_kernel(ex, ln.next, p[1], _ONE, _ONE, 0, _loop_args(p, ln.handle))


def _kernel_params(op: KernelOp, ptr: Pointer, funcs: Mapping[str, int]) -> tuple:
    args = [(a.param.kind, ptr(a.view) if a.view is not None else a.value) for a in op.args]
    return funcs[op.kernel], op.grid, op.block, op.shared, args


def _kernel_eager(op: KernelOp, params: tuple, fn: Any) -> Callable[[Any], None]:
    args = tuple(np.uint64(v) if kind == "ptr" else NP_DTYPE[kind](v) for kind, v in params[4])
    return lambda s: fn(op.grid, op.block, args, shared_mem=op.shared, stream=s)


def _memcpy_eager(op: MemcpyOp, params: tuple, fn: Any) -> Callable[[Any], None]:
    import cupy

    dst, src, count = params
    return lambda s: cupy.cuda.runtime.memcpyAsync(dst, src, count, 4, s.ptr)  # 4: cudaMemcpyDefault


def _memset_eager(op: MemsetOp, params: tuple, fn: Any) -> Callable[[Any], None]:
    import cupy

    ptr, bits, esize, count = params
    mem = cupy.cuda.UnownedMemory(ptr, count * esize, None)
    view = cupy.ndarray((count,), {1: np.uint8, 2: np.uint16, 4: np.uint32}[esize], cupy.cuda.MemoryPointer(mem, 0))

    def fill(s: Any) -> None:
        with s:
            view.fill(bits)

    return fill


def _child_params(op: ChildOp, ptr: Pointer, funcs: Mapping[str, int]) -> tuple:
    """``((call, ((name, dtype, value), ...)), ...)``: pointers as addresses (a workspace as (address, bytes))."""
    def value(a: Any) -> Any:
        if a.view is None:
            return a.value
        return (ptr(a.view), a.view.nbytes) if a.param.name == "workspace" else ptr(a.view)

    return tuple((c.call, tuple((a.param.name, a.param.dtype, value(a)) for a in c.args)) for c in op.body)


def _child_eager(op: ChildOp, params: tuple, backend: Any) -> Callable[[Any], None]:
    """The body's library calls issued straight on the stream (no graph): the eager baseline."""
    def run(s: Any) -> None:
        for call, args in params:
            backend.library_call(call, args, s.ptr)

    return run


KINDS: dict[type, NodeKind] = {
    KernelOp: NodeKind(
        params=_kernel_params,
        add=lambda be, g, deps, p: be.add_kernel(g, deps, *p),
        set=lambda be, ex, h, p: be.set_kernel(ex, h, *p),
        eager=_kernel_eager),
    MemcpyOp: NodeKind(
        params=lambda op, ptr, funcs: (ptr(op.dst), ptr(op.src), op.count),
        add=lambda be, g, deps, p: be.add_memcpy(g, deps, *p),
        set=lambda be, ex, h, p: be.set_memcpy(ex, h, *p),
        eager=_memcpy_eager),
    MemsetOp: NodeKind(
        params=lambda op, ptr, funcs: (ptr(op.dst), op.value_bits, op.element_size, op.count),
        add=lambda be, g, deps, p: be.add_memset(g, deps, *p),
        set=lambda be, ex, h, p: be.set_memset(ex, h, *p),
        eager=_memset_eager),
    EmptyOp: NodeKind(
        params=lambda op, ptr, funcs: (),
        add=lambda be, g, deps, p: be.add_empty(g, deps),
        set=None,
        eager=None),
    ChildOp: NodeKind(  # eager gets the backend (it issues the library calls), not a kernel function
        params=_child_params,
        add=lambda be, g, deps, p: be.add_child_graph(g, deps, p),
        set=lambda be, ex, h, p: be.set_child_graph(ex, h, p),
        eager=_child_eager),
    LoopOp: NodeKind(  # an unrolled loop compiles no loop kernels: their functions are then 0
        params=lambda op, ptr, funcs: (funcs.get(LOOP_ENTER, 0), funcs.get(LOOP_NEXT, 0),
                                       ptr(op.until) if op.until else 0, ptr(op.counter), op.max // op.unroll),
        add=_loop_add,
        set=_loop_set,
        eager=None,
        finish=_loop_finish),
}


def kind_of(op: Op) -> NodeKind:
    return KINDS[type(op)]
