"""Child-graph nodes on the CPU: declarations validated (undeclared reads/writes, calls, args, sizes), edges
and races from the declared views, DOT, YAML round trip; the prefill spec pairs with the fused decode spec."""

from __future__ import annotations

import pytest
from conftest import SPECS

from dagbuild import plan
from dagbuild.dot import to_dot
from dagbuild.errors import SpecError
from dagbuild.ir import ChildOp
from dagbuild.load import load_spec, parse_spec

BASE = """
dagbuild: 1
name: childtest
deps: {deps}
dims: {{m: 16, n: 32, k: 64}}
kernels:
  scale: {{code: "extern \\"C\\" __global__ void scale(float* y, int n) {{}}", entry: scale, params: [f32* y, i32 n]}}
buffers:
  a: {{dtype: f16, shape: [m, k]}}
  w: {{dtype: f16, shape: [2, n, k]}}
  w32: {{dtype: f32, shape: [n, k]}}
  y: {{dtype: f32, shape: [m, n]}}
  ws: {{dtype: u8, shape: [4096]}}
nodes:
  - id: mm
    child:
      reads: {reads}
      writes: {writes}
      body:
        - {{call: {call}, args: {args}}}
  - {{id: s, kernel: scale, grid: [1], block: [32], args: {{y: y, n: m * n}}}}
"""
ARGS = '{a: a, b: "w[0]", c: y, m: m, n: n, k: k, workspace: ws}'


def _spec(reads='[a, "w[0]"]', writes="[y, ws]", call="gemm", args=ARGS, deps="infer"):
    return parse_spec(BASE.format(reads=reads, writes=writes, call=call, args=args, deps=deps))


def _issue(**kw):
    with pytest.raises(SpecError) as e:
        plan(_spec(**kw))
    assert len(e.value.issues) == 1, e.value.issues
    return e.value.issues[0]


def test_valid_child_node_binds_and_orders_by_declared_views():
    p = plan(_spec())
    op = p.node_by_id["mm"].op
    assert isinstance(op, ChildOp) and op.body[0].call == "gemm"
    assert {v.label for v in op.reads} == {"a", "w[0]"} and {v.label for v in op.writes} == {"y", "ws"}
    assert op.body[0].arg("m").value == 16 and op.body[0].arg("alpha").value == 1.0
    assert op.body[0].arg("a").param.dtype == "f16" and op.body[0].arg("ldc") is None
    assert p.edges == [("mm", "s")]
    assert p.summary["nodes_by_kind"]["child"] == 1


def test_undeclared_read_is_an_error_naming_node_call_param_and_view():
    issue = _issue(reads="[a]")
    assert issue.code == "undeclared" and issue.nodes == ("mm",) and issue.buffer == "w"
    assert "reads 'w[0]'" in issue.message and "'b'" in issue.message and "gemm" in issue.message
    assert issue.field == "child.body.0.args.b" and issue.line is not None


def test_write_declared_only_as_read_is_an_error():
    issue = _issue(reads='[a, "w[0]", y]', writes="[ws]")
    assert issue.code == "undeclared" and issue.buffer == "y" and "writes 'y'" in issue.message


def test_a_declared_view_must_cover_the_whole_access():
    issue = _issue(reads='[a, "w[0]"]', writes="[y]")  # the workspace is written too
    assert issue.code == "undeclared" and issue.buffer == "ws"
    issue = _issue(reads='[a, "w[1]"]')
    assert issue.code == "undeclared" and "w[0]" in issue.message


def test_call_and_argument_errors():
    assert _issue(call="gemmm").code == "unknown_reference"
    issue = _issue(args='{a: a, b: "w[0]", c: y, m: m, n: n, k: k, bogus: 1}')
    assert issue.code == "arg_mismatch" and "bogus" in issue.message
    issue = _issue(args='{a: a, b: "w[0]", c: y, m: m, n: n}')
    assert issue.code == "arg_mismatch" and "missing arg 'k'" in issue.message
    issue = _issue(reads='[a, w32]', args='{a: a, b: w32, c: y, m: m, n: n, k: k}', writes="[y]")
    assert issue.code == "arg_mismatch" and "one dtype" in issue.message
    issue = _issue(args='{a: a, b: "w[0]", c: y, m: m * 2, n: n, k: k}', writes="[y]")
    assert issue.code == "arg_mismatch" and "need" in issue.message and "'a'" in issue.message
    issue = _issue(args='{a: a, b: "w[0]", c: y, m: m, n: n, k: k, ldc: 3}', writes="[y]")
    assert issue.code == "arg_mismatch" and "ldc" in issue.message
    issue = _issue(args='{a: 3, b: "w[0]", c: y, m: m, n: n, k: k}', writes="[y]")
    assert issue.code == "arg_mismatch" and "buffer view" in issue.message
    issue = _issue(reads='[a, "w[0]", nothere]')
    assert issue.code == "unknown_reference" and issue.field == "child.reads.2"


def test_undeclared_child_access_never_reaches_the_dag_and_races_are_found():
    # explicit deps: a child writing y and a kernel writing y with no path between them race
    with pytest.raises(SpecError) as e:
        plan(_spec(deps="explicit"))
    assert any(i.code == "race" and set(i.nodes) == {"mm", "s"} for i in e.value.issues)


def test_programmatic_launch_on_a_child_is_refused():
    text = BASE.format(reads='[a, "w[0]"]', writes="[y, ws]", call="gemm", args=ARGS, deps="infer")
    text = text.replace("  - id: mm\n", "  - id: mm\n    launch: programmatic\n")
    with pytest.raises(SpecError) as e:
        plan(parse_spec(text))
    assert e.value.issues[0].code == "launch_config" and "child" in e.value.issues[0].message


def test_dot_and_yaml_round_trip():
    spec = _spec()
    dot = to_dot(plan(spec))
    assert '"mm" [label="mm\\nchild graph\\ngemm(' in dot and "box3d" in dot and '"mm" -> "s"' in dot
    assert parse_spec(spec.to_yaml()) == spec


def test_dsl_child_equals_yaml():
    from dagbuild.dsl import SpecBuilder

    spec = _spec()
    g = SpecBuilder("childtest", dims={"m": 16, "n": 32, "k": 64})
    g.kernel("scale", code='extern "C" __global__ void scale(float* y, int n) {}', entry="scale",
             params=["f32* y", "i32 n"])
    for name, dt, shape in (("a", "f16", ["m", "k"]), ("w", "f16", [2, "n", "k"]), ("w32", "f32", ["n", "k"]),
                            ("y", "f32", ["m", "n"]), ("ws", "u8", [4096])):
        g.buffer(name, dt, shape)
    g.child("mm", reads=["a", "w[0]"], writes=["y", "ws"],
            body=[{"call": "gemm", "args": {"a": "a", "b": "w[0]", "c": "y", "m": "m", "n": "n", "k": "k",
                                            "workspace": "ws"}}])
    g.launch("s", "scale", grid=[1], block=[32], args={"y": "y", "n": "m * n"})
    assert plan(g.spec()).edges == plan(spec).edges


# ---- the prefill spec ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [None, "llama_tiny.yaml", "llama32_1b.yaml"])
def test_prefill_spec_shares_the_fused_decode_buffers(config):
    import yaml

    from dagbuild.llama.prefill import SHARED_BUFFERS, prefill_overrides

    ov = yaml.safe_load((SPECS / "configs" / config).read_text()) if config else {}
    dec = plan(load_spec(SPECS / "llama_decode_fused.yaml"), {**ov, "batch": 3, "cache_batch": 4})
    pre = plan(load_spec(SPECS / "llama_prefill.yaml"), {**prefill_overrides(dec), "seq": 64})
    shared = [b for b in SHARED_BUFFERS if b in dec.buffers]
    assert len(shared) == len(SHARED_BUFFERS)
    for name in shared:
        a, b = dec.buffers[name], pre.buffers[name]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
    kinds = pre.summary["nodes_by_kind"]
    assert kinds["child"] == 4 * dec.dims["layers"]
    assert pre.summary["max_width"] <= 2


