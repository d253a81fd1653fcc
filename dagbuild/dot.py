"""DOT text of a validated plan: the reduced DAG, shaped and coloured by node kind, repeats and loop bodies
as clusters (a loop node heads its body's cluster), programmatic edges drawn bold and coloured; labels show
bound views (``act[0]``, not ``act[layers % 2]``)."""

from __future__ import annotations

import shutil
import subprocess

from .errors import DagbuildError
from .ir import Plan, PlanNode

STYLE = {
    "kernel": 'shape=box, style="rounded,filled", fillcolor="#cfe2ff"',
    "memcpy": 'shape=cds, style=filled, fillcolor="#d1e7dd"',
    "memset": 'shape=parallelogram, style=filled, fillcolor="#fff3cd"',
    "empty": 'shape=circle, style=filled, fillcolor="#e2e3e5", width=0.25',
    "child": 'shape=box3d, style=filled, fillcolor="#e0cffc"',
    "loop": 'shape=doubleoctagon, style=filled, fillcolor="#f8d7da"',
}
#: A loop's body sources hang off the loop node; its sinks lead back to it (the next iteration).
LOOP_EDGE = 'style=dotted, color="#b02a37", arrowhead=none'
LOOP_BACK = 'style=dotted, color="#b02a37", constraint=false, label="next", fontsize=9'


def _containers(n: PlanNode, by_id: dict[str, PlanNode]) -> list[tuple[tuple, tuple]]:
    """The repeat iterations and loop bodies a node sits in, outermost first, as (spec path, key)."""
    out = [(f.block, ("repeat", f.block, f.value)) for f in n.repeats]
    scope = n.scope
    while scope is not None:
        loop = by_id[scope]
        out.append((loop.path, ("loop", loop.id)))
        scope = loop.scope
    return sorted(out, key=lambda t: len(t[0]))


def _q(text: str) -> str:
    """A DOT string: quotes and backslashes escaped, newlines as DOT's centred line break."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


PROGRAMMATIC_EDGE = 'color="#d63384", penwidth=2, arrowhead=onormal, tooltip="programmatic"'


def label(node: PlanNode) -> str:
    """The node's id, then what its payload says of itself (kernel and launch shape, copy, fill)."""
    what = node.op.label()
    return f"{node.id}\n{what}" if what else node.id


def to_dot(plan: Plan) -> str:
    """The reduced DAG as DOT; a ``repeat`` is a cluster holding one sub-cluster per iteration."""
    lines = [f"digraph {_q(plan.name)} {{", '  rankdir=TB; graph [fontname="Helvetica", fontsize=11];',
             '  node [fontname="Helvetica", fontsize=10];',
             '  edge [color="#555555"];']
    # each level lists its nodes and repeat blocks in spec order
    tree: dict = {"items": [], "children": {}}
    by_id = plan.node_by_id
    frames = {f.block: f for n in plan.nodes for f in n.repeats}
    for n in plan.nodes:
        level = tree
        for _, key in _containers(n, by_id):
            if key[0] == "loop":
                block = level["children"].get(key)
                if block is None:
                    block = level["children"][key] = {"loop": by_id[key[1]], "items": [], "children": {}}
                    level["items"].append(("block", key))
                level = block
                continue
            block = level["children"].get(key[1])
            if block is None:
                block = level["children"][key[1]] = {"frame": frames[key[1]], "iters": {}}
                level["items"].append(("block", key[1]))
            level = block["iters"].setdefault(key[2], {"items": [], "children": {}})
        if n.kind == "loop":  # the loop node heads its own cluster
            key = ("loop", n.id)
            if key not in level["children"]:
                level["children"][key] = {"loop": n, "items": [], "children": {}}
                level["items"].append(("block", key))
            level["children"][key]["items"].insert(0, ("node", n))
            continue
        level["items"].append(("node", n))

    counter = iter(range(1 << 30))

    def emit(level: dict, indent: str) -> None:
        for what, item in level["items"]:
            if what == "node":
                lines.append(f"{indent}{_q(item.id)} [label={_q(label(item))}, {STYLE[item.kind]}];")
                continue
            block = level["children"][item]
            if "loop" in block:
                loop = block["loop"]
                lines.append(f"{indent}subgraph cluster_{next(counter)} {{")
                lines.append(f'{indent}  label={_q(f"loop {loop.id}: {loop.op.label()}")}; style="rounded,dashed"; '
                             'color="#b02a37";')
                emit(block, indent + "  ")
                lines.append(f"{indent}}}")
                continue
            f = block["frame"]
            lines.append(f"{indent}subgraph cluster_{next(counter)} {{")
            lines.append(f'{indent}  label={_q(f"repeat {f.var} × {f.count}")}; style=dashed; color="#888888";')
            for value, sub in block["iters"].items():
                lines.append(f"{indent}  subgraph cluster_{next(counter)} {{")
                lines.append(f'{indent}    label={_q(f"{f.var} = {value}")}; style=dotted;')
                emit(sub, indent + "    ")
                lines.append(f"{indent}  }}")
            lines.append(f"{indent}}}")

    emit(tree, "  ")
    for u, v in plan.edges:
        style = f" [{PROGRAMMATIC_EDGE}]" if plan.edge_kind(u, v) == "programmatic" else ""
        lines.append(f"  {_q(u)} -> {_q(v)}{style};")
    for loop in plan.loops:
        body = set(loop.op.body)
        has_pred = {v for u, v in plan.edges if v in body}
        has_succ = {u for u, v in plan.edges if u in body}
        for m in loop.op.body:
            if m not in has_pred:
                lines.append(f"  {_q(loop.id)} -> {_q(m)} [{LOOP_EDGE}];")
            if m not in has_succ:
                lines.append(f"  {_q(m)} -> {_q(loop.id)} [{LOOP_BACK}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(dot_text: str, fmt: str) -> bytes:
    """SVG or PNG through Graphviz's ``dot``; a clear error when it is not installed."""
    exe = shutil.which("dot")
    if exe is None:
        raise DagbuildError(f"--format {fmt} needs Graphviz's `dot` program, which is not on PATH "
                            "(Debian/Ubuntu: apt-get install graphviz); --format dot needs nothing")
    proc = subprocess.run([exe, f"-T{fmt}"], input=dot_text.encode(), capture_output=True, check=False)
    if proc.returncode != 0:
        raise DagbuildError(f"Graphviz dot failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout
