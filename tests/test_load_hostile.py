"""Hostile and malformed spec text: every one ends quickly in a SpecError with a clear issue, never a hang, a
traceback, a RecursionError or a MemoryError. Each runs with libyaml and with PyYAML's pure-Python parser."""

from __future__ import annotations

import textwrap
import time

import pytest
import yaml
from conftest import SPECS

from dagbuild import load
from dagbuild.errors import SpecError
from dagbuild.load import (
    MAX_SPEC_BYTES,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    _compose,
    from_dict,
    load_spec,
    parse_spec,
)
from dagbuild.plan import plan

FAST_S = 2.0  # "does not hang": typical times are a few milliseconds


@pytest.fixture(params=["libyaml", "python"], autouse=True)
def loader(request, monkeypatch):
    if request.param == "libyaml":
        if not getattr(yaml, "__with_libyaml__", False):
            pytest.skip("PyYAML was built without libyaml")
        monkeypatch.setattr(load, "_Loader", yaml.CSafeLoader)
    else:
        monkeypatch.setattr(load, "_Loader", yaml.SafeLoader)
    return request.param


def refused(text, code: str = "yaml", **kwargs):
    """The single issue of parsing ``text``, checked to come fast and with ``code``."""
    t0 = time.perf_counter()
    with pytest.raises(SpecError) as info:
        parse_spec(text, **kwargs)
    assert time.perf_counter() - t0 < FAST_S
    (issue,) = info.value.issues
    assert issue.code == code, issue
    return issue


def bomb(levels: int = 9) -> str:
    names = "abcdefghijklmnop"[:levels]
    text = f"{names[0]}: &{names[0]} [x, x, x, x, x, x, x, x, x]\n"
    for prev, name in zip(names, names[1:], strict=False):
        text += f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]\n"
    return text


# --- aliases ---------------------------------------------------------------------------------------------------------


def test_alias_bomb_is_refused_fast():
    text = bomb()
    assert len(text) < 1200
    issue = refused(text)
    assert "expands to more than" in issue.message and f"{MAX_YAML_NODES:,} nodes through aliases" in issue.message
    assert issue.line == 7  # the first alias that pushes the document past the limit


def test_alias_bomb_in_a_file_is_refused_fast(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text("dagbuild: 1\nname: bomb\n" + bomb())
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match="through aliases"):
        load_spec(path)
    assert time.perf_counter() - t0 < FAST_S


def test_aliases_below_the_limit_are_shared_not_expanded():
    data, lines, duplicates = _compose(bomb(6))  # 9**6 = 531,441 leaves, 6 small lists in memory
    assert data["f"][0] is data["f"][1] and data["f"][0][0] is data["e"][0]
    assert len(lines) < 20 and not duplicates


def test_many_plain_nodes_count_too(monkeypatch):
    monkeypatch.setattr(load, "MAX_YAML_NODES", 1000)
    issue = refused("[" + ", ".join(["1"] * 2000) + "]")
    assert "has more than 1,000 nodes" in issue.message


@pytest.mark.parametrize("text", ["a: &a [*a]\n", "a: &a {b: [1, {c: *a}]}\n", "- &x\n  - 1\n  - *x\n"])
def test_recursive_alias(text):
    issue = refused(text)
    assert "recursive alias" in issue.message and issue.line is not None


def test_alias_use_gets_its_own_line():
    text = "dagbuild: 1\nname: t\nnodes:\n  - &n {id: a, empty: {}}\n  - *n\n"
    with pytest.raises(SpecError) as info:
        plan(parse_spec(text))
    (issue,) = info.value.issues
    assert issue.code == "duplicate_id" and issue.line == 5


@pytest.mark.parametrize("text, what", [("a: *nope\n", "undefined alias"),
                                        ("a: &x 1\nb: &x 2\n", "duplicate anchor &x"),
                                        ("a: &x [1]\nb: {*x : 1}\n", "cannot be a mapping key")])
def test_bad_aliases_and_anchors(text, what):
    assert what in refused(text).message


def test_merge_keys_still_work_and_are_no_duplicates():
    text = textwrap.dedent("""\
        dagbuild: 1
        name: merged
        dims: {n: 64}
        kernels:
          k:
            code: 'extern "C" __global__ void k(float* x, int n) {}'
            entry: k
            params: [f32* x, i32 n]
        buffers:
          x: {dtype: f32, shape: [n]}
        defaults: &launch {kernel: k, grid: [1], block: [64], args: {x: x, n: n}}
        nodes:
          - {<<: *launch, id: a}
          - <<: *launch
            id: b
            block: [32]
        """)
    data, _, duplicates = _compose(text)
    assert not duplicates
    assert data["nodes"][1] == {"kernel": "k", "grid": [1], "block": [32], "args": {"x": "x", "n": "n"}, "id": "b"}
    data.pop("defaults")
    p = plan(from_dict(data))
    assert [n.op.block for n in p.nodes] == [(64, 1, 1), (32, 1, 1)]


