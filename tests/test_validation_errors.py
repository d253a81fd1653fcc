"""Every validation error code, each from a small spec that triggers it.

Each test checks the code, the culprit (node ids, buffer, field) and, for YAML, the line. Lines are
found by searching the spec text for a marker, so a wrong line (off by one, the parent's line) fails.
"""

from __future__ import annotations

import textwrap

import pytest
from conftest import SPECS
from helpers import issues_of, line

from dagbuild.errors import Issue, SpecError
from dagbuild.load import from_dict, parse_spec
from dagbuild.plan import plan

HEAD = """\
dagbuild: 1
name: t
dims: {n: 256}
kernels:
  scale:
    source: ../kernels/basic.cu
    entry: scale
    params: [const f32* x, f32* y, f32 a, i32 n]
buffers:
  x: {dtype: f32, shape: [n]}
  y: {dtype: f32, shape: [n]}
  h: {dtype: f16, shape: [2, n]}
  rows: {dtype: f32, shape: [4, n]}
  small: {dtype: i8, shape: [n]}
  big: {dtype: u64, shape: [n]}
nodes:
"""


EMPTY = HEAD.replace("nodes:\n", "nodes: []\n")


def spec_text(body: str, head: str = HEAD) -> str:
    return head + textwrap.dedent(body).lstrip("\n")


def only(text: str, overrides: dict | None = None) -> Issue:
    issues = issues_of(text, overrides)
    assert len(issues) == 1, [str(i) for i in issues]
    return issues[0]


def kernel_node(node_id: str = "k1", grid: str = "[1]", block: str = "[32]", shared: str | None = None,
                args: str = "{x: x, y: y, a: 1.0, n: n}") -> str:
    out = f"- id: {node_id}\n  kernel: scale\n  grid: {grid}\n  block: {block}\n"
    if shared is not None:
        out += f"  shared: {shared}\n"
    return out + f"  args: {args}\n"


def test_head_alone_is_valid():
    p = plan(parse_spec(spec_text(kernel_node()), base_dir=SPECS))
    assert [n.id for n in p.nodes] == ["k1"]


# --- yaml and schema -----------------------------------------------------------------------------------------------


def test_yaml_syntax_error_has_line():
    text = "dagbuild: 1\nname: t\nnodes:\n  - {id: a, empty: {}\n  - {id: b, empty: {}}\n"
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    (issue,) = info.value.issues
    assert issue.code == "yaml"
    assert issue.line in (4, 5)  # the problem mark: the unclosed flow mapping runs into line 5


def test_yaml_tab_indent_is_yaml_error():
    with pytest.raises(SpecError) as info:
        parse_spec("dagbuild: 1\n\tname: t\n")
    assert info.value.codes == ["yaml"]
    assert info.value.issues[0].line == 2


def test_yaml_python_tags_are_refused():
    with pytest.raises(SpecError) as info:
        parse_spec("dagbuild: !!python/object/apply:os.system ['true']\nname: t\n")
    assert info.value.codes == ["yaml"]


@pytest.mark.parametrize("text", ["", "- 1\n- 2\n", "just a string\n"])
def test_top_level_must_be_a_mapping(text):
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    assert info.value.codes == ["schema"]
    assert info.value.issues[0].line == 1


def test_wrong_format_version():
    with pytest.raises(SpecError) as info:
        parse_spec("dagbuild: 2\nname: t\n")
    (issue,) = info.value.issues
    assert issue.code == "schema" and issue.field == "dagbuild" and issue.line == 1
    assert "version" in issue.message and "2" in issue.message


def test_schema_errors_name_node_field_and_line():
    text = spec_text("""
        - id: a
          kernel: scale
          block: [1]
          args: {}
        - id: b
          empty: {}
          memset: {dst: x}
        - id: c
          empty: {}
        - id: d
          colour: red
          empty: {}
        """)
    with pytest.raises(SpecError) as info:
        parse_spec(text, base_dir=SPECS)
    by_node = {i.nodes: i for i in info.value.issues}
    assert set(by_node) == {("a",), ("b",), ("d",)}  # all independent errors, and c is fine
    assert all(i.code == "schema" for i in info.value.issues)
    missing = by_node[("a",)]
    assert "grid" in missing.message and missing.field == "nodes[0].grid"
    assert missing.line == line(text, "- id: a")
    two_kinds = by_node[("b",)]
    assert "exactly one of" in two_kinds.message and two_kinds.line == line(text, "- id: b")
    unknown = by_node[("d",)]
    assert "colour" in unknown.message and unknown.field == "nodes[3].colour"
    assert unknown.line == line(text, "colour: red")


