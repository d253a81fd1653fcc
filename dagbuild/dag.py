"""Plan → DAG analysis: edges from data flow and ``after``, cycles, races, transitive reduction, summary.

Pure functions over a bound :class:`~dagbuild.ir.Plan`; :func:`analyze` returns an
:class:`~dagbuild.ir.Analysis` and the issues it found and never changes the plan. The hot parts run
near-linearly on plain Python structures (ancestor sets as integer bitsets, freed as soon as no
successor needs them); networkx reports cycles and computes the exact width of small graphs.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import replace

import networkx as nx

from .errors import Issue
from .ir import Analysis, KernelOp, LoopOp, Plan, PlanNode, View

#: Above this many nodes the summary's max width is the widest level of a longest-path layering (a
#: lower bound, said as such), not the exact minimum-flow answer, which would take minutes.
EXACT_WIDTH_LIMIT = 3000


def infer_edges(nodes: list[PlanNode]) -> set[tuple[str, str]]:
    """Edges that order every conflicting pair in list order: RAW, WAR and WAW on overlapping bytes.

    Per buffer, keep the accesses still "live"; a write that covers an earlier access retires it,
    since anything later that conflicts with the old access also conflicts with the new write.
    """
    live: dict[str, list[tuple[View, bool, str]]] = defaultdict(list)
    edges: set[tuple[str, str]] = set()
    for node in nodes:
        mine = node.accesses()
        for view, write in mine:
            for old_view, old_write, old_id in live[view.buffer]:
                if old_id != node.id and (write or old_write) and view.overlaps(old_view):
                    edges.add((old_id, node.id))
        for view, write in mine:
            entries = live[view.buffer]
            if write:
                entries[:] = [e for e in entries if e[2] == node.id or not view.covers(e[0])]
            entries.append((view, write, node.id))
    return edges


def data_flow(plan: Plan) -> set[tuple[str, str]]:
    """Every edge before reduction: inferred from data flow (``deps: infer``) and from ``after``."""
    edges = infer_edges(plan.nodes) if plan.deps == "infer" else set()
    ids = {n.id for n in plan.nodes}  # `after` may name a node that failed to bind (already reported)
    return edges | {(a, n.id) for n in plan.nodes for a in n.after if a in ids}


def full_graph(plan: Plan) -> nx.DiGraph:
    """Every node, with inferred edges (``deps: infer``) and ``after`` edges, as a networkx graph."""
    g = nx.DiGraph()
    g.add_nodes_from(n.id for n in plan.nodes)
    g.add_edges_from(data_flow(plan))
    return g


def find_cycles(g: nx.DiGraph) -> list[list[str]]:
    """One cycle (node ids in order) per strongly connected component that has one."""
    out = []
    for comp in nx.strongly_connected_components(g):
        if len(comp) == 1:
            (v,) = comp
            if g.has_edge(v, v):
                out.append([v])
            continue
        cycle = nx.find_cycle(g.subgraph(comp))
        out.append([u for u, _ in cycle])
    return out


class _Dag:
    """The full edge set over node indices, in an order the edges allow (None when there is a cycle)."""

    def __init__(self, plan: Plan, edges: Iterable[tuple[str, str]]):
        self.nodes = plan.nodes
        index = {n.id: i for i, n in enumerate(plan.nodes)}
        n = len(plan.nodes)
        self.preds: list[list[int]] = [[] for _ in range(n)]
        self.succs: list[list[int]] = [[] for _ in range(n)]
        self.count = 0
        for u, v in edges:
            iu, iv = index[u], index[v]
            self.preds[iv].append(iu)
            self.succs[iu].append(iv)
            self.count += 1
        left = [len(p) for p in self.preds]
        ready = [i for i in range(n) if left[i] == 0]  # node index = list order: a heap keeps ties stable
        heapq.heapify(ready)
        order = []
        while ready:
            i = heapq.heappop(ready)
            order.append(i)
            for j in self.succs[i]:
                left[j] -= 1
                if left[j] == 0:
                    heapq.heappush(ready, j)
        self.order: list[int] | None = order if len(order) == n else None

    def reduce(self, keep_ancestors: bool) -> tuple[list[tuple[int, int]], dict[int, int]]:
        """Transitive reduction: u → v stays unless u is an ancestor of another predecessor of v.

        Ancestor sets are bitsets; each is dropped once all its node's successors have used it, unless
        ``keep_ancestors`` (race checks need them all)."""
        assert self.order is not None
        anc: dict[int, int] = {}
        uses = [len(s) for s in self.succs]
        kept: list[tuple[int, int]] = []
        for v in self.order:
            ps = self.preds[v]
            union = 0
            for u in ps:
                union |= anc[u]
            mine = union
            for u in ps:
                if not union >> u & 1:
                    kept.append((u, v))
                mine |= 1 << u
            anc[v] = mine
            if not keep_ancestors:
                for u in ps:
                    uses[u] -= 1
                    if uses[u] == 0:
                        del anc[u]
            if not keep_ancestors and uses[v] == 0:
                del anc[v]
        return kept, anc


def find_races(plan: Plan, anc: dict[int, int]) -> list[Issue]:
    """Pairs of nodes that touch overlapping bytes, one writing, with no path between them.

    Per buffer, accesses sorted by offset are swept so that only overlapping pairs are compared."""
    index = {n.id: i for i, n in enumerate(plan.nodes)}
    by_buffer: dict[str, list[tuple[View, bool, PlanNode]]] = defaultdict(list)
    for n in plan.nodes:
        for view, write in n.accesses():
            by_buffer[view.buffer].append((view, write, n))
    issues, reported = [], set()
    for buf, acc in by_buffer.items():
        acc.sort(key=lambda t: (t[0].offset, t[2].order))
        active: list[tuple[View, bool, PlanNode]] = []
        for vb, wb, b in acc:
            active = [t for t in active if t[0].offset + t[0].nbytes > vb.offset]
            for va, wa, a in active:
                if a.id == b.id or not (wa or wb) or not va.overlaps(vb):
                    continue
                ia, ib = index[a.id], index[b.id]
                if anc[ib] >> ia & 1 or anc[ia] >> ib & 1:
                    continue
                first, second, vf, vs, wf, ws = (a, b, va, vb, wa, wb) if a.order < b.order else (b, a, vb, va, wb, wa)
                key = (first.id, second.id, buf)
                if key in reported:
                    continue
                reported.add(key)
                what = "both write" if wf and ws else ("writes" if wf else "reads") + " / " + (
                    "writes" if ws else "reads")
                issues.append(Issue(
                    "race", f"nodes {first.id!r} and {second.id!r} touch overlapping bytes of buffer {buf!r} "
                    f"({vf.label} / {vs.label}; {what}) with no path between them: add `after: [{first.id}]` "
                    f"to {second.id!r}", nodes=(first.id, second.id), buffer=buf,
                    line=plan.spec.line_of(second.path)))
            active.append((vb, wb, b))
    issues.sort(key=lambda i: (index[i.nodes[1]], index[i.nodes[0]]))  # a node's index is its list order
    return issues


def max_width(g: nx.DiGraph) -> int:
    """Largest set of nodes no path connects (Dilworth: a minimum flow over the DAG)."""
    if g.number_of_nodes() == 0:
        return 0
    f = nx.DiGraph()
    n = g.number_of_nodes()
    demand: Counter = Counter()
    for v in g.nodes:
        # every node is visited by at least one chain: a lower bound of 1 on v_in → v_out
        f.add_edge(("s",), (v, 0), weight=0)
        f.add_edge((v, 1), ("t",), weight=0)
        f.add_edge((v, 0), (v, 1), weight=0, capacity=n)
        demand[(v, 0)] += 1
        demand[(v, 1)] -= 1
    for u, v in g.edges:
        f.add_edge((u, 1), (v, 0), weight=0)
    f.add_edge(("t",), ("s",), weight=1)  # each unit of circulation is one chain
    for node, d in demand.items():
        f.nodes[node]["demand"] = d  # inflow − outflow that the lower bound forces
    cost, _ = nx.network_simplex(f)
    return int(cost)


def programmatic_edges(plan: Plan, edges: Iterable[tuple[str, str]]) -> frozenset[tuple[str, str]]:
    """Edges between two kernel nodes whose consumer launches programmatically."""
    by_id = plan.node_by_id
    return frozenset((u, v) for u, v in edges
                     if isinstance(by_id[v].op, KernelOp) and by_id[v].op.launch == "programmatic"
                     and isinstance(by_id[u].op, KernelOp))


def analyze(plan: Plan, complete: bool = True) -> tuple[Analysis | None, list[Issue]]:
    """Order the plan's nodes: the reduced edges and summary, or the issues (cycles, races).

    ``complete`` is False when binding already found issues: cycles and races are still looked for
    among the nodes that bound, but no analysis is returned. A plan with loops is analysed graph by
    graph: the top graph (each loop one node touching all its body touches) and each loop's body."""
    if any(n.scope is not None for n in plan.nodes):
        return _analyze_scopes(plan, complete)
    return _analyze_graph(plan, complete)


