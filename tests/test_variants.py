"""Kernel-node variants on the CPU: the kernel and launch shape chosen by the dims, validated per bind (errors
name the variant), YAML and DSL round trips, DOT with the chosen kernel, pool bookkeeping."""

from __future__ import annotations

import pytest

import dagbuild
from dagbuild.dot import to_dot
from dagbuild.errors import SpecError
from dagbuild.load import parse_spec

SPEC = """
dagbuild: 1
name: var
dims: {batch: 1, n: 64, big: 8}
kernels:
  small:
    code: 'extern "C" __global__ void small(float* x, int n) {}'
    entry: small
    params: [f32* x, i32 n]
  wide:
    code: 'extern "C" __global__ void wide(float* x, int n, int rows) {}'
    entry: wide
    params: [f32* x, i32 n, i32 rows]
buffers:
  x: {dtype: f32, shape: [batch, n]}
nodes:
  - id: k
    kernel: small
    grid: [1]
    block: [32]
    args: {x: x, n: n}
    variants:
      - {when: "batch >= 64", kernel: wide, grid: [batch], block: [128], shared: 1024, args: {rows: batch * 2}}
      - {when: "batch >= big", kernel: wide, grid: ["ceil_div(batch, 8)"], args: {rows: batch}}
"""


def _op(spec, **dims):
    return dagbuild.plan(spec, **dims).nodes[0].op


def test_first_holding_variant_wins_else_the_node():
    spec = parse_spec(SPEC)
    op = _op(spec)
    assert (op.kernel, op.grid, op.block, op.shared) == ("small", (1, 1, 1), (32, 1, 1), 0)
    op = _op(spec, batch=8)
    assert (op.kernel, op.grid, op.block) == ("wide", (1, 1, 1), (32, 1, 1))  # block from the node
    assert {a.param.name: a.value for a in op.args if a.view is None} == {"n": 64, "rows": 8}
    op = _op(spec, batch=100)
    assert (op.kernel, op.grid, op.block, op.shared) == ("wide", (100, 1, 1), (128, 1, 1), 1024)
    assert {a.param.name: a.value for a in op.args if a.view is None}["rows"] == 200
    op = _op(spec, batch=8, big=1000)  # a dim moves the threshold
    assert op.kernel == "small"


def test_rebinding_alternates_between_choices():
    """Binds share compiled bindings (a pool's buckets): each bind still gets its own choice."""
    from dagbuild.bind import bind

    spec, programs = parse_spec(SPEC), {}
    for batch, kernel in [(1, "small"), (64, "wide"), (2, "small"), (9, "wide"), (64, "wide")]:
        p, issues = bind(spec, {"batch": batch}, programs)
        assert not issues and p.nodes[0].op.kernel == kernel, batch


def test_variant_errors_name_the_variant():
    bad = SPEC.replace("grid: [batch], block: [128]", "grid: [batch], block: [2048]")
    with pytest.raises(SpecError) as e:
        dagbuild.plan(parse_spec(bad), batch=64)
    msg = str(e.value)
    assert "variants[0]" in msg and "'wide'" in msg and "block" in msg
    dagbuild.plan(parse_spec(bad), batch=1)  # not chosen: not bound
    missing = SPEC.replace("args: {rows: batch}", "args: {}")
    with pytest.raises(SpecError, match=r"variants\[1\].*missing arg 'rows'"):
        dagbuild.plan(parse_spec(missing), batch=9)
    unknown = SPEC.replace('when: "batch >= big"', 'when: "batch >= huge"')
    with pytest.raises(SpecError, match=r"variants\[1\]\.when.*huge"):
        dagbuild.plan(parse_spec(unknown), batch=9)
    nokernel = SPEC.replace("kernel: wide, grid: [batch]", "kernel: nope, grid: [batch]")
    with pytest.raises(SpecError, match="unknown kernel 'nope'"):
        dagbuild.plan(parse_spec(nokernel), batch=64)


def test_yaml_and_dsl_round_trip_and_dot():
    spec = parse_spec(SPEC)
    assert parse_spec(spec.to_yaml()) == spec
    g = dagbuild.SpecBuilder("var", dims={"batch": 1, "n": 64, "big": 8})
    for name, decl in spec.kernels.items():
        g.kernel(name, code=decl.code, entry=decl.entry, params=decl.params)
    g.buffer("x", "f32", ["batch", "n"])
    node = spec.nodes[0]
    g.launch("k", "small", grid=[1], block=[32], args={"x": "x", "n": "n"},
             variants=[v.model_dump(exclude_defaults=True) for v in node.variants])
    assert g.spec() == spec
    assert "wide  100 × 128" in to_dot(dagbuild.plan(spec, batch=100))
    assert "small  1 × 32" in to_dot(dagbuild.plan(spec, batch=2))


def test_pool_bookkeeping_sees_variant_args():
    from dagbuild.pool import _flow_fixed, _kernel_choice

    spec = parse_spec(SPEC)
    assert _flow_fixed(spec, {"batch"})
    moved = parse_spec(SPEC.replace("args: {rows: batch}", "args: {rows: batch, x: 'x[batch - 1]'}"))
    assert not _flow_fixed(moved, {"batch"})  # a variant's view index names the bucketed dim
    assert _kernel_choice(dagbuild.plan(spec, batch=9)) != _kernel_choice(dagbuild.plan(spec, batch=1))


def test_schema_lists_variants():
    from dagbuild.spec import GraphSpec

    schema = GraphSpec.model_json_schema()
    assert "KernelVariant" in str(schema)