def test_schema_error_inside_repeat_names_node():
    text = spec_text("""
        - repeat: {var: l, count: 2}
          nodes:
            - id: "a.{l}"
              memset: {dst: x, value: 0}
            - id: "b.{l}"
              memset: {dst: x, value: [1]}
        """)
    with pytest.raises(SpecError) as info:
        parse_spec(text, base_dir=SPECS)
    (issue,) = info.value.issues
    assert issue.code == "schema" and issue.nodes == ("b.{l}",)
    assert issue.line == line(text, "value: [1]")


def test_schema_buffer_memory_names_buffer():
    text = EMPTY.replace("  x: {dtype: f32, shape: [n]}\n",
                                     "  x:\n    dtype: f32\n    shape: [n]\n    memory: host\n")
    with pytest.raises(SpecError) as info:
        parse_spec(text, base_dir=SPECS)
    (issue,) = info.value.issues
    assert issue.code == "schema" and issue.buffer == "x" and issue.field == "buffers.x.memory"
    assert issue.line == line(text, "memory: host")


def test_schema_bad_dtype_param_and_type_are_all_reported():
    text = textwrap.dedent("""\
        dagbuild: 1
        name: t
        types: {wt: f99}
        kernels:
          k:
            code: "extern \\"C\\" __global__ void k() {}"
            entry: k
            params: [const f32* x, float y]
        buffers:
          b2:
            dtype: q8
            shape: [4]
          b3:
            dtype: f32
            shape: []
        nodes: []
        """)
    issues = issues_of(text)
    got = {(i.code, i.field): i for i in issues}
    assert set(got) == {("schema", "types.wt"), ("schema", "kernels.k.params[1]"),
                        ("schema", "buffers.b2.dtype"), ("schema", "buffers.b3.shape")}
    assert got["schema", "types.wt"].line == line(text, "types:")
    assert got["schema", "kernels.k.params[1]"].line == line(text, "params:")
    assert "float" in got["schema", "kernels.k.params[1]"].message
    assert got["schema", "buffers.b2.dtype"].buffer == "b2"
    assert got["schema", "buffers.b2.dtype"].line == line(text, "dtype: q8")
    assert got["schema", "buffers.b3.shape"].buffer == "b3"


def test_schema_kernel_needs_exactly_one_source():
    with pytest.raises(SpecError) as info:
        from_dict({"dagbuild": 1, "name": "t", "kernels": {"k": {"entry": "k", "params": []}}})
    (issue,) = info.value.issues
    assert issue.code == "schema" and "source" in issue.message


def test_schema_non_identifier_names():
    with pytest.raises(SpecError) as info:
        parse_spec("dagbuild: 1\nname: t\ndims: {my-dim: 3}\n")
    assert info.value.codes == ["schema"]
    assert "my-dim" in info.value.issues[0].message


def test_schema_duplicate_param_names():
    text = EMPTY.replace("params: [const f32* x, f32* y, f32 a, i32 n]",
                                     "params: [const f32* x, f32* x, f32 a, i32 n]")
    issue = only(text)
    assert issue.code == "schema" and "'x' declared twice" in issue.message
    assert issue.field == "kernels.scale.params"


# --- duplicate_id ----------------------------------------------------------------------------------------------------


def test_duplicate_id():
    text = spec_text("""
        - id: a
          memset: {dst: x, value: 0}
        - id: a
          memset: {dst: y, value: 0}
        """)
    issue = only(text)
    assert issue.code == "duplicate_id" and issue.nodes == ("a",) and issue.field == "id"
    assert issue.line == line(text, "- id: a", nth=2)


def test_duplicate_id_in_repeat_without_var():
    text = spec_text("""
        - repeat: {var: l, count: 3}
          nodes:
            - id: same
              empty: {}
        """)
    issue = only(text)  # once, not once per iteration
    assert issue.code == "duplicate_id" and issue.nodes == ("same",)
    assert "{l}" in issue.message
    assert issue.line == line(text, "- id: same")


