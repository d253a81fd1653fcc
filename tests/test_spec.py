"""The spec format: parsing, GraphSpec equality and the to_yaml() round trip, the expression language,
param declarations, memset bit patterns and the JSON Schema."""

from __future__ import annotations

import json
import math
import struct
import textwrap

import pytest
import yaml
from conftest import SPECS

from dagbuild import expr
from dagbuild.bind import memset_bits, parse_param, resolve_view
from dagbuild.errors import SpecError
from dagbuild.ir import Param
from dagbuild.load import from_dict, load_spec, parse_spec
from dagbuild.plan import plan
from dagbuild.spec import EmptyNode, GraphSpec, KernelNode, MemcpyNode, MemsetNode, RepeatBlock

SHIPPED = sorted(SPECS.glob("*.yaml"))

RICH = textwrap.dedent("""\
    dagbuild: 1
    name: rich
    dims: {n: 128, layers: 3, heads: 2}
    types: {wt: bf16}
    deps: infer
    kernels:
      scale:
        source: ../kernels/basic.cu
        entry: scale
        params: [const f32* x, f32* y, f32 a, i32 n]
      mix:
        code: |
          extern "C" __global__ void mix(const void* w, float* y, int n) {
              // "quotes", {braces} and: colons
          }
        entry: mix
        params: [const wt* w, f32* y, i32 n]
        options: [-lineinfo, "--use_fast_math"]
    buffers:
      x: {dtype: f32, shape: [n]}
      y: {dtype: f32, shape: [layers, heads, n]}
      w: {dtype: wt, shape: [layers, n]}
      flags: {dtype: i8, shape: [n]}
      host: {dtype: f32, shape: ["n * 1"], memory: pinned}
    nodes:
      - {id: upload, memcpy: {dst: x, src: host}}
      - {id: zero, memset: {dst: y, value: 0}}
      - {id: neg, memset: {dst: flags, value: -1}}
      - {id: half, memset: {dst: "w[0]", value: 0.5}}
      - repeat: {var: l, count: layers}
        nodes:
          - repeat: {var: h, count: "heads"}
            nodes:
              - id: "s.{l}.{h}"
                kernel: scale
                grid: ["ceil_div(n, 64)", 1]
                block: [64]
                shared: "min(h, 1) * 256"
                args: {x: x, y: "y[l, h]", a: -1.5e-3, n: "n - h"}
          - id: "m.{l}"
            kernel: mix
            grid: [1]
            block: [128]
            args: {w: "w[l]", y: "y[l, 0]", n: n}
            after: ["s.{l}.1"]
      - {id: done, empty: {}, after: ["m.{layers - 1}"]}
      - {id: down, memcpy: {dst: host, src: x}, after: [done]}
    """)


# --- parsing ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_specs_validate(path):
    spec = load_spec(path)
    assert spec.dagbuild == 1 and spec.base_dir == path.resolve().parent
    p = plan(spec)
    assert p.summary["nodes"] == len(p.nodes) > 0


def test_shipped_spec_names():
    assert {load_spec(p).name for p in SHIPPED} >= {"saxpy_chain", "diamond", "fanout4", "layers"}


def test_parse_node_kinds():
    spec = parse_spec(RICH, base_dir=SPECS)
    kinds = [type(n) for n in spec.nodes]
    assert kinds == [MemcpyNode, MemsetNode, MemsetNode, MemsetNode, RepeatBlock, EmptyNode, MemcpyNode]
    rep = spec.nodes[4]
    assert rep.repeat.var == "l" and rep.repeat.count == "layers"
    assert isinstance(rep.nodes[0], RepeatBlock) and isinstance(rep.nodes[1], KernelNode)
    assert spec.nodes[2].memset.value == -1 and spec.nodes[3].memset.value == 0.5
    assert spec.buffers["host"].memory == "pinned" and spec.buffers["x"].memory == "device"


def test_rich_spec_plan():
    p = plan(parse_spec(RICH, base_dir=SPECS))
    ids = [n.id for n in p.nodes]
    assert ids == ["upload", "zero", "neg", "half", "s.0.0", "s.0.1", "m.0", "s.1.0", "s.1.1", "m.1",
                   "s.2.0", "s.2.1", "m.2", "done", "down"]
    s01 = p.node_by_id["s.0.1"]
    assert s01.op.grid == (2, 1, 1) and s01.op.block == (64, 1, 1) and s01.op.shared == 256
    assert [a.value for a in s01.op.args if not a.param.pointer] == [-1.5e-3, 127]
    assert s01.writes[0].offset == (0 * 2 + 1) * 128 * 4 and s01.writes[0].nbytes == 128 * 4
    m2 = p.node_by_id["m.2"]
    assert m2.after == ("s.2.1",) and m2.op.args[0].param.dtype == "bf16"
    assert p.kernels["mix"].options == ("-lineinfo", "--use_fast_math")
    assert p.node_by_id["done"].after == ("m.2",)
    assert p.node_by_id["neg"].op.value_bits == 0xFF and p.node_by_id["half"].op.value_bits == 0x3F00


def test_unknown_top_level_key():
    with pytest.raises(SpecError) as info:
        parse_spec("dagbuild: 1\nname: t\nnodez: []\n")
    (issue,) = info.value.issues
    assert issue.code == "schema" and "nodez" in issue.message and issue.line == 3


def test_line_of_uses_deepest_known_prefix():
    spec = parse_spec(RICH, base_dir=SPECS)
    lines = RICH.splitlines()
    args_line = next(i + 1 for i, ln in enumerate(lines) if "args: {x: x, y: \"y[l, h]\"" in ln)
    assert spec.line_of(("nodes", 4, "nodes", 0, "nodes", 0, "args")) == args_line
    assert spec.line_of(("nodes", 4, "nodes", 0, "nodes", 0, "args", "no-such-key")) == args_line
    assert spec.line_of(("buffers", "flags", "dtype")) == next(i + 1 for i, ln in enumerate(lines) if "flags:" in ln)
    assert spec.line_of(()) == 1


def test_from_dict_and_graph_spec_without_lines():
    spec = from_dict({"dagbuild": 1, "name": "d", "nodes": [{"id": "e", "empty": {}}]})
    assert spec.line_of(("nodes", 0)) is None
    assert plan(spec).summary["nodes"] == 1


# --- equality and round trips ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_to_yaml_round_trip_shipped(path):
    spec = load_spec(path)
    text = spec.to_yaml()
    again = parse_spec(text, base_dir=SPECS)
    assert again == spec
    assert again.to_yaml() == text  # the dump is a fixed point
    assert plan(again).edges == plan(spec).edges


def test_to_yaml_round_trip_rich():
    spec = parse_spec(RICH, base_dir=SPECS)
    again = parse_spec(spec.to_yaml(), base_dir=SPECS)
    assert again == spec
    assert again.kernels["mix"].code == spec.kernels["mix"].code and "\n" in spec.kernels["mix"].code
    assert plan(again).edges == plan(spec).edges


def test_to_dict_leaves_defaults_out():
    d = parse_spec(RICH, base_dir=SPECS).to_dict()
    assert d["dagbuild"] == 1
    assert "deps" not in d and "memory" not in d["buffers"]["x"] and d["buffers"]["host"]["memory"] == "pinned"
    assert "after" not in d["nodes"][0] and "shared" not in d["nodes"][4]["nodes"][1]
    assert from_dict(d) == parse_spec(RICH)


def test_equality_ignores_lines_and_base_dir_but_not_content():
    a = parse_spec(RICH, base_dir=SPECS)
    b = parse_spec("\n\n# moved down two lines\n" + RICH, base_dir="/elsewhere")
    assert a == b
    assert parse_spec(RICH.replace("n: 128", "n: 129")) != a
    assert parse_spec(RICH.replace("value: -1", "value: -2")) != a
    assert parse_spec(RICH.replace('after: [done]', 'after: []')) != a
    assert a != a.to_dict()


def test_yaml_dump_quotes_what_needs_quoting():
    spec = from_dict({"dagbuild": 1, "name": "yes", "dims": {"n": 4},
                      "buffers": {"x": {"dtype": "f32", "shape": ["n"]}},
                      "nodes": [{"id": "true", "memset": {"dst": "x", "value": 0}},
                                {"id": "1.5", "empty": {}, "after": ["true"]},
                                {"id": "null", "empty": {}, "after": ["1.5"]}]})
    again = parse_spec(spec.to_yaml())
    assert again == spec and [n.id for n in again.nodes] == ["true", "1.5", "null"]


# --- the expression language -----------------------------------------------------------------------------------------

ENV = {"n": 10, "m": 3, "f": 2.5}