def _analyze_graph(plan: Plan, complete: bool) -> tuple[Analysis | None, list[Issue]]:
    """:func:`analyze` of one graph (its nodes' own edges)."""
    edges = data_flow(plan)
    dag = _Dag(plan, edges)
    if dag.order is None:
        g = nx.DiGraph(list(edges))
        by_id = plan.node_by_id
        return None, [Issue("cycle", "cycle: " + " → ".join([*c, c[0]]), nodes=tuple(c),
                            line=plan.spec.line_of(by_id[c[0]].path) if c[0] in by_id else None)
                      for c in find_cycles(g)]
    explicit = plan.deps == "explicit"
    kept, anc = dag.reduce(keep_ancestors=explicit)
    issues = find_races(plan, anc) if explicit else []
    if issues or not complete:
        return None, issues
    ids = [n.id for n in plan.nodes]  # a node's index is its list order
    reduced = [(ids[u], ids[v]) for u, v in sorted(kept, key=lambda e: (e[1], e[0]))]
    programmatic = programmatic_edges(plan, reduced)
    return Analysis(tuple(reduced), programmatic, summarize(plan, dag, kept, len(programmatic))), []


def summarize(plan: Plan, dag: _Dag, kept: list[tuple[int, int]], programmatic: int) -> dict:
    kinds = Counter(n.kind for n in plan.nodes)
    by_memory: Counter = Counter()
    for b in plan.buffers.values():
        by_memory[b.memory] += b.nbytes
    n = len(plan.nodes)
    depth = [0] * n  # longest path (in nodes) ending at each node, over the reduced edges
    preds: list[list[int]] = [[] for _ in range(n)]
    for u, v in kept:
        preds[v].append(u)
    for v in dag.order or []:
        depth[v] = 1 + max((depth[u] for u in preds[v]), default=0)
    exact = n <= EXACT_WIDTH_LIMIT
    if exact:
        g = nx.DiGraph()
        g.add_nodes_from(range(n))
        g.add_edges_from(kept)
        width = max_width(g)
    else:
        width = max(Counter(depth).values(), default=0)
    return {
        "name": plan.name,
        "nodes": n,
        "nodes_by_kind": {k: kinds.get(k, 0) for k in ("kernel", "memcpy", "memset", "empty")} | dict(kinds),
        "edges": dag.count,
        "edges_reduced": len(kept),
        "edges_programmatic": programmatic,
        "critical_path": max(depth, default=0),
        "max_width": width,
        "max_width_exact": exact,
        "buffers": len(plan.buffers),
        "bytes_by_memory": {k: by_memory.get(k, 0) for k in ("device", "pinned")},
        "dims": dict(plan.dims),
        "consts": dict(plan.consts),
    }


