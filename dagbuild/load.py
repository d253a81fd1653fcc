"""YAML ⇄ GraphSpec. Errors become Issues with the YAML line of the field at fault.

Specs are untrusted input, so reading one is bounded (each limit is checked before the work it bounds):

- a spec file may be at most :data:`MAX_SPEC_BYTES` (64 MiB); the size is checked before the file is read;
- the document may expand to at most :data:`MAX_YAML_NODES` (4,000,000) nodes, every scalar, sequence and
  mapping counted, keys included, and each use of an alias counted as the whole node it names (an "alias
  bomb" of nine levels of nine aliases is ~1 KB of text but 387,420,489 nodes);
- collections may nest at most :data:`MAX_YAML_DEPTH` (100) levels deep (a ``repeat`` block costs two);
- an alias may not refer to a node that contains it (``&a [*a]``), and no mapping may repeat a key.

The text is parsed once, by libyaml where PyYAML has it: one pass over the parser's events builds the
data, the line map and the checks above together, so an alias is never expanded (aliased content is
shared, as PyYAML's constructor shares it) and nothing recurses on the Python stack.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import Issue, SpecError
from .spec import MAX_NODES, GraphSpec
from .util import paused_gc

#: Largest spec file :func:`load_spec` reads (bytes); checked before reading.
MAX_SPEC_BYTES = 64 * 2**20
#: Most YAML nodes a document may expand to through aliases (scalars, sequences and mappings, keys included).
MAX_YAML_NODES = 4_000_000
#: Deepest nesting of sequences and mappings in a document.
MAX_YAML_DEPTH = 100

_Loader = yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader

_UNION_TAGS = {"int", "float", "str", "bool", "dict", "list"}
_EXPR_TAGS = {"int", "float", "str"}
_NODE_TAGS = {"kernel", "memcpy", "memset", "empty", "child", "repeat", "loop"}
_NAMED_SECTIONS = ("dims", "consts", "types", "buffers", "kernels")

_T = "tag:yaml.org,2002:"
_STR, _SEQ, _MAP, _MERGE = _T + "str", _T + "seq", _T + "map", _T + "merge"
_SCALAR_TAGS = {_T + t for t in ("null", "bool", "int", "float", "binary", "timestamp")}


class _Refused(Exception):
    """A document dagbuild will not read; becomes one Issue (``yaml`` unless said otherwise)."""

    def __init__(self, message: str, line: int | None, code: str = "yaml"):
        super().__init__(message)
        self.message, self.line, self.code = message, line, code


class _Frame:
    """An open sequence or mapping while its events arrive."""

    __slots__ = ("is_map", "value", "path", "line", "anchor", "start_total", "height", "key", "key_line", "keys",
                 "merges")

    def __init__(self, is_map: bool, path: tuple, line: int, anchor: str | None, start_total: int):
        self.is_map, self.path, self.line, self.anchor, self.start_total = is_map, path, line, anchor, start_total
        self.value: Any = {} if is_map else []
        self.height = 1
        self.key: Any = _NO_KEY  # mappings: the key whose value comes next, and its line
        self.key_line = line
        self.keys: dict = {}  # mappings: key -> line of its first occurrence
        self.merges: list | None = None


_NO_KEY = object()
_MERGE_KEY = object()


def _line(event: Any) -> int | None:
    mark = getattr(event, "start_mark", None)
    return mark.line + 1 if mark is not None else None


def _compose(text: str) -> tuple[Any, dict[tuple, int], list[tuple]]:
    """Parse ``text`` once; return (data, line map, duplicate keys as (mapping path, key, first line, line)).
    Raises _Refused or yaml.YAMLError.

    The line map holds the 1-based line of each key path whose line differs from its parent's: a lookup
    takes the deepest known prefix (:meth:`GraphSpec.line_of`), so leaving out the entries that repeat
    their parent's line (every field of a one-line flow mapping) changes no answer.
    """
    loader = _Loader(text)
    try:
        return _Builder(loader).document()
    finally:
        loader.dispose()


class _Builder:
    def __init__(self, loader: Any):
        self.loader = loader
        self.lines: dict[tuple, int] = {}
        self.anchors: dict[str, tuple[Any, int, int]] = {}  # anchor -> (value, expanded size, height)
        self.open_anchors: set[str] = set()
        self.total = 0
        self.stack: list[_Frame] = []
        self.duplicates: list[tuple[tuple, Any, int, int]] = []  # (mapping path, key, first line, line)
        self.scalars: dict[tuple[str, str], Any] = {}

    # ---- the event loop ----------------------------------------------------------------------------
    def document(self) -> tuple[Any, dict[tuple, int], list[tuple]]:
        get = self.loader.get_event
        get()  # StreamStart
        ev = get()
        if isinstance(ev, yaml.StreamEndEvent):
            return None, {}, []
        root = self._node(get)
        get()  # DocumentEnd
        ev = get()
        if not isinstance(ev, yaml.StreamEndEvent):
            raise _Refused("expected a single document in the stream, but found another document", _line(ev))
        return root, self.lines, self.duplicates

    def _node(self, get: Any) -> Any:
        """Consume the events of the document's root node; return its data."""
        stack, lines = self.stack, self.lines
        scalar_ev, alias_ev = yaml.ScalarEvent, yaml.AliasEvent
        seq_start, map_start = yaml.SequenceStartEvent, yaml.MappingStartEvent
        result: list = []
        plain_tags: dict[str, str] = {}
        resolve = self.loader.resolve
        while True:
            ev = get()
            cls = ev.__class__
            top = stack[-1] if stack else None
            if cls is scalar_ev:
                self.total += 1
                if self.total > MAX_YAML_NODES:
                    self._too_many(ev)
                tag, value = ev.tag, ev.value
                if tag is None and ev.implicit[0]:  # a plain scalar: its tag follows from its text
                    tag = plain_tags.get(value)
                    if tag is None:
                        tag = plain_tags[value] = resolve(yaml.ScalarNode, value, (True, False))
                elif tag is None or (tag == "!" and not ev.implicit[0]):
                    tag = _STR
                elif tag == "!":
                    tag = resolve(yaml.ScalarNode, value, ev.implicit)
                if tag != _STR:
                    value = self._scalar(ev, tag)
                if ev.anchor is not None:
                    self._anchor(ev.anchor, ev, (value, 1, 0))
                if top is None:
                    self._attach(top, value, 0, ev.start_mark.line + 1, result)
                elif top.is_map:
                    key = top.key
                    if key is _NO_KEY:
                        self._key(top, value, ev, is_merge=tag == _MERGE)
                    elif key is _MERGE_KEY:
                        self._attach(top, value, 0, ev.start_mark.line + 1, result)
                    else:
                        top.value[key] = value
                        top.key = _NO_KEY
                    continue
                else:
                    line = ev.start_mark.line + 1
                    if line != top.line:
                        lines[(*top.path, len(top.value))] = line
                    top.value.append(value)
                    continue
            elif cls is alias_ev:
                anchor = ev.anchor
                if anchor in self.open_anchors:
                    raise _Refused(f"recursive alias *{anchor}: it refers to a node that contains it", _line(ev))
                found = self.anchors.get(anchor)
                if found is None:
                    raise _Refused(f"found undefined alias *{anchor}", _line(ev))
                value, size, height = found
                self.total += size
                if self.total > MAX_YAML_NODES:
                    self._too_many(ev)
                if len(stack) + height > MAX_YAML_DEPTH:
                    self._too_deep(ev)
                if top is not None and top.is_map and top.key is _NO_KEY:
                    if isinstance(value, list | dict):
                        raise _Refused(f"alias *{anchor} names a collection, which cannot be a mapping key",
                                       _line(ev))
                    self._key(top, value, ev, is_merge=False)
                    continue
                self._attach(top, value, height, _line(ev), result)
            elif cls is seq_start or cls is map_start:
                self.total += 1
                if self.total > MAX_YAML_NODES:
                    self._too_many(ev)
                if len(stack) + 1 > MAX_YAML_DEPTH:
                    self._too_deep(ev)
                if ev.tag not in (None, "!", _SEQ if cls is seq_start else _MAP):
                    raise _Refused(f"unsupported tag {ev.tag!r} (a spec holds plain mappings, sequences and "
                                   "scalars)", _line(ev))
                line = _line(ev)
                if top is None:
                    path = ()
                    lines[path] = line
                elif top.is_map:
                    if top.key is _NO_KEY:
                        raise _Refused("a mapping key must be a scalar, not a sequence or mapping", line)
                    path = top.path if top.key is _MERGE_KEY else (*top.path, top.key)
                    line = top.key_line
                else:
                    path = (*top.path, len(top.value))
                    if line != top.line:
                        lines[path] = line
                    if path[0] == "nodes" and len(path) == 2 and path[1] >= MAX_NODES:  # stop reading at once
                        raise _Refused(f"more than {MAX_NODES} nodes, the documented limit; split the graph",
                                       line, code="size_limit")
                if ev.anchor is not None:
                    if ev.anchor in self.anchors or ev.anchor in self.open_anchors:
                        raise _Refused(f"found duplicate anchor &{ev.anchor}", line)
                    self.open_anchors.add(ev.anchor)
                stack.append(_Frame(cls is map_start, path, line, ev.anchor, self.total - 1))
            elif cls is yaml.SequenceEndEvent or cls is yaml.MappingEndEvent:
                frame = stack.pop()
                value = frame.value
                if frame.merges is not None:
                    merged: dict = {}
                    for m in reversed(frame.merges):  # earlier merged mappings win over later ones
                        merged.update(m)
                    merged.update(value)  # and the mapping's own keys over all of them
                    value = merged
                if frame.anchor is not None:
                    self.open_anchors.discard(frame.anchor)
                    self._anchor(frame.anchor, ev, (value, self.total - frame.start_total, frame.height))
                self._attach(stack[-1] if stack else None, value, frame.height, None, result)
            else:  # pragma: no cover - a well-formed parser sends nothing else inside a document
                raise _Refused(f"unexpected YAML event {cls.__name__}", _line(ev))
            if not stack and result:
                return result[0]

    def _attach(self, top: _Frame | None, value: Any, height: int, line: int | None, result: list) -> None:
        """Put a finished value into its parent (``line``: its start, for sequence items not yet recorded)."""
        if top is None:
            result.append(value)
            if line is not None:
                self.lines[()] = line
            return
        if height + 1 > top.height:
            top.height = height + 1
        if top.is_map:
            key = top.key
            top.key = _NO_KEY
            if key is _MERGE_KEY:
                self._merge(top, value, line)
            else:
                top.value[key] = value
            return
        if line is not None and line != top.line:
            self.lines[(*top.path, len(top.value))] = line
        top.value.append(value)

    def _key(self, top: _Frame, key: Any, ev: Any, is_merge: bool) -> None:
        line = _line(ev)
        top.key_line = line
        if is_merge:
            top.key = _MERGE_KEY
            return
        try:
            first = top.keys.get(key)
        except TypeError:  # an unhashable scalar (never from the safe scalar tags, but be sure)
            raise _Refused(f"mapping key {key!r} is not hashable", line) from None
        if first is not None:
            self.duplicates.append((top.path, key, first, line))
        else:
            top.keys[key] = line
            if line != top.line:
                self.lines[(*top.path, key)] = line
        top.key = key

    def _merge(self, top: _Frame, value: Any, line: int | None) -> None:
        sources = value if isinstance(value, list) else [value]
        if not all(isinstance(m, dict) for m in sources):
            raise _Refused("a merge key (<<) takes a mapping or a list of mappings", line or top.line)
        if top.merges is None:
            top.merges = []
        top.merges.extend(sources)

    def _anchor(self, anchor: str, ev: Any, entry: tuple[Any, int, int]) -> None:
        if anchor in self.anchors:
            raise _Refused(f"found duplicate anchor &{anchor}", _line(ev))
        self.anchors[anchor] = entry

    def _scalar(self, ev: Any, tag: str) -> Any:
        """A scalar whose (resolved) tag is not str: null, bool, int, float, timestamp or binary."""
        value = ev.value
        cached = self.scalars.get((tag, value), _NO_KEY)
        if cached is not _NO_KEY:
            return cached
        if tag not in _SCALAR_TAGS:
            if tag == _MERGE:
                return value  # `<<` as a key is handled by the caller; elsewhere it is just text
            raise _Refused(f"unsupported tag {tag!r} (a spec holds plain mappings, sequences and scalars)",
                           _line(ev))
        node = yaml.ScalarNode(tag, value, ev.start_mark, ev.end_mark)
        try:
            out = self.loader.yaml_constructors[tag](self.loader, node)
        except (ValueError, OverflowError, TypeError) as e:
            raise _Refused(f"cannot read {value[:40]!r} as {tag.rsplit(':', 1)[-1]}: {e}", _line(ev)) from None
        self.scalars[(tag, value)] = out
        return out

    def _too_many(self, ev: Any) -> None:
        how = "expands to more than {:,} nodes through aliases" if isinstance(ev, yaml.AliasEvent) else \
            "has more than {:,} nodes"
        raise _Refused(f"the document {how.format(MAX_YAML_NODES)} (the limit: dagbuild.load.MAX_YAML_NODES)",
                       _line(ev))

    def _too_deep(self, ev: Any) -> None:
        raise _Refused(f"the document is nested deeper than {MAX_YAML_DEPTH} levels", _line(ev))