def test_duplicate_id_from_colliding_templates():
    text = spec_text("""
        - repeat: {var: l, count: 4}
          nodes:
            - id: "a.{l // 2}"
              empty: {}
        """)
    issue = only(text)
    assert issue.code == "duplicate_id" and issue.nodes == ("a.0",)
    assert issue.line == line(text, "a.{l // 2}")


def test_duplicate_id_nested_repeat_must_use_inner_var():
    text = spec_text("""
        - repeat: {var: i, count: 2}
          nodes:
            - repeat: {var: j, count: 3}
              nodes:
                - id: "a.{i}"
                  empty: {}
        """)
    issue = only(text)
    assert issue.code == "duplicate_id" and issue.nodes == ("a.{i}",) and "{j}" in issue.message
    assert issue.line == line(text, 'id: "a.{i}"')


def test_duplicate_id_between_repeat_and_plain_node():
    text = spec_text("""
        - repeat: {var: l, count: 2}
          nodes:
            - id: "a.{l}"
              empty: {}
        - id: a.1
          empty: {}
        """)
    issue = only(text)
    assert issue.code == "duplicate_id" and issue.nodes == ("a.1",)
    assert issue.line == line(text, "- id: a.1")


# --- unknown_reference -----------------------------------------------------------------------------------------------


def test_unknown_kernel():
    text = spec_text("""
        - id: k1
          kernel: nope
          grid: [1]
          block: [1]
          args: {}
        """)
    issue = only(text)
    assert issue.code == "unknown_reference" and issue.nodes == ("k1",) and issue.field == "kernel"
    assert "'nope'" in issue.message and issue.line == line(text, "kernel: nope")


def test_unknown_buffer_in_memcpy():
    text = spec_text("""
        - id: cp
          memcpy:
            dst: x
            src: zz
        """)
    issue = only(text)
    assert (issue.code, issue.nodes, issue.buffer, issue.field) == ("unknown_reference", ("cp",), "zz", "memcpy.src")
    assert issue.line == line(text, "src: zz")


def test_unknown_buffer_in_kernel_arg():
    text = spec_text(kernel_node(args="\n    x: x\n    y: nowhere\n    a: 1.0\n    n: n"))
    issue = only(text)
    assert (issue.code, issue.nodes, issue.buffer, issue.field) == ("unknown_reference", ("k1",), "nowhere", "args.y")
    assert issue.line == line(text, "y: nowhere")


def test_unknown_dim_in_grid():
    text = spec_text(kernel_node(grid='["ceil_div(m, 256)"]'))
    issue = only(text)
    assert issue.code == "unknown_reference" and issue.nodes == ("k1",) and issue.field == "grid.0"
    assert "'m'" in issue.message and issue.line == line(text, "grid:")


def test_unknown_dim_in_buffer_shape():
    text = EMPTY.replace("rows: {dtype: f32, shape: [4, n]}", "rows: {dtype: f32, shape: [4, width]}")
    issue = only(text)
    assert issue.code == "unknown_reference" and issue.buffer == "rows" and issue.field == "buffers.rows.shape[1]"
    assert "'width'" in issue.message and issue.line == line(text, "rows:")


def test_unknown_name_in_view_index():
    text = spec_text("""
        - id: ms
          memset: {dst: "rows[k]", value: 0}
        """)
    issue = only(text)
    assert issue.code == "unknown_reference" and issue.nodes == ("ms",) and "'k'" in issue.message
    assert issue.field == "memset.dst"


def test_unknown_node_in_after():
    text = spec_text("""
        - id: a
          empty: {}
          after: [ghost]
        """)
    issue = only(text)
    assert issue.code == "unknown_reference" and issue.nodes == ("a", "ghost") and issue.field == "after"
    assert issue.line == line(text, "after: [ghost]")


def test_after_template_pointing_before_first_iteration():
    text = spec_text("""
        - repeat: {var: l, count: 3}
          nodes:
            - id: "a.{l}"
              empty: {}
              after: ["a.{l - 1}"]
        """)
    issue = only(text)
    assert issue.code == "unknown_reference" and issue.nodes == ("a.0", "a.-1")