def _analyze_scopes(plan: Plan, complete: bool) -> tuple[Analysis | None, list[Issue]]:
    """:func:`analyze` for a plan with loop bodies: each graph on its own (a body's edges join its own
    nodes only), results merged; the summary is the top graph's with every node and edge counted."""
    scopes: dict[str | None, list[PlanNode]] = {None: []}
    for n in plan.nodes:
        scopes.setdefault(n.scope, []).append(n)
    edges: list[tuple[str, str]] = []
    programmatic: set[tuple[str, str]] = set()
    issues: list[Issue] = []
    summaries: dict[str | None, dict] = {}
    for scope, nodes in scopes.items():
        analysis, found = _analyze_graph(replace(plan, nodes=nodes), complete)
        issues += found
        if analysis is not None:
            edges += analysis.edges
            programmatic |= analysis.programmatic
            summaries[scope] = analysis.summary
    if issues or not complete:
        return None, issues
    top = dict(summaries[None])
    kinds = Counter(n.kind for n in plan.nodes)
    top["nodes"] = len(plan.nodes)
    top["nodes_by_kind"] = {k: kinds.get(k, 0) for k in ("kernel", "memcpy", "memset", "empty", "loop")}
    for key in ("edges", "edges_reduced", "edges_programmatic"):
        top[key] = sum(s[key] for s in summaries.values())
    top["loops"] = {n.id: {"max": n.op.max, "body_nodes": sum(1 for m in plan.nodes if m.scope == n.id),
                           "body_critical_path": summaries[n.id]["critical_path"]}
                    for n in plan.nodes if isinstance(n.op, LoopOp)}
    return Analysis(tuple(edges), frozenset(programmatic), top), []
