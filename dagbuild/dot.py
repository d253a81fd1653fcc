"""DOT text of a validated plan: the reduced DAG, shaped and coloured by node kind, repeats as clusters,
programmatic edges drawn bold and coloured; labels show bound views (``act[0]``, not ``act[layers % 2]``)."""

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
}


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
    for n in plan.nodes:
        level = tree
        for f in n.repeats:
            block = level["children"].get(f.block)
            if block is None:
                block = level["children"][f.block] = {"frame": f, "iters": {}}
                level["items"].append(("block", f.block))
            level = block["iters"].setdefault(f.value, {"items": [], "children": {}})
        level["items"].append(("node", n))

    counter = iter(range(1 << 30))

    def emit(level: dict, indent: str) -> None:
        for what, item in level["items"]:
            if what == "node":
                lines.append(f"{indent}{_q(item.id)} [label={_q(label(item))}, {STYLE[item.kind]}];")
                continue
            block = level["children"][item]
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