def test_unknown_repeat_var_in_id_is_unknown_reference_once():
    text = spec_text("""
        - repeat: {var: l, count: 3}
          nodes:
            - id: "a.{l}.{k}"
              empty: {}
        """)
    issue = only(text)
    assert issue.code == "unknown_reference" and issue.nodes == ("a.{l}.{k}",) and issue.field == "id"
    assert "'k'" in issue.message and issue.line == line(text, "a.{l}.{k}")


def test_unknown_name_in_repeat_count():
    text = spec_text("""
        - repeat: {var: l, count: layers}
          nodes:
            - id: "a.{l}"
              empty: {}
        """)
    issue = only(text)
    assert issue.code == "unknown_reference" and issue.field == "repeat.count" and "'layers'" in issue.message
    assert issue.line == line(text, "count: layers")


def test_repeat_count_zero_leaves_the_block_out_and_negative_is_refused():
    text = spec_text("""
        - id: first
          empty: {}
        - repeat: {var: l, count: "n - 256"}
          nodes:
            - id: "a.{l}"
              empty: {}
        """)
    assert [node.id for node in plan(parse_spec(text, base_dir=SPECS)).nodes] == ["first"]
    bad = text.replace('"n - 256"', '"n - 300"')
    issue = only(bad)
    assert issue.code == "out_of_bounds" and issue.field == "repeat.count"
    assert "'n - 300' = -44, must be ≥ 0" in issue.message and issue.line == line(bad, "count:")


def test_resident_must_be_a_bool():
    text = spec_text(kernel_node()).replace("    entry: scale\n", "    entry: scale\n    resident: yes please\n")
    issue = only(text)
    assert issue.code == "schema" and "resident" in issue.field and issue.line == line(text, "resident:")
    ok = plan(parse_spec(text.replace("yes please", "true"), base_dir=SPECS))
    assert ok.kernels["scale"].resident


def test_missing_kernel_source_file():
    text = spec_text(kernel_node()).replace("../kernels/basic.cu", "../kernels/missing.cu")
    issue = only(text)
    assert issue.code == "unknown_reference" and issue.field == "kernels.scale.source"
    assert "missing.cu" in issue.message and issue.line == line(text, "source:")


def test_set_unknown_name():
    issue = only(spec_text(kernel_node()), {"nn": 3})
    assert issue.code == "unknown_reference" and issue.field == "nn" and "'nn'" in issue.message


def test_set_dim_needs_integer():
    issue = only(spec_text(kernel_node()), {"n": "lots"})
    assert issue.code == "schema" and issue.field == "n"


def test_unknown_type_in_entry_template():
    text = spec_text(kernel_node()).replace("entry: scale", "entry: scale_{wt}")
    issue = only(text)
    assert issue.code == "unknown_reference" and issue.field == "kernels.scale.entry"


# --- expression ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid, what", [('["n +"]', "syntax"), ('["n // 0"]', "division by zero"),
                                        ('["n / 2"]', "Div"), ("[2.5]", "integer"),
                                        ('["n // 2 + 0.5"]', "integer"), ('["x.real"]', "Attribute")])
def test_expression_errors_in_grid(grid, what):
    text = spec_text(kernel_node(grid=grid))
    issue = only(text)
    assert issue.code == "expression" and issue.nodes == ("k1",) and issue.field == "grid.0"
    assert what in issue.message and issue.line == line(text, "grid:")


def test_expression_non_integer_scalar_arg():
    text = spec_text(kernel_node(args="{x: x, y: y, a: 1.0, n: 2.5}"))
    issue = only(text)
    assert issue.code == "expression" and issue.field == "args.n" and "integer" in issue.message


def test_expression_in_buffer_shape():
    text = EMPTY.replace("rows: {dtype: f32, shape: [4, n]}", 'rows: {dtype: f32, shape: [4, "n %"]}')
    issue = only(text)
    assert issue.code == "expression" and issue.buffer == "rows"


def test_expression_in_id_template():
    text = spec_text("""
        - repeat: {var: l, count: 2}
          nodes:
            - id: "a.{l +}"
              empty: {}
        """)
    issue = only(text)
    assert issue.code == "expression" and issue.nodes == ("a.{l +}",) and issue.line == line(text, "a.{l +}")


def test_expression_in_repeat_count():
    issue = only(spec_text("""
        - repeat: {var: l, count: "n // 0"}
          nodes:
            - id: "a.{l}"
              empty: {}
        """))
    assert issue.code == "expression" and issue.field == "repeat.count"