# ---- schema errors ---------------------------------------------------------------------------------------


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


def _named_loc(msg: str, data: Any) -> tuple:
    """The (section, name) a top-level message is about ("dims name 'x-y' is not ..."), else ()."""
    if not isinstance(data, dict):
        return ()
    loose = []
    for section in _NAMED_SECTIONS:
        names = data.get(section)
        if not isinstance(names, dict):
            continue
        for name in names:
            if f"{section} name {name!r}" in msg:
                return (section, name)
            if repr(name) in msg and section in msg:
                loose.append((section, name))
    return loose[0] if len(loose) == 1 else ()


def _message(e: dict, loc: tuple) -> str:
    raw = tuple(e["loc"])
    kind, msg = e["type"], e["msg"]
    if kind == "value_error" and msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if loc[-2:] == ("memset", "value") and kind in ("int_type", "float_type", "string_type"):
        return f"memset values are plain numbers (no expressions), got {e.get('input')!r}"
    if kind in ("int_type", "float_type", "string_type") and raw and raw[-1] in _EXPR_TAGS:
        return "expected a number or an expression string"
    if kind == "string_type":
        got = e.get("input")
        hint = f' (quote it: "{got}")' if isinstance(got, int | float | bool) else ""
        return f"expected a string, got {got!r}{hint}"
    if kind == "literal_error" and loc == ("dagbuild",):
        return f"unsupported format version {e.get('input')!r}; this dagbuild reads version 1"
    if kind == "extra_forbidden":
        return f"unknown key {loc[-1]!r}"
    if kind == "missing":
        return f"missing key {loc[-1]!r}"
    return msg