# --- duplicate keys --------------------------------------------------------------------------------------------------


def test_duplicate_key_in_a_node_names_key_and_both_lines():
    text = textwrap.dedent("""\
        dagbuild: 1
        name: t
        nodes:
          - id: a
            kernel: k
            block: [256]
            grid: [1]
            block: [1]
        """)
    issue = refused(text)
    assert "duplicate key 'block'" in issue.message and "lines 6 and 8" in issue.message
    assert issue.nodes == ("a",) and issue.line == 8 and issue.field == "nodes[0].block"


def test_every_duplicate_key_is_reported():
    text = "dagbuild: 1\nname: a\nname: b\ndims: {n: 1, n: 2}\n"
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    assert info.value.codes == ["yaml", "yaml"]
    first, second = info.value.issues
    assert "'name'" in first.message and "lines 2 and 3" in first.message
    assert "'n'" in second.message and "dims" in second.message and second.line == 4


def test_keys_equal_after_resolution_are_duplicates():
    assert "duplicate key 1" in refused("dims: {1: 2, 0x1: 3}\n").message


# --- encoding, size ------------------------------------------------------------------------------------------------


def test_non_utf8_file_names_the_byte_offset(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("dagbuild: 1\nname: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    (issue,) = info.value.issues
    assert issue.code == "yaml" and "not UTF-8" in issue.message and "0xe9 at offset 21" in issue.message
    assert issue.line == 2


def test_utf8_with_bom_reads(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + (SPECS / "diamond.yaml").read_bytes())
    assert load_spec(path) == load_spec(SPECS / "diamond.yaml")


def test_bytes_and_lone_surrogates():
    assert parse_spec(b"dagbuild: 1\nname: t\n").name == "t"
    assert "not UTF-8" in refused(b"name: \xff\n").message
    message = refused("dagbuild: 1\nname: \udcff\n").message  # libyaml needs UTF-8; PyYAML's reader refuses it
    assert "not valid Unicode" in message or "unacceptable character #xdcff" in message


def test_file_over_the_size_limit_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.yaml"
    with path.open("wb") as f:  # sparse: nothing is written, and nothing may be read
        f.truncate(MAX_SPEC_BYTES + 1)
    t0 = time.perf_counter()
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert time.perf_counter() - t0 < FAST_S
    (issue,) = info.value.issues
    assert issue.code == "yaml" and "larger than 67,108,864 bytes (64 MiB" in issue.message


def test_size_limit_also_holds_for_files_that_report_no_size(tmp_path, monkeypatch):
    monkeypatch.setattr(load, "MAX_SPEC_BYTES", 1000)
    with pytest.raises(SpecError, match="larger than 1,000 bytes"):
        load_spec("/dev/zero") if __import__("os").path.exists("/dev/zero") else pytest.skip("no /dev/zero")


def test_text_over_the_size_limit(monkeypatch):
    monkeypatch.setattr(load, "MAX_SPEC_BYTES", 100)
    assert "at most 100 bytes" in refused("dagbuild: 1\nname: t\n# " + "x" * 200 + "\n").message


def test_unreadable_spec_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot read spec"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError, match="cannot read spec"):
        load_spec(tmp_path)


# --- nesting ---------------------------------------------------------------------------------------------------------


def nested_repeats(depth: int) -> str:
    text, pad = "dagbuild: 1\nname: deep\nnodes:\n", "  "
    for i in range(depth):
        text += f"{pad}- repeat: {{var: v{i}, count: 1}}\n{pad}  nodes:\n"
        pad += "    "
    ids = ".".join(f"{{v{i}}}" for i in range(depth))
    return text + f'{pad}- {{id: "e.{ids}", empty: {{}}}}\n'


@pytest.mark.parametrize("text", [nested_repeats(300), "[" * 300 + "]" * 300, "[" * 5000 + "]" * 5000,
                                  "a:\n" + "".join(" " * i + "- \n" for i in range(1, 400))])
def test_deep_nesting_is_refused(text):
    issue = refused(text)
    assert f"nested deeper than {MAX_YAML_DEPTH} levels" in issue.message


def test_deep_nesting_through_an_alias():
    text = "a: &a " + "[" * 60 + "]" * 60 + "\nb: " + "[" * 60 + "*a" + "]" * 60 + "\n"
    assert "nested deeper than" in refused(text).message


def test_nesting_within_the_limit_loads_and_plans():
    p = plan(parse_spec(nested_repeats(40)))
    assert [n.id for n in p.nodes] == ["e." + ".".join(["0"] * 40)]


# --- odd YAML --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, what", [
    ("a: !foo 1\n", "unsupported tag '!foo'"),
    ("a: !!python/object/apply:os.system ['true']\n", "unsupported tag"),
    ("a: !!set {x, y}\n", "unsupported tag"),
    ("a: 1\n---\nb: 2\n", "single document"),
    ("? [a]\n: 1\n", "must be a scalar"),
    ("n: " + "9" * 5000 + "\n", "as int"),
    ("dagbuild: 1\nname: [oops\n", "<string>"),
])
def test_odd_yaml_is_a_yaml_issue(text, what):
    issue = refused(text)
    assert what in issue.message and issue.line is not None