# --- arg_mismatch ----------------------------------------------------------------------------------------------------


def test_missing_arg():
    text = spec_text(kernel_node(args="{x: x, y: y, a: 1.0}"))
    issue = only(text)
    assert issue.code == "arg_mismatch" and issue.nodes == ("k1",) and issue.field == "args"
    assert "missing arg 'n'" in issue.message and issue.line == line(text, "args:")


def test_extra_arg():
    issue = only(spec_text(kernel_node(args="{x: x, y: y, a: 1.0, n: n, q: 1}")))
    assert issue.code == "arg_mismatch" and "unknown arg 'q'" in issue.message


def test_pointer_given_scalar():
    text = spec_text(kernel_node(args="\n    x: 3\n    y: y\n    a: 1.0\n    n: n"))
    issue = only(text)
    assert issue.code == "arg_mismatch" and issue.field == "args.x" and "pointer" in issue.message
    assert issue.line == line(text, "x: 3")


def test_pointer_given_dim_name():
    issue = only(spec_text(kernel_node(args="{x: n, y: y, a: 1.0, n: n}")))
    assert issue.code == "arg_mismatch" and issue.field == "args.x"


def test_scalar_given_buffer():
    text = spec_text(kernel_node(args="\n    x: x\n    y: y\n    a: x\n    n: n"))
    issue = only(text)
    assert issue.code == "arg_mismatch" and issue.field == "args.a" and issue.buffer == "x"
    assert issue.line == line(text, "a: x")


def test_element_type_differs():
    text = spec_text(kernel_node(args='\n    x: "h[0]"\n    y: y\n    a: 1.0\n    n: n'))
    issue = only(text)
    assert issue.code == "arg_mismatch" and issue.buffer == "h" and issue.field == "args.x"
    assert "f16" in issue.message and "f32" in issue.message


def test_type_param_resolves_in_params_and_buffers():
    head = HEAD.replace("dims: {n: 256}", "dims: {n: 256}\ntypes: {wt: f16}").replace(
        "const f32* x, f32* y", "const wt* x, f32* y")
    text = spec_text(kernel_node(args='{x: "h[1]", y: y, a: 1.0, n: n}'), head=head)
    p = plan(parse_spec(text, base_dir=SPECS))
    assert p.nodes[0].op.args[0].param.dtype == "f16"
    issue = only(text, {"wt": "f32"})  # the override changes the param, and h is still f16
    assert issue.code == "arg_mismatch" and issue.buffer == "h"


def test_memset_float_into_integer_buffer():
    issue = only(spec_text("- id: ms\n  memset: {dst: small, value: 1.5}\n"))
    assert issue.code == "arg_mismatch" and issue.buffer == "small" and issue.field == "memset.value"


# --- out_of_bounds ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("view", ["h[2]", "h[-1]", "h[0, 256]", "h[1, n]"])
def test_view_index_outside_axis(view):
    text = spec_text(f'- id: ms\n  memset:\n    dst: "{view}"\n    value: 0\n')
    issue = only(text)
    assert issue.code == "out_of_bounds" and issue.nodes == ("ms",) and issue.buffer == "h"
    assert issue.field == "memset.dst" and issue.line == line(text, "dst:")


def test_view_with_too_many_indices():
    issue = only(spec_text('- id: ms\n  memset: {dst: "h[0, 1, 2]", value: 0}\n'))
    assert issue.code == "out_of_bounds" and issue.buffer == "h" and "3 indices" in issue.message


def test_memcpy_sizes_differ():
    text = spec_text("- id: cp\n  memcpy: {dst: x, src: rows}\n")
    issue = only(text)
    assert issue.code == "out_of_bounds" and issue.nodes == ("cp",) and issue.buffer == "x"
    assert "1024" in issue.message and "4096" in issue.message


def test_memcpy_same_size_different_dtypes_is_fine():
    # x is 256 f32 = 1024 bytes; h is 2 x 256 f16 = 1024 bytes: a byte copy, allowed
    p = plan(parse_spec(spec_text("- id: cp\n  memcpy: {dst: x, src: h}\n"), base_dir=SPECS))
    assert p.nodes[0].op.count == 1024 and p.nodes[0].op.direction == "D2D"