def schema_issues(err: ValidationError, data: Any, lines: dict[tuple, int]) -> list[Issue]:
    """Turn pydantic's errors into ``schema`` issues, one per field, naming node ids."""
    seen: dict[tuple, list[str]] = {}
    for e in err.errors():
        loc = _clean_loc(tuple(e["loc"]))
        msg = _message(e, loc)
        if not loc or (len(loc) == 1 and loc[0] in _NAMED_SECTIONS):  # a name check: point at the name's key
            loc = _named_loc(msg, data) or loc
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


# ---- reading ---------------------------------------------------------------------------------------------


def _yaml_issue(source: str, e: yaml.YAMLError) -> Issue:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    line = mark.line + 1 if mark is not None else None
    text = str(e)
    if "maximum nesting depth" in text:  # libyaml's own limit (1000), for documents past ours
        return Issue("yaml", f"{source}: the document is nested deeper than {MAX_YAML_DEPTH} levels", line=line)
    return Issue("yaml", f"{source}: {text}", line=line)


def _duplicate_issue(source: str, data: Any, path: tuple, key: Any, first: int, line: int) -> Issue:
    node_id = _node_id_at(data, path)
    where = f"node {node_id!r}, " if node_id else ""
    return Issue("yaml", f"{source}: {where}{_loc_text(path)}: duplicate key {key!r} (lines {first} and {line}); "
                 "give each key once", nodes=(node_id,) if node_id else (), field=_loc_text((*path, key)),
                 line=line)