def test_prefill_pairs_only_with_the_fused_spec():
    from dagbuild.errors import BuildError
    from dagbuild.llama.prefill import prefill_overrides

    with pytest.raises(BuildError, match="fused"):
        prefill_overrides(plan(load_spec(SPECS / "llama_decode.yaml")))


def test_prefill_spec_checks_seq():
    with pytest.raises(SpecError) as e:
        plan(load_spec(SPECS / "llama_prefill.yaml"), {"seq": 1024})
    assert e.value.issues[0].code == "check" and "max_seq" in e.value.issues[0].message


def test_plan_chunks_crosses_buckets():
    from dagbuild.llama.prefill import plan_chunks

    assert plan_chunks([300, 1, 45], [16, 32, 64]) == [(0, 64), (64, 64), (128, 64), (192, 64), (256, 64)]
    assert plan_chunks([200], [16, 64]) == [(0, 64), (64, 64), (128, 64), (192, 16)]
    assert plan_chunks([1], [16, 64]) == [(0, 16)]
    assert plan_chunks([33, 20], [16, 32, 64]) == [(0, 64)]


def test_rebinding_with_compiled_child_bindings_keeps_ops_and_named_errors():
    """A pool's buckets share compiled bindings (``programs``): a child node bound once is bound again from
    closures. The ops equal a fresh bind's, and where other dims break the node (an index out of range, an access
    the declared views no longer cover) the validating binder still names the culprit."""
    from dagbuild.bind import bind

    text = BASE.replace("k: 64}}", "k: 64, j: 0}}").format(
        reads='[a, "w[0]", "w[1]"]', writes="[y, ws]", call="gemm", deps="infer",
        args='{a: a, b: "w[j]", c: y, m: m, n: n, k: k, workspace: ws}')
    spec = parse_spec(text)
    programs: dict = {}
    first, issues = bind(spec, {"j": 1}, programs)
    assert not issues and any(k[0] == "child" for k in programs if isinstance(k, tuple))
    for dims in ({"j": 0}, {"j": 1, "m": 8}):
        again, issues = bind(spec, dims, programs)
        fresh, fresh_issues = bind(spec, dims, {})
        assert not issues and not fresh_issues
        assert again.node_by_id["mm"].op == fresh.node_by_id["mm"].op
    _, issues = bind(spec, {"j": 2}, programs)  # w has 2 rows
    _, fresh_issues = bind(spec, {"j": 2}, {})
    assert issues == fresh_issues and issues[0].code == "out_of_bounds" and "w[j]" in issues[0].message
    # an equal key (the same index and scalar values, the same buffers) returns the op made before; a buffer the
    # node views with another shape (ws of r bytes) or another value makes a new one
    sized = parse_spec(text.replace("j: 0}", "j: 0, r: 4096}").replace("shape: [4096]", "shape: [r]"))
    programs = {}
    ops = [bind(sized, dims, programs)[0].node_by_id["mm"].op  # the first bind validates, later ones compile
           for dims in ({"j": 0}, {"j": 0}, {"j": 0}, {"j": 0, "r": 8192}, {"j": 1})]
    assert ops[0] == ops[1] and ops[1] is ops[2] and ops[3] is not ops[1] and ops[4] is not ops[1]
    assert ops[3] == bind(sized, {"j": 0, "r": 8192}, {})[0].node_by_id["mm"].op
    assert ops[3].writes[1].nbytes == 8192 and ops[4].body[0].args[1].view.index == (1,)
    narrow = parse_spec(text.replace('reads: [a, "w[0]", "w[1]"]', 'reads: [a, "w[0]"]'))
    programs = {}
    assert not bind(narrow, {"j": 0}, programs)[1]
    _, issues = bind(narrow, {"j": 1}, programs)  # reads w[1], declared only w[0]
    assert issues == bind(narrow, {"j": 1}, {})[1] and issues[0].code == "undeclared"