@pytest.mark.parametrize("count", ["-1", '"n - 300"'])
def test_repeat_count_negative(count):  # 0 leaves the block out: test_repeat_count_zero_leaves_the_block_out...
    text = spec_text(f"""
        - repeat:
            var: l
            count: {count}
          nodes:
            - id: "a.{{l}}"
              empty: {{}}
        """)
    issue = only(text)
    assert issue.code == "out_of_bounds" and issue.field == "repeat.count" and "'l'" in issue.message
    assert issue.line == line(text, "count:")


def test_buffer_shape_zero():
    issue = only(EMPTY.replace("rows: {dtype: f32, shape: [4, n]}", "rows: {dtype: f32, shape: [0, n]}"))
    assert issue.code == "out_of_bounds" and issue.buffer == "rows"


def test_integer_arg_out_of_range():
    issue = only(spec_text(kernel_node(args="{x: x, y: y, a: 1.0, n: 3000000000}")))
    assert issue.code == "out_of_bounds" and issue.field == "args.n" and "i32" in issue.message


def test_float_arg_too_large_for_float():
    issue = only(spec_text(kernel_node(args="{x: x, y: y, a: 1" + "0" * 400 + ", n: n}")))
    assert issue.code == "out_of_bounds" and issue.field == "args.a"


@pytest.mark.parametrize("buf, value", [("small", 128), ("small", -129), ("big", 1)])
def test_memset_value_does_not_fit(buf, value):
    issue = only(spec_text(f"- id: ms\n  memset: {{dst: {buf}, value: {value}}}\n"))
    assert issue.code == "out_of_bounds" and issue.buffer == buf and issue.field == "memset.value"


# --- launch_config ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid, block, field, needle", [
    ("[0]", "[32]", "grid.0", "must be ≥ 1"),
    ('["n - 256"]', "[32]", "grid.0", "must be ≥ 1"),
    ("[1]", "[0]", "block.0", "must be ≥ 1"),
    ("[1]", "[2048]", "block.0", "1024"),
    ("[1]", "[64, 32]", "block", "2048 threads"),
    ("[1]", "[1, 1, 65]", "block.2", "64"),
    ("[1, 1, 1, 1]", "[32]", "grid", "1 to 3"),
    ("[]", "[32]", "grid", "1 to 3"),
    ("[1, 70000]", "[32]", "grid.1", "65535"),
])
def test_launch_config(grid, block, field, needle):
    text = spec_text(kernel_node(grid=grid, block=block))
    issue = only(text)
    assert issue.code == "launch_config" and issue.nodes == ("k1",) and issue.field == field
    assert needle in issue.message
    assert issue.line == line(text, field.split(".")[0] + ":")


def test_launch_config_negative_shared():
    issue = only(spec_text(kernel_node(shared="-4")))
    assert issue.code == "launch_config" and issue.field == "shared"


# --- cycle -----------------------------------------------------------------------------------------------------------


def _is_rotation(got: tuple, cycle: tuple) -> bool:
    return any(got == cycle[i:] + cycle[:i] for i in range(len(cycle)))


def test_cycle_through_after():
    text = spec_text("""
        - id: a
          empty: {}
          after: [c]
        - id: b
          empty: {}
          after: [a]
        - id: c
          empty: {}
          after: [b]
        - id: free
          empty: {}
        """)
    issue = only(text)
    assert issue.code == "cycle" and _is_rotation(issue.nodes, ("a", "b", "c"))
    assert issue.line == line(text, f"- id: {issue.nodes[0]}")
    assert " → ".join(issue.nodes) in issue.message


def test_cycle_of_inferred_edge_and_after():
    # w writes x, r reads x: inferred w → r; `after: [r]` on w closes the loop
    issue = only(spec_text("""
        - id: w
          memset: {dst: x, value: 0}
          after: [r]
        - id: r
          memcpy: {dst: y, src: x}
        """))
    assert issue.code == "cycle" and _is_rotation(issue.nodes, ("w", "r"))


def test_self_cycle():
    issue = only(spec_text("- id: me\n  empty: {}\n  after: [me]\n"))
    assert issue.code == "cycle" and issue.nodes == ("me",)


