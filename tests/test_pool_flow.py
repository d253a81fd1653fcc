"""The pool's shortcut: when may a bucket reuse the largest bucket's DAG without re-inferring edges?"""

from __future__ import annotations

import textwrap

import pytest
from conftest import SPECS

from dagbuild import load_spec, parse_spec, plan
from dagbuild.dag import full_graph
from dagbuild.pool import _flow_fixed


@pytest.mark.parametrize("name, bucketed, fixed", [
    ("llama_decode", {"batch"}, True),      # only whole activations and k_cache[l]-style views
    ("chain", {"n"}, True),
    ("layers", {"layers"}, False),          # act[layers % 2]
    ("fanout4", {"depth"}, False),          # lanes[b, (depth - 1) % 2]
    ("fanout4", {"n"}, True),
])
def test_flow_fixed_on_shipped_specs(name, bucketed, fixed):
    assert _flow_fixed(load_spec(SPECS / f"{name}.yaml"), bucketed) is fixed


def test_after_templates_count():
    spec = parse_spec(textwrap.dedent("""
        dagbuild: 1
        name: t
        dims: {k: 2}
        nodes:
          - {id: a.0, empty: {}}
          - {id: a.1, empty: {}}
          - {id: b, empty: {}, after: ["a.{k - 1}"]}
    """))
    assert _flow_fixed(spec, {"k"}) is False and _flow_fixed(spec, {"other"}) is True


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_fixed_flow_really_gives_the_same_edges(batch):
    """The claim behind the shortcut, checked: same ids and edges at other batch sizes."""
    spec = load_spec(SPECS / "llama_decode.yaml")
    big = plan(spec, {"batch": 16, "cache_batch": 16, "layers": 2})
    small = plan(spec, {"batch": batch, "cache_batch": 16, "layers": 2})
    assert [n.id for n in small.nodes] == [n.id for n in big.nodes]
    assert set(full_graph(small).edges) == set(full_graph(big).edges) and small.edges == big.edges


@pytest.mark.parametrize("buckets, kwargs, error, words", [
    ({}, {}, "BuildError", "at least one bucketed dim"),
    ({"width": [1, 2]}, {}, "SpecError", "'width' is not a dim"),
    ({"batch": [0, 2]}, {}, "BuildError", "integers ≥ 1"),
    ({"batch": [1, 2]}, {"method": "bogus"}, "BuildError", "method must be"),
])
def test_pool_arguments_are_checked_before_any_gpu_work(buckets, kwargs, error, words):
    import dagbuild
    from dagbuild.pool import GraphPool

    with pytest.raises(getattr(dagbuild, error)) as e:
        GraphPool(load_spec(SPECS / "llama_decode.yaml"), buckets, **kwargs)
    assert words in str(e.value)


def test_shared_bindings_follow_the_types():
    """A pool's binds share the kernels bound once per set of types: another `wt` binds its own entries."""
    from dagbuild.bind import bind

    spec = load_spec(SPECS / "llama_decode_fused.yaml")
    programs: dict = {}
    dims = {"batch": 16, "cache_batch": 16, "layers": 2}
    f16, issues = bind(spec, dims, programs)
    assert not issues
    bf16, issues = bind(spec, {**dims, "wt": "bf16"}, programs)
    assert not issues
    again, _ = bind(spec, dims, programs)
    for name in ("tc_store_1", "attn_qkv_mma"):
        assert f16.kernels[name].entry.endswith("_f16") and bf16.kernels[name].entry.endswith("_bf16"), name
        assert again.kernels[name] == f16.kernels[name], name
    again.kernels.pop("tc_store_1")  # a plan's kernels are its own: the shared ones stay whole
    assert "tc_store_1" in bind(spec, dims, programs)[0].kernels


def test_shared_bindings_keep_reporting_a_bad_type():
    """A bind through a pool's shared cache reports a bad type every time, naming the type, as a fresh bind does."""
    from dagbuild.bind import bind

    spec = load_spec(SPECS / "llama_decode_fused.yaml")
    programs: dict = {}
    dims = {"batch": 16, "cache_batch": 16, "layers": 2, "wt": "f99"}
    fresh = [str(i) for i in bind(spec, dims)[1]]
    assert fresh and "type 'wt' = 'f99'" in fresh[0]
    for _ in range(2):
        assert [str(i) for i in bind(spec, dims, programs)[1]] == fresh


def test_shared_bindings_give_fresh_plans_and_share_the_args_that_stay():
    """Binds through one ``programs`` (a pool's buckets) give every bucket the plan a fresh bind gives; an arg
    that is the same in two buckets (a weight's view, a model dim) is one object, one that follows the batch
    is not; and a value that breaks a compiled node falls back to the validating binder's named error."""
    from dagbuild.bind import bind

    spec = load_spec(SPECS / "llama_decode_fused.yaml")
    programs: dict = {}
    base = {"cache_batch": 300, "max_seq": 64, "layers": 2}
    plans = {}
    for batch in (8, 1, 2, 8, 40, 300, 72, 8, 40):  # repeats: validated, compiled, then compiled again
        plans[batch], issues = bind(spec, {**base, "batch": batch}, programs)
        fresh, fresh_issues = bind(spec, {**base, "batch": batch}, {})
        assert not issues and not fresh_issues
        assert [(n.id, n.op) for n in plans[batch].nodes] == [(n.id, n.op) for n in fresh.nodes], batch
    again, _ = bind(spec, {**base, "batch": 16}, programs)
    args = {n: {a.param.name: a for a in p.node_by_id["gate_up_gemm.1"].op.args} for n, p in ((8, plans[8]),
                                                                                              (16, again))}
    assert args[8]["w"] is args[16]["w"] and args[8]["k"] is args[16]["k"]
    assert args[8]["a"] is not args[16]["a"] and args[8]["m"].value == 8 and args[16]["m"].value == 16
    big = {**base, "batch": 8, "hidden": 2**31}  # sizes that overflow an i32 arg
    issues = [str(i) for i in bind(spec, big, programs)[1]]
    assert issues == [str(i) for i in bind(spec, big, {})[1]] and "'embed': arg 'hidden'" in issues[0]
    assert "does not fit in i32" in issues[0]
