"""Plan → DAG: edges from data flow and ``after``, cycles, races, transitive reduction, summary.

Pure functions over PlanNodes; networkx holds the graph. ``analyze`` stores the reduced edge list and
the summary on the Plan and returns the issues it found.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable

import networkx as nx

from .errors import Issue
from .plan import Plan, PlanNode, View


def accesses(node: PlanNode) -> Iterable[tuple[View, bool]]:
    """(view, writes?) for every byte range a node touches; a ``T*`` param is read and written."""
    for v in node.reads:
        yield v, False
    for v in node.writes:
        yield v, True


def infer_edges(nodes: list[PlanNode]) -> set[tuple[str, str]]:
    """Edges that order every conflicting pair in list order: RAW, WAR and WAW on overlapping bytes.

    Per buffer, keep the accesses still "live"; a write that covers an earlier access retires it,
    since anything later that conflicts with the old access also conflicts with the new write.
    """
    live: dict[str, list[tuple[View, bool, str]]] = defaultdict(list)
    edges: set[tuple[str, str]] = set()
    for node in nodes:
        mine = list(accesses(node))
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


def full_graph(plan: Plan) -> nx.DiGraph:
    """Every node, with inferred edges (``deps: infer``) and ``after`` edges."""
    g = nx.DiGraph()
    for n in plan.nodes:
        g.add_node(n.id)
    if plan.deps == "infer":
        g.add_edges_from(infer_edges(plan.nodes))
    for n in plan.nodes:
        for a in n.after:
            g.add_edge(a, n.id)
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


def _ancestor_bits(g: nx.DiGraph, order: list[str]) -> dict[str, int]:
    index = {v: i for i, v in enumerate(order)}
    bits: dict[str, int] = {}
    for v in order:
        b = 0
        for u in g.predecessors(v):
            b |= bits[u] | (1 << index[u])
        bits[v] = b
    return bits


def find_races(plan: Plan, g: nx.DiGraph) -> list[Issue]:
    """Pairs of nodes that touch overlapping bytes, one writing, with no path between them."""
    order = list(nx.topological_sort(g))
    index = {v: i for i, v in enumerate(order)}
    anc = _ancestor_bits(g, order)
    by_buffer: dict[str, list[tuple[View, bool, PlanNode]]] = defaultdict(list)
    for n in plan.nodes:
        for view, write in accesses(n):
            by_buffer[view.buffer].append((view, write, n))
    issues, reported = [], set()
    for buf, acc in by_buffer.items():
        for i, (va, wa, a) in enumerate(acc):
            for vb, wb, b in acc[i + 1:]:
                if a.id == b.id or not (wa or wb) or not va.overlaps(vb):
                    continue
                if anc[b.id] >> index[a.id] & 1 or anc[a.id] >> index[b.id] & 1:
                    continue
                key = (a.id, b.id, buf)
                if key in reported:
                    continue
                reported.add(key)
                what = "both write" if wa and wb else ("writes" if wa else "reads") + " / " + (
                    "writes" if wb else "reads")
                issues.append(Issue(
                    "race", f"nodes {a.id!r} and {b.id!r} touch overlapping bytes of buffer {buf!r} "
                    f"({va.text} / {vb.text}; {what}) with no path between them: add `after: [{a.id}]` "
                    f"to {b.id!r}", nodes=(a.id, b.id), buffer=buf, line=plan.spec.line_of(b.path)))
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


def analyze(plan: Plan, complete: bool = True) -> list[Issue]:
    """Order the plan's nodes; set ``plan.edges`` (reduced) and ``plan.summary``; return issues.

    ``complete`` is False when binding already found issues: cycles and races are still looked for
    among the nodes that bound, but a summary is not computed.
    """
    g = full_graph(plan)
    cycles = find_cycles(g)
    issues = [Issue("cycle", "cycle: " + " → ".join([*c, c[0]]), nodes=tuple(c),
                    line=plan.spec.line_of(plan.node_by_id[c[0]].path) if c[0] in plan.node_by_id else None)
              for c in cycles]
    if cycles:
        return issues
    if plan.deps == "explicit":
        issues += find_races(plan, g)
    if issues or not complete:
        return issues
    reduced = nx.transitive_reduction(g)
    order = {n.id: n.order for n in plan.nodes}
    plan.edges = sorted(reduced.edges, key=lambda e: (order[e[1]], order[e[0]]))
    plan.summary = summarize(plan, g, reduced)
    return []


def summarize(plan: Plan, g: nx.DiGraph, reduced: nx.DiGraph) -> dict:
    kinds = Counter(n.kind for n in plan.nodes)
    by_memory: Counter = Counter()
    for b in plan.buffers.values():
        by_memory[b.memory] += b.nbytes
    return {
        "name": plan.name,
        "nodes": len(plan.nodes),
        "nodes_by_kind": {k: kinds.get(k, 0) for k in ("kernel", "memcpy", "memset", "empty")},
        "edges": g.number_of_edges(),
        "edges_reduced": reduced.number_of_edges(),
        "critical_path": nx.dag_longest_path_length(reduced) + 1 if len(plan.nodes) else 0,
        "max_width": max_width(reduced),
        "buffers": len(plan.buffers),
        "bytes_by_memory": {k: by_memory.get(k, 0) for k in ("device", "pinned")},
        "dims": dict(plan.dims),
    }