@pytest.mark.parametrize("text, value", [
    ("n", 10), ("n + m * 2", 16), ("(n + m) * 2", 26), ("n // m", 3), ("n % m", 1), ("-n", -10),
    ("+n", 10), ("-7 // 2", -4), ("-7 % 2", 1), ("ceil_div(n, m)", 4), ("ceil_div(9, 3)", 3),
    ("ceil_div(-7, 2)", -3), ("min(n, m)", 3), ("max(n, m, 12)", 12), ("min(4)", 4), ("f * 2", 5.0),
    ("  n  ", 10), ("0x10", 16), ("1_000", 1000), (7, 7), (2.5, 2.5), ("ceil_div(f, 2)", 2),
])
def test_evaluate(text, value):
    assert expr.evaluate(text, ENV) == value


@pytest.mark.parametrize("text", [
    "n.__class__", "(1).real", "__import__('os')", "eval('1')", "exec('x=1')", "open('/etc/passwd')",
    "lambda: 1", "(lambda: 1)()", "2 ** 3", "n / 2", "n << 1", "n & 1", "n | 1", "n ^ 1", "~n",
    "n if m else 1", "n is m", "n in m", "[n][0]", "{n: 1}", "'text'", "True", "None", "f'{n}'",
    "min(n, key=abs)", "min(*[1])", "ceil_div(1)", "min()", "n.bit_length()", "(x := 1)", "n; m",
    "__builtins__['eval']('1')", "getattr(n, 'real')", "[x for x in (1,)]",
])
def test_unsafe_or_unsupported_expressions_are_rejected(text):
    with pytest.raises(expr.ExprError):
        expr.evaluate(text, ENV)


def test_dunder_name_is_just_an_unknown_name():
    with pytest.raises(expr.ExprError, match="unknown name '__class__'"):
        expr.evaluate("__class__", ENV)


def test_expressions_never_call_eval(monkeypatch):
    import builtins

    def boom(*a, **k):
        raise AssertionError("eval or exec called")

    for name in ("eval", "exec"):
        monkeypatch.setattr(builtins, name, boom)
    expr.parse.cache_clear()
    assert expr.evaluate("ceil_div(n + 1, 2) * max(m, 1)", ENV) == 18


@pytest.mark.parametrize("text, why", [
    ("n // 0", "division by zero"), ("n % (m - 3)", "division by zero"), ("ceil_div(n, 0)", "division by zero"),
    ("q + 1", "unknown name 'q'"), ("n +", "syntax"), ("", "syntax"),
])
def test_evaluate_errors(text, why):
    with pytest.raises(expr.ExprError, match=why):
        expr.evaluate(text, ENV)


@pytest.mark.parametrize("text", ["2.5", "f", "n / 1", "1e400", "1e308 * 10 - 1e308 * 10"])
def test_evaluate_int_needs_an_integer(text):
    with pytest.raises(expr.ExprError):
        expr.evaluate_int(text, ENV)


def test_evaluate_int_refuses_floats_even_whole_ones():
    with pytest.raises(expr.ExprError, match="'f \\* 2' = 5.0 is a float, but an integer is needed"):
        expr.evaluate_int("f * 2", ENV)
    with pytest.raises(expr.ExprError, match="2.0 is a float"):
        expr.evaluate_int(2.0, ENV)


def test_comparisons_and_logic_for_checks():
    env = {"n": 16, "m": 3}
    assert expr.evaluate("n % 8 == 0 and m < n", env) == 1
    assert expr.evaluate("not (n > m) or m == 3", env) == 1
    assert expr.evaluate("1 < m < 2", env) == 0  # chained comparisons read as Python's


def test_templates_read_as_the_expression_inside():
    assert expr.evaluate("{l} + 1", {"l": 2}) == 3
    assert expr.split_top_level("{min(a, b)}, 0") == ["{min(a, b)}", "0"]


@pytest.mark.parametrize("text", ["-" * 100_000 + "1", "1" + "+1" * 100_000, "(" * 500 + "1" + ")" * 500,
                                  "9" * 5000, "1" + "0" * 400 + " * 1.0", "ceil_div(1e308 * 10, 1)"])
def test_pathological_expressions_raise_expr_error_only(text):
    with pytest.raises(expr.ExprError):
        expr.evaluate_int(text, ENV)


