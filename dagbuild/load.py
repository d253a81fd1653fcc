"""YAML ⇄ GraphSpec. Errors become Issues with the YAML line of the field at fault."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import Issue, SpecError
from .spec import GraphSpec

_UNION_TAGS = {"int", "float", "str", "bool", "dict", "list"}
_NODE_TAGS = {"kernel", "memcpy", "memset", "empty", "repeat"}


def _line_map(node: yaml.Node, path: tuple = (), out: dict | None = None,
              active: frozenset = frozenset()) -> dict[tuple, int]:
    """Map each key path of a composed YAML document to its 1-based line."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if id(node) in active:  # a recursive alias (`&a [*a]`): schema validation reports it
        return out
    active = active | {id(node)}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = (*path, key.value)
            out[sub] = key.start_mark.line + 1
            _line_map(value, sub, out, active)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, (*path, i), out, active)
    return out


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's union tags from an error location, leaving the YAML key path."""
    out: list = []
    for i, part in enumerate(loc):
        prev = loc[i - 1] if i else None
        if isinstance(prev, int) and part in _NODE_TAGS and i >= 2 and out and _in_nodes(out):
            continue  # the discriminator tag right after a node's list index
        if isinstance(part, str) and (part in _UNION_TAGS or part.startswith(("function-", "constrained-"))):
            continue
        out.append(part)
    return tuple(out)


def _in_nodes(path: list) -> bool:
    return len(path) >= 2 and path[-2] == "nodes" and isinstance(path[-1], int)


def _loc_text(loc: tuple) -> str:
    text = ""
    for p in loc:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text or "(top level)"


def schema_issues(err: ValidationError, data: Any, lines: dict[tuple, int]) -> list[Issue]:
    """Turn pydantic's errors into ``schema`` issues, one per field, naming node ids."""
    seen: dict[tuple, list[str]] = {}
    for e in err.errors():
        loc = _clean_loc(tuple(e["loc"]))
        msg = e["msg"]
        if e["type"] in ("int_type", "float_type", "string_type") and len(e["loc"]) > len(loc):
            msg = "expected a number or an expression string"
        if e["type"] == "literal_error" and loc == ("dagbuild",):
            msg = f"unsupported format version {e.get('input')!r}; this dagbuild reads version 1"
        if e["type"] == "extra_forbidden":
            msg = f"unknown key {loc[-1]!r}"
        if e["type"] == "missing":
            msg = f"missing key {loc[-1]!r}"
        msgs = seen.setdefault(loc, [])
        if msg not in msgs:
            msgs.append(msg)
    issues = []
    for loc, msgs in seen.items():
        node_id = _node_id_at(data, loc)
        field = _loc_text(loc)
        where = f"node {node_id!r}: " if node_id else ""
        issues.append(Issue("schema", f"{where}{field}: {'; '.join(msgs)}",
                            nodes=(node_id,) if node_id else (), field=field,
                            buffer=loc[1] if len(loc) > 1 and loc[0] == "buffers" else None,
                            line=_line_for(lines, loc)))
    return issues


def _node_id_at(data: Any, loc: tuple) -> str | None:
    """The id of the innermost node on ``loc`` (works through nested repeat blocks)."""
    found, cur = None, data
    for part in loc:
        try:
            cur = cur[part]
        except (KeyError, IndexError, TypeError):
            break
        if isinstance(cur, dict) and isinstance(cur.get("id"), str) and isinstance(part, int):
            found = cur["id"]
    return found


def _line_for(lines: dict[tuple, int], loc: tuple) -> int | None:
    for n in range(len(loc), -1, -1):
        if tuple(loc[:n]) in lines:
            return lines[tuple(loc[:n])]
    return None


def parse_spec(text: str, base_dir: Path | str | None = None, source: str = "<string>") -> GraphSpec:
    """Parse YAML text into a GraphSpec; raises SpecError (``yaml`` or ``schema`` issues)."""
    try:
        doc = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise SpecError(Issue("yaml", f"{source}: {e}", line=line)) from None
    if not isinstance(data, dict):
        raise SpecError(Issue("schema", f"{source}: the top level must be a mapping with "
                              "`dagbuild: 1`, `name`, `kernels`, `buffers` and `nodes`", line=1))
    lines = _line_map(doc) if doc is not None else {}
    try:
        spec = GraphSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(schema_issues(e, data, lines)) from None
    spec.with_base_dir(base_dir)
    spec._lines = lines
    return spec


def load_spec(path: Path | str) -> GraphSpec:
    """Read a YAML spec file. Relative kernel sources resolve against its folder."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise FileNotFoundError(f"cannot read spec {path}: {e.strerror}") from None
    return parse_spec(text, base_dir=path.resolve().parent, source=str(path))


def from_dict(data: dict, base_dir: Path | str | None = None) -> GraphSpec:
    """A GraphSpec from plain data (as YAML would give), with schema issues on error."""
    try:
        spec = GraphSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(schema_issues(e, data, {})) from None
    return spec.with_base_dir(base_dir)


class _Dumper(yaml.SafeDumper):
    pass


def _flow_small(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(x, int | float | str) and not (isinstance(x, str) and "\n" in x) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(list, _flow_small)
_Dumper.add_representer(str, _str)


def dump_yaml(spec: GraphSpec) -> str:
    """YAML text that :func:`parse_spec` reads back to an equal GraphSpec."""
    data = spec.to_dict()
    order = ["dagbuild", "name", "dims", "types", "deps", "kernels", "buffers", "nodes"]
    data = {k: data[k] for k in order if k in data}
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=100)