def _validate(data: Any, lines: dict[tuple, int], source: str) -> GraphSpec:
    if not isinstance(data, dict):
        raise SpecError(Issue("schema", f"{source}: the top level must be a mapping with "
                              "`dagbuild: 1`, `name`, `kernels`, `buffers` and `nodes`", line=1))
    nodes = data.get("nodes")
    if isinstance(nodes, list) and len(nodes) > MAX_NODES:  # before the (costly) schema check of each one
        raise SpecError(Issue("size_limit", f"{source}: {len(nodes)} nodes, more than the documented limit of "
                              f"{MAX_NODES}; split the graph", field="nodes", line=lines.get(("nodes",))))
    try:
        return GraphSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(schema_issues(e, data, lines)) from None


@contextlib.contextmanager
def _guarded(source: str) -> Iterator[None]:
    """No cyclic GC while reading (:func:`~dagbuild.util.paused_gc`); RecursionError and MemoryError become issues."""
    try:
        with paused_gc():
            yield
    except RecursionError:
        raise SpecError(Issue("yaml", f"{source}: the document is nested deeper than {MAX_YAML_DEPTH} "
                              "levels")) from None
    except MemoryError:
        raise SpecError(Issue("yaml", f"{source}: ran out of memory reading it")) from None


def _parse(text: str | bytes, source: str) -> tuple[Any, dict[tuple, int]]:
    """(data, line map) of YAML text, within the module's limits; SpecError with ``yaml`` issues."""
    if isinstance(text, bytes | bytearray):
        text = _decode(bytes(text), source)
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(Issue("yaml", f"{source}: the text is {len(text):,} characters long; dagbuild reads "
                              f"at most {_size_limit()}"))
    try:
        data, lines, duplicates = _compose(text)
    except _Refused as e:
        raise SpecError(Issue(e.code, f"{source}: {e.message}", line=e.line)) from None
    except yaml.YAMLError as e:
        raise SpecError(_yaml_issue(source, e)) from None
    except UnicodeError as e:  # a str with lone surrogates cannot be handed to libyaml
        raise SpecError(Issue("yaml", f"{source}: the text is not valid Unicode ({e.reason} at "
                              f"character {e.start})")) from None
    if duplicates:
        raise SpecError([_duplicate_issue(source, data, *d) for d in duplicates])
    return data, lines