def test_bool_is_not_a_number():
    with pytest.raises(expr.ExprError):
        expr.evaluate(True, ENV)


def test_names():
    assert expr.names("ceil_div(n, m) + max(k, 1)") == {"n", "m", "k"}
    assert expr.names(3) == set()
    with pytest.raises(expr.ExprError):
        expr.names("n +")


def test_split_top_level():
    assert expr.split_top_level("min(a, b), c") == ["min(a, b)", "c"]
    assert expr.split_top_level("l, (h + 1) % 2") == ["l", "(h + 1) % 2"]
    assert expr.split_top_level("x") == ["x"]


def test_view_resolution():
    p = plan(parse_spec(RICH, base_dir=SPECS))
    v = resolve_view("y[2, 1]", p.buffers, {"n": 128})
    assert (v.buffer, v.offset, v.nbytes) == ("y", (2 * 2 + 1) * 128 * 4, 128 * 4)
    v = resolve_view(" y [ 2 ] ", p.buffers, {})
    assert (v.offset, v.nbytes) == (2 * 2 * 128 * 4, 2 * 128 * 4)
    v = resolve_view("y[ceil_div(3, 2), min(1, 0), 127]", p.buffers, {})
    assert (v.offset, v.nbytes) == (((2 * 2 + 0) * 128 + 127) * 4, 4)
    assert v.text == "y[ceil_div(3, 2), min(1, 0), 127]"
    assert resolve_view("w", p.buffers, {}).nbytes == 3 * 128 * 2


# --- params ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, param", [
    ("const f16* w", Param("w", "f16", True, True)),
    ("f32 *y", Param("y", "f32", True, False)),
    ("  i32   n ", Param("n", "i32", False, False)),
    ("const wt* w", Param("w", "bf16", True, True)),
    ("u64 count", Param("count", "u64", False, False)),
])
def test_parse_param(text, param):
    assert parse_param(text, {"wt": "bf16"}) == param


@pytest.mark.parametrize("text", ["f16 h", "const i32 n", "float x", "f32** y", "f32* y z", "f32*", "wt x"])
def test_parse_param_rejects(text):
    with pytest.raises(ValueError):
        parse_param(text, {"wt": "f16"})


# --- memset bit patterns ---------------------------------------------------------------------------------------------


