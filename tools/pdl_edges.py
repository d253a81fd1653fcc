"""Programmatic (PDL) kernel → kernel edges for dagbuild graphs, until the graph builder has its own.

:class:`ProgrammaticEdges` wraps dagbuild's CUDA backend: every kernel node is added with no dependencies and
its edges are added afterwards with ``cuGraphAddDependencies``; an edge from a kernel node into a kernel node
whose function is programmatic (all of them by default) is a programmatic edge (the consumer may launch once
every block of the producer has executed ``griddepcontrol.launch_dependents``), every other edge is plain.
The kernels on the consuming side must execute ``griddepcontrol.wait`` before touching produced data
(kernels/llama_fused.cu does). :func:`chain_graph` builds one chain of kernel launches the same way.

    exe = Executable(plan, backend=ProgrammaticEdges(get_backend("cuda")))
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


class ProgrammaticEdges:
    """A dagbuild CUDA backend whose kernel → kernel edges are programmatic (see the module docstring).
    ``programmatic_funcs``: the CUfunction handles (ints) that may launch programmatically (None: all)."""

    def __init__(self, inner: Any, programmatic_funcs: Iterable[int] | None = None):
        self.inner = inner
        self.funcs = None if programmatic_funcs is None else {int(f) for f in programmatic_funcs}
        self.kernel_nodes: set[int] = set()
        self.edges = {"programmatic": 0, "plain": 0}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def add_edge(self, graph: Any, src: Any, dst: Any, kind: str) -> None:
        drv = self.inner._drv
        edge = drv.CUgraphEdgeData()  # a default one is a plain edge
        if kind == "programmatic":
            edge.type = drv.CUgraphDependencyType.CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC
            edge.from_port = int(drv.CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC)
        self.inner._check("cuGraphAddDependencies",
                          drv.cuGraphAddDependencies(graph, [self.inner._node(src)], [self.inner._node(dst)],
                                                     [edge], 1))
        self.edges[kind] += 1

    def _deps(self, deps: Sequence[Any]) -> list[Any]:
        seen: dict[int, Any] = {}
        for d in deps:
            seen.setdefault(int(d), d)
        return list(seen.values())

    def add_kernel(self, graph, deps, func, grid, block, shared, args) -> Any:
        node = self.inner.add_kernel(graph, [], func, grid, block, shared, args)
        pdl = self.funcs is None or int(func) in self.funcs
        for d in self._deps(deps):
            self.add_edge(graph, d, node, "programmatic" if pdl and int(d) in self.kernel_nodes else "plain")
        self.kernel_nodes.add(int(node))
        return node

    def _plain(self, add, graph, deps, *params) -> Any:
        node = add(graph, [], *params)
        for d in self._deps(deps):
            self.add_edge(graph, d, node, "plain")
        return node

    def add_memcpy(self, graph, deps, *params) -> Any:
        return self._plain(self.inner.add_memcpy, graph, deps, *params)

    def add_memset(self, graph, deps, *params) -> Any:
        return self._plain(self.inner.add_memset, graph, deps, *params)

    def add_empty(self, graph, deps) -> Any:
        return self._plain(self.inner.add_empty, graph, deps)


def chain_graph(backend: Any, launches: Sequence[tuple], programmatic: bool, stream_ptr: int) -> tuple[Any, Any]:
    """An instantiated, uploaded graph of ``launches`` ((func, grid, block, shared, args) as dagbuild's
    backend takes them) in one chain, each edge programmatic or plain. Returns (graph, exec); launch with
    ``backend.launch(exec, stream_ptr)``; destroy both when done."""
    pe = ProgrammaticEdges(backend) if programmatic else None
    graph = backend.graph_create()
    prev = None
    for launch in launches:
        node = (pe or backend).add_kernel(graph, [prev] if prev is not None else [], *launch)
        prev = node
    exec_ = backend.instantiate(graph)
    backend.upload(exec_, stream_ptr)
    return graph, exec_