def parse_spec(text: str | bytes, base_dir: Path | str | None = None, source: str = "<string>") -> GraphSpec:
    """Parse YAML text (str, or UTF-8 bytes) into a GraphSpec; raises SpecError (``yaml`` or ``schema``
    issues) for anything it cannot read, including input past the limits in this module's docstring."""
    with _guarded(source):
        data, lines = _parse(text, source)
        spec = _validate(data, lines, source)
    spec.with_base_dir(base_dir)
    spec._lines = lines
    return spec


def parse_yaml(text: str | bytes, source: str = "<string>") -> Any:
    """Plain data from YAML text, read like a spec (same limits and checks; SpecError with ``yaml`` issues).
    For other YAML inputs of dagbuild, such as ``--config`` files."""
    with _guarded(source):
        return _parse(text, source)[0]


def _size_limit() -> str:
    mib = f" ({MAX_SPEC_BYTES / 2**20:g} MiB)" if MAX_SPEC_BYTES >= 2**20 else ""
    return f"{MAX_SPEC_BYTES:,} bytes{mib}, dagbuild.load.MAX_SPEC_BYTES"


def _decode(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise SpecError(Issue("yaml", f"{source}: not UTF-8 text: byte 0x{raw[e.start]:02x} at offset "
                              f"{e.start} (line {line}) {e.reason}; save it as UTF-8",
                              line=line)) from None


def read_text(path: Path | str, what: str = "file") -> str:
    """A YAML file's text: at most :data:`MAX_SPEC_BYTES` (checked before reading), UTF-8. Raises
    FileNotFoundError when it cannot be read, SpecError (``yaml``) when too large or not UTF-8."""
    path = Path(path)
    too_big = SpecError(Issue("yaml", f"{path}: the {what} is larger than {_size_limit()}; dagbuild refuses it"))
    try:
        with path.open("rb") as f:
            try:
                size = path.stat().st_size
            except OSError:
                size = 0
            if size > MAX_SPEC_BYTES:
                raise too_big
            raw = f.read(MAX_SPEC_BYTES + 1)  # a pipe or device reports no size: read one byte past the limit
    except OSError as e:
        raise FileNotFoundError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise too_big
    return _decode(raw, str(path))


def load_spec(path: Path | str) -> GraphSpec:
    """Read a YAML spec file (UTF-8, at most :data:`MAX_SPEC_BYTES`). Relative kernel sources resolve
    against its folder. A file that cannot be read raises FileNotFoundError; a bad one SpecError."""
    path = Path(path)
    text = read_text(path, "spec")
    return parse_spec(text, base_dir=path.resolve().parent, source=str(path))


def from_dict(data: dict, base_dir: Path | str | None = None) -> GraphSpec:
    """A GraphSpec from plain data (as YAML would give), with schema issues on error."""
    try:
        with paused_gc():
            spec = _validate(data, {}, "<data>")
    except RecursionError:
        raise SpecError(Issue("schema", "the data is nested too deeply (or refers to itself)")) from None
    return spec.with_base_dir(base_dir)


# ---- writing ---------------------------------------------------------------------------------------------


def dump_yaml(spec: GraphSpec) -> str:
    """YAML text that :func:`parse_spec` reads back to an equal GraphSpec (``spec.to_yaml()``)."""
    return spec.to_yaml()