def _f32(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


@pytest.mark.parametrize("dtype, value, bits", [
    ("f32", 0, 0), ("f32", 1.0, 0x3F800000), ("f32", -2.5, 0xC0200000), ("f32", -0.0, 0x80000000),
    ("f32", math.inf, 0x7F800000), ("f32", 3, 0x40400000),
    ("f16", 1.0, 0x3C00), ("f16", -2.0, 0xC000), ("f16", 0.1, 0x2E66), ("f16", 65504.0, 0x7BFF),
    ("f16", 5.96e-8, 0x0001), ("f16", 1 + 2**-11, 0x3C00), ("f16", 1 + 3 * 2**-11, 0x3C02),
    ("bf16", 1.0, 0x3F80), ("bf16", -1.0, 0xBF80), ("bf16", 0.5, 0x3F00),
    ("bf16", 1 + 2**-8, 0x3F80),  # exactly half way: round to even (down)
    ("bf16", 1 + 3 * 2**-8, 0x3F82),  # exactly half way: round to even (up)
    ("bf16", 1 + 2**-8 + 2**-16, 0x3F81),  # just above half way: up
    ("bf16", 1 + 2**-8 - 2**-16, 0x3F80),  # just below half way: down
    ("bf16", 3.0e38, (_f32(3.0e38) + 0x7FFF + ((_f32(3.0e38) >> 16) & 1)) >> 16),
    ("bf16", math.inf, 0x7F80),
    ("i8", -1, 0xFF), ("i8", -128, 0x80), ("i8", 127, 0x7F), ("u8", 255, 0xFF),
    ("i32", -1, 0xFFFFFFFF), ("i32", -(2**31), 0x80000000), ("u32", 2**32 - 1, 0xFFFFFFFF),
])
def test_memset_bits(dtype, value, bits):
    got, size, factor = memset_bits(dtype, value)
    assert got == bits and factor == 1
    assert size == {"f32": 4, "f16": 2, "bf16": 2, "i8": 1, "u8": 1, "i32": 4, "u32": 4}[dtype]


def test_memset_bf16_nan_stays_nan():
    bits, _, _ = memset_bits("bf16", math.nan)
    assert bits & 0x7F80 == 0x7F80 and bits & 0x7F != 0


@pytest.mark.parametrize("dtype", ["f64", "i64", "u64"])
def test_memset_8_byte_only_zero(dtype):
    assert memset_bits(dtype, 0) == (0, 4, 2)  # two 4-byte words per element
    assert memset_bits(dtype, 0.0) == (0, 4, 2)
    with pytest.raises(ValueError, match="only be memset to 0"):
        memset_bits(dtype, 1)


@pytest.mark.parametrize("dtype, value, exc", [("i8", 128, ValueError), ("i8", -129, ValueError),
                                               ("u8", -1, ValueError), ("u32", 2**32, ValueError),
                                               ("i32", 1.5, TypeError), ("i8", 3.0, TypeError),
                                               ("f16", 1e6, ValueError), ("f32", 1e300, ValueError),
                                               ("bf16", 3.4e38, ValueError)])
def test_memset_bits_rejects(dtype, value, exc):
    with pytest.raises(exc):
        memset_bits(dtype, value)


def test_memset_node_count_and_bits_in_plan():
    p = plan(from_dict({"dagbuild": 1, "name": "ms",
                        "buffers": {"h": {"dtype": "f16", "shape": [3, 10]}, "d": {"dtype": "f64", "shape": [5]}},
                        "nodes": [{"id": "a", "memset": {"dst": "h[1]", "value": -2}},
                                  {"id": "b", "memset": {"dst": "d"}}]}))
    a, b = (n.op for n in p.nodes)
    assert (a.value_bits, a.element_size, a.count, a.dst.offset) == (0xC000, 2, 10, 20)
    assert (b.value_bits, b.element_size, b.count) == (0, 4, 10)


# --- JSON Schema -----------------------------------------------------------------------------------------------------


def test_json_schema_accepts_shipped_specs_and_rejects_bad_ones():
    jsonschema = pytest.importorskip("jsonschema")
    schema = GraphSpec.model_json_schema()
    json.dumps(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in SHIPPED:
        data = yaml.safe_load(path.read_text())
        assert list(validator.iter_errors(data)) == [], path.name
        bad = dict(data, nodes=[*data["nodes"], {"id": "x", "colour": "red"}])
        assert list(validator.iter_errors(bad)), path.name
    assert list(validator.iter_errors({"dagbuild": 2, "name": "t"}))


# --- loading: runner, dump, line map ---------------------------------------------------------------------------------


def test_runner_field_loads_and_round_trips():
    spec = load_spec(SPECS / "llama_decode.yaml")
    assert spec.runner == "llama_decode" and load_spec(SPECS / "chain.yaml").runner is None
    text = spec.to_yaml()
    assert text.splitlines()[:3] == ["dagbuild: 1", "name: llama_decode", "runner: llama_decode"]
    assert parse_spec(text, base_dir=SPECS) == spec


def test_dump_yaml_is_to_yaml():
    from dagbuild.load import dump_yaml

    for path in SHIPPED:
        spec = load_spec(path)
        assert dump_yaml(spec) == spec.to_yaml()


def test_line_map_leaves_out_lines_that_repeat_the_parent_but_answers_the_same():
    text = "dagbuild: 1\nname: t\nnodes:\n" + "".join(f"  - {{id: e{i}, empty: {{}}, after: []}}\n" for i in range(50))
    spec = parse_spec(text)
    assert len(spec._lines) < 60  # one entry per line, not one per key
    assert spec.line_of(("nodes", 7, "empty")) == spec.line_of(("nodes", 7, "after", 0)) == 11


def test_load_spec_reads_once_with_libyaml(monkeypatch):
    from dagbuild import load

    if not getattr(yaml, "__with_libyaml__", False):
        pytest.skip("PyYAML without libyaml")
    made = []
    real = yaml.CSafeLoader

    class Counting(real):
        def __init__(self, stream):
            made.append(1)
            super().__init__(stream)

    monkeypatch.setattr(load, "_Loader", Counting)
    load_spec(SPECS / "llama_decode.yaml")
    assert made == [1]


def test_shipped_specs_and_kernels_are_found_where_they_are_installed():
    from dagbuild.data import data_root, shipped_spec

    assert (data_root() / "kernels" / "llama.cu").is_file() and shipped_spec("llama_decode.yaml").is_file()