def test_two_independent_cycles_both_reported():
    issues = issues_of(spec_text("""
        - {id: a, empty: {}, after: [b]}
        - {id: b, empty: {}, after: [a]}
        - {id: c, empty: {}, after: [d]}
        - {id: d, empty: {}, after: [c]}
        """))
    assert [i.code for i in issues] == ["cycle", "cycle"]
    assert sorted(sorted(i.nodes) for i in issues) == [["a", "b"], ["c", "d"]]


# --- race ------------------------------------------------------------------------------------------------------------

EXPLICIT = HEAD.replace("dims: {n: 256}", "dims: {n: 256}\ndeps: explicit")


def test_race_under_explicit_deps():
    text = spec_text("""
        - id: fill
          memset: {dst: x, value: 1.0}
        - id: use
          kernel: scale
          grid: [1]
          block: [256]
          args: {x: x, y: y, a: 2.0, n: n}
        """, head=EXPLICIT)
    issue = only(text)
    assert issue.code == "race" and issue.nodes == ("fill", "use") and issue.buffer == "x"
    assert issue.line == line(text, "- id: use")
    assert "after: [fill]" in issue.message


# --- several at once -------------------------------------------------------------------------------------------------


def test_all_independent_errors_reported_together():
    text = spec_text("""
        - id: a
          kernel: nope
          grid: [1]
          block: [1]
          args: {}
        - id: b
          memcpy: {dst: x, src: zz}
        - id: c
          kernel: scale
          grid: [1]
          block: [2000]
          args: {x: x, y: y, a: 1.0, n: n}
        - id: d
          memset: {dst: "h[9]", value: 0}
        - id: e
          kernel: scale
          grid: [1]
          block: [32]
          args: {x: x, y: y, a: 1.0}
        - id: c
          empty: {}
        - id: fine
          memset: {dst: y, value: 0}
        """).replace("rows: {dtype: f32, shape: [4, n]}", "rows: {dtype: f32, shape: [4, w]}")
    issues = issues_of(text)
    got = sorted((i.code, i.nodes, i.buffer, i.line) for i in issues)
    assert got == sorted([
        ("unknown_reference", (), "rows", line(text, "rows:")),
        ("unknown_reference", ("a",), None, line(text, "kernel: nope")),
        ("unknown_reference", ("b",), "zz", line(text, "memcpy: {dst: x, src: zz}")),
        ("launch_config", ("c",), None, line(text, "block: [2000]")),
        ("out_of_bounds", ("d",), "h", line(text, 'dst: "h[9]"')),
        ("arg_mismatch", ("e",), None, line(text, "args: {x: x, y: y, a: 1.0}")),
        ("duplicate_id", ("c",), None, line(text, "- id: c", nth=2)),
    ])


def test_issue_str_and_json():
    issue = only(spec_text("- id: a\n  empty: {}\n  after: [ghost]\n"))
    assert str(issue).startswith("[unknown_reference] ") and f"(line {issue.line})" in str(issue)
    js = issue.to_json()
    assert js == {"code": "unknown_reference", "message": issue.message, "nodes": ["a", "ghost"], "buffer": None,
                  "line": issue.line, "field": "after"}


def test_spec_error_message_lists_every_issue():
    with pytest.raises(SpecError) as info:
        plan(parse_spec(spec_text("- {id: a, empty: {}, after: [p]}\n- {id: b, empty: {}, after: [q]}\n"),
                        base_dir=SPECS))
    assert info.value.codes == ["unknown_reference", "unknown_reference"]
    assert "'p'" in str(info.value) and "'q'" in str(info.value)


def test_bad_type_parameter_is_reported_once_not_per_use():
    text = textwrap.dedent("""\
        dagbuild: 1
        name: t
        dims: {n: 4}
        types: {wt: f16}
        kernels:
          k:
            code: "extern \\"C\\" __global__ void k(const void* w, int n) {}"
            entry: k
            params: [const wt* w, i32 n]
        buffers:
          w: {dtype: wt, shape: [n]}
        nodes:
          - {id: run, kernel: k, grid: [1], block: [4], args: {w: w, n: n}}
          - {id: clear, memset: {dst: w, value: 0}}
        """)
    assert plan(parse_spec(text)).summary["nodes"] == 2
    issue = only(text, {"wt": "f99"})  # not also the param, the buffer and both nodes that use them
    assert issue.code == "schema" and issue.field == "types.wt" and issue.line == line(text, "types:")