@pytest.mark.parametrize("text, data", [
    ("", None), ("# nothing\n", None), ("a: 1\nb: [x, 'y', 2.5, .inf, ~, yes, 0x1F, 1_000]\n",
                                         {"a": 1, "b": ["x", "y", 2.5, float("inf"), None, True, 31, 1000]}),
    ("x: !!str 12\ny: !!int '12'\n", {"x": "12", "y": 12}), ("plain\n", "plain"),
])
def test_data_matches_pyyaml(text, data):
    assert _compose(text)[0] == data == yaml.safe_load(text)


def test_shipped_specs_read_like_pyyaml():
    for path in sorted(SPECS.glob("**/*.yaml")):
        text = path.read_text()
        assert _compose(text)[0] == yaml.safe_load(text), path.name


# --- errors that must never escape ----------------------------------------------------------------------------------


@pytest.mark.parametrize("exc, what", [(MemoryError, "out of memory"), (RecursionError, "nested deeper")])
def test_memory_and_recursion_errors_become_issues(monkeypatch, exc, what):
    def boom(text):
        raise exc()

    monkeypatch.setattr(load, "_compose", boom)
    assert what in refused("dagbuild: 1\nname: t\n").message


def test_memory_error_in_validation_becomes_an_issue(monkeypatch):
    def boom(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(load.GraphSpec, "model_validate", boom)
    assert "out of memory" in refused("dagbuild: 1\nname: t\n").message


def test_cyclic_data_from_python_is_a_schema_issue():
    data = {"dagbuild": 1, "name": "t", "nodes": []}
    data["nodes"].append(data)
    with pytest.raises(SpecError) as info:
        from_dict(data)
    assert info.value.codes == ["schema"]


# --- schema messages -------------------------------------------------------------------------------------------------


def test_value_error_prefix_is_stripped():
    issue = refused("dagbuild: 1\nname: t\nkernels:\n  k: {entry: k, params: []}\n", code="schema")
    assert "Value error" not in issue.message and issue.message.startswith("kernels.k: give exactly one of")


@pytest.mark.parametrize("section, body", [("dims", "3"), ("types", "f32"),
                                           ("buffers", "{dtype: f32, shape: [4]}"),
                                           ("kernels", "{code: 'x', entry: k, params: []}")])
@pytest.mark.parametrize("name", ["данные", "1x"])
def test_bad_names_get_the_line_of_their_key(section, body, name):
    text = f"dagbuild: 1\nname: t\n{section}:\n  ok: {body}\n  {name}: {body}\n"
    issue = refused(text, code="schema")
    assert repr(name) in issue.message and issue.line == 5 and issue.field == f"{section}.{name}"


@pytest.mark.parametrize("node", ["{id: 7, empty: {}}", "{id: a, empty: {}, after: [b, 2]}"])
def test_numeric_id_or_after_expects_a_string(node):
    issue = refused(f"dagbuild: 1\nname: t\nnodes:\n  - {{id: b, empty: {{}}}}\n  - {node}\n", code="schema")
    assert "expected a string" in issue.message and "expression" not in issue.message and issue.line == 5


def test_memset_value_must_be_a_plain_number():
    text = "dagbuild: 1\nname: t\nnodes:\n  - id: z\n    memset: {dst: x, value: 'n + 1'}\n"
    issue = refused(text, code="schema")
    assert "memset values are plain numbers (no expressions)" in issue.message and issue.nodes == ("z",)
    assert issue.line == 5


def test_grid_entries_still_take_expressions():
    text = "dagbuild: 1\nname: t\nnodes:\n  - {id: k, kernel: k, grid: [[1]], block: [1]}\n"
    assert "expected a number or an expression string" in refused(text, code="schema").message


# --- scale -----------------------------------------------------------------------------------------------------------


def test_twenty_thousand_nodes_load_quickly(loader):
    text = "dagbuild: 1\nname: big\nnodes:\n" + "".join(f"  - {{id: e{i}, empty: {{}}}}\n" for i in range(20_000))
    t0 = time.perf_counter()
    spec = parse_spec(text)
    # ~0.2 s with libyaml, ~1.6 s with pure-Python PyYAML: a hang guard, not a benchmark
    assert time.perf_counter() - t0 < (5.0 if loader == "libyaml" else 30.0)
    assert len(spec.nodes) == 20_000 and spec.line_of(("nodes", 19_999, "id")) == 20_003
