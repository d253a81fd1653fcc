"""Regression tests for the restructure issue's defects in binding, analysis, DOT and the Python builder,
and for programmatic edges as a spec feature. Each case was accepted (or hung) before."""

from __future__ import annotations

import time

import pytest
import yaml
from conftest import SPECS

from dagbuild import SpecBuilder, dot
from dagbuild.bind import MAX_NODES, bind_scalar
from dagbuild.errors import Issue, SpecError
from dagbuild.ir import Param
from dagbuild.load import from_dict, load_spec, parse_spec
from dagbuild.plan import plan

BASIC = str(SPECS.parent / "kernels" / "basic.cu")


def spec(**extra) -> dict:
    base = {"dagbuild": 1, "name": "t", "dims": {"n": 64},
            "kernels": {"scale": {"source": BASIC, "entry": "scale", "params": ["const f32* x", "f32* y", "f32 a",
                                                                                "i32 n"]}},
            "buffers": {"x": {"dtype": "f32", "shape": ["n"]}, "y": {"dtype": "f32", "shape": ["n"]},
                        "rows": {"dtype": "f32", "shape": [4, "n"]}},
            "nodes": []}
    return base | extra


def scale_node(**args) -> dict:
    return {"id": "s", "kernel": "scale", "grid": [1], "block": [64],
            "args": {"x": "x", "y": "y", "a": 1.0, "n": "n"} | args}


def issues(data: dict, overrides: dict | None = None) -> list[Issue]:
    with pytest.raises(SpecError) as info:
        plan(from_dict(data), overrides)
    return info.value.issues


def one(data: dict, overrides: dict | None = None) -> Issue:
    found = issues(data, overrides)
    assert len(found) == 1, [str(i) for i in found]
    return found[0]


# ---- values that were silently accepted --------------------------------------------------------------------


def test_buffer_whose_byte_size_overflows_64_bits_is_refused():
    i = one(spec(dims={"n": 4096}, buffers={"huge": {"dtype": "f32", "shape": ["n"] * 6}}))
    assert i.code == "out_of_bounds" and i.buffer == "huge" and "64-bit" in i.message


def test_f32_argument_out_of_range_is_refused_not_inf():
    i = one(spec(nodes=[scale_node(a=3.0e40)]))
    assert i.code == "out_of_bounds" and i.field == "args.a" and "does not fit in f32" in i.message
    assert plan(from_dict(spec(nodes=[scale_node(a=float("inf"))]))).nodes[0].op.args[2].value == float("inf")


def test_integer_argument_ranges_are_closed_and_floats_refused():
    p = Param("n", "i32", False, False)
    assert bind_scalar(p, 2**31 - 1, {}) == 2**31 - 1
    for bad in (2**31, 2**40, 2.0, 2.5):
        with pytest.raises(Exception, match="n"):
            bind_scalar(p, bad, {})
    assert one(spec(nodes=[scale_node(n=2**40)])).code == "out_of_bounds"
    assert one(spec(nodes=[scale_node(n=2.0)])).field == "args.n"


def test_a_literal_is_shown_once_in_messages():
    i = one(spec(buffers={"bad": {"dtype": "f32", "shape": [-4]}}))
    assert "shape[0] = -4, must be ≥ 1" in i.message
    i = one(spec(buffers={"bad": {"dtype": "f32", "shape": ["n - 100"]}}))
    assert "shape[0] = 'n - 100' = -36, must be ≥ 1" in i.message


def test_float_view_index_is_refused():
    i = one(spec(nodes=[scale_node(x="rows[2.0]")]))
    assert i.code == "expression" and i.field == "args.x" and "integer" in i.message


def test_memcpy_onto_itself_is_refused():
    i = one(spec(nodes=[{"id": "cp", "memcpy": {"dst": "rows[1]", "src": "rows[1]"}}]))
    assert i.code == "out_of_bounds" and i.nodes == ("cp",) and "overlap" in i.message
    plan(from_dict(spec(nodes=[{"id": "cp", "memcpy": {"dst": "rows[1]", "src": "rows[2]"}}])))  # disjoint: fine


@pytest.mark.parametrize("node_id", ["", "   ", "a\nb"])
def test_empty_or_control_character_node_id_is_refused(node_id):
    i = one(spec(nodes=[{"id": node_id, "empty": {}}]))
    assert i.code == "schema" and "id" in i.message


@pytest.mark.parametrize("name", ["../../../tmp/x", "", "no/such/dir/x", ".hidden", "a b", "x" * 200])
def test_spec_name_that_is_no_plain_file_name_is_refused(name):
    i = one(spec(name=name))
    assert i.code == "schema" and "name" in i.message


def test_kernel_source_that_is_no_kernel_file_is_not_read(tmp_path):
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:secret line\n")
    data = spec(kernels={"k": {"source": str(secret), "entry": "k", "params": ["i32 n"]}})
    i = one(data)
    assert i.code == "unknown_reference" and i.field == "kernels.k.source"
    assert "not a kernel source" in i.message and "root:x" not in i.message


@pytest.mark.parametrize("value", [2.9, True, "12", None])
def test_overrides_are_never_truncated_or_converted(value):
    data = spec(nodes=[{"repeat": {"var": "i", "count": "n // 32"}, "nodes": [{"id": "e.{i}", "empty": {}}]}])
    i = one(data, {"n": value})
    assert i.code == "schema" and i.field == "n" and "integer" in i.message


# ---- checks: a spec's own preconditions ------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, words", [
    ({"hidden": 2001}, "multiples of 8"),
    ({"heads": 3, "kv_heads": 4}, "multiple of kv_heads"),
    ({"batch": 4, "cache_batch": 1}, "cache_batch"),
])
def test_llama_preconditions_are_part_of_validation(overrides, words):
    with pytest.raises(SpecError) as info:
        plan(load_spec(SPECS / "llama_decode.yaml"), overrides)
    checks = [i for i in info.value.issues if i.code == "check"]
    assert any(words in i.message for i in checks), [str(i) for i in info.value.issues]
    assert all(i.line is not None and i.field.startswith("checks[") for i in checks)


def test_check_names_the_failing_values():
    data = spec(checks=[{"expr": "n % 128 == 0", "message": "n must be a multiple of 128"}])
    i = one(data)
    assert i.code == "check" and "n=64" in i.message and "multiple of 128" in i.message
    plan(from_dict(data), {"n": 256})


# ---- sizes: hostile specs answer fast --------------------------------------------------------------------------


def test_flat_spec_of_100000_nodes_validates_in_time():
    data = {"dagbuild": 1, "name": "flat", "nodes": [{"id": f"n{i}", "empty": {}} for i in range(100_000)]}
    t0 = time.perf_counter()
    p = plan(from_dict(data))
    assert len(p.nodes) == 100_000 and p.summary["max_width"] == 100_000 and not p.summary["max_width_exact"]
    assert time.perf_counter() - t0 < 20


def test_repeat_of_20000_dependent_kernels_validates_in_time():
    data = spec(dims={"n": 64, "steps": 20_000},
                nodes=[{"repeat": {"var": "i", "count": "steps"}, "nodes": [dict(scale_node(x="y"), id="s.{i}")]}])
    t0 = time.perf_counter()
    p = plan(from_dict(data))
    assert p.summary["critical_path"] == 20_000 and p.summary["edges_reduced"] == 19_999
    assert time.perf_counter() - t0 < 20


@pytest.mark.parametrize("count", ["n * n * n * n * n * n", "1000000000000"])
def test_repeat_past_the_node_limit_fails_at_once(count):
    data = spec(dims={"n": 4096}, nodes=[{"repeat": {"var": "i", "count": count},
                                          "nodes": [{"id": "e.{i}", "empty": {}}]}])
    t0 = time.perf_counter()
    i = one(data)
    assert i.code == "size_limit" and str(MAX_NODES) in i.message
    assert time.perf_counter() - t0 < 2


def test_a_switch_around_a_huge_repeat_fails_at_once():
    """A count of 1 (a switch) is not multiplied out ahead; the huge repeat inside it still is."""
    inner = {"repeat": {"var": "b", "count": 10**12}, "nodes": [{"id": "e.{b}", "empty": {}}]}
    t0 = time.perf_counter()
    assert one(spec(nodes=[{"repeat": {"var": "a", "count": 1}, "nodes": [inner]}])).code == "size_limit"
    assert time.perf_counter() - t0 < 2


def test_nested_repeats_multiply_before_expanding():
    inner: dict = {"id": "e.{a}.{b}.{c}", "empty": {}}
    for var in "cba":
        inner = {"repeat": {"var": var, "count": 1000}, "nodes": [inner]}
    t0 = time.perf_counter()
    assert one(spec(nodes=[inner])).code == "size_limit"
    assert time.perf_counter() - t0 < 2


# ---- the Python builder, DOT -------------------------------------------------------------------------------


def test_builder_repeat_var_works_in_views_and_expressions():
    g = SpecBuilder("t", dims={"n": 64, "layers": 3}, base_dir=SPECS)
    g.kernel("scale", source="../kernels/basic.cu", entry="scale", params=["const f32* x", "f32* y", "f32 a", "i32 n"])
    g.buffer("w", "f32", ["layers", "n"]).buffer("y", "f32", ["n"])
    with g.repeat("l", "layers") as layer:
        g.launch(f"s.{layer}", "scale", grid=[1], block=[64],
                 args={"x": f"w[{layer}]", "y": "y", "a": f"{layer} + 1", "n": "n"})
    p = plan(g.spec())
    assert [n.op.args[0].view.label for n in p.nodes] == ["w[0]", "w[1]", "w[2]"]
    assert [n.op.args[2].value for n in p.nodes] == [1.0, 2.0, 3.0]


def test_dot_labels_show_bound_views_and_clusters_follow_spec_order():
    p = plan(load_spec(SPECS / "layers.yaml"))
    text = dot.to_dot(p)
    assert "act[layers % 2]" not in text and "act[0] → y_host" in text
    assert text.index('"upload"') < text.index("cluster_0") < text.index('"download"')


# ---- programmatic edges ----------------------------------------------------------------------------------------

WAITS = r'''
extern "C" __global__ void step(const float* x, float* y, int n) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i] + 1.0f;
}
'''
NO_WAIT = 'extern "C" __global__ void step(const float* x, float* y, int n) { if (threadIdx.x < n) y[0] = x[0]; }'


def pdl_spec(code: str = WAITS, launch: str = "programmatic") -> dict:
    return {"dagbuild": 1, "name": "pdl", "dims": {"n": 256},
            "kernels": {"step": {"code": code, "entry": "step", "launch": launch,
                                 "params": ["const f32* x", "f32* y", "i32 n"]}},
            "buffers": {"h": {"dtype": "f32", "shape": ["n"], "memory": "pinned"},
                        "a": {"dtype": "f32", "shape": ["n"]}, "b": {"dtype": "f32", "shape": ["n"]}},
            "nodes": [{"id": "up", "memcpy": {"dst": "a", "src": "h"}},
                      {"id": "k1", "kernel": "step", "grid": [1], "block": [256],
                       "args": {"x": "a", "y": "b", "n": "n"}},
                      {"id": "k2", "kernel": "step", "grid": [1], "block": [256],
                       "args": {"x": "b", "y": "a", "n": "n"}},
                      {"id": "down", "memcpy": {"dst": "h", "src": "a"}}]}


def test_programmatic_edges_join_kernels_only():
    p = plan(from_dict(pdl_spec()))
    assert p.edges == [("up", "k1"), ("k1", "k2"), ("k2", "down")]
    assert [p.edge_kind(u, v) for u, v in p.edges] == ["plain", "programmatic", "plain"]
    assert p.summary["edges_programmatic"] == 1


def test_programmatic_launch_on_a_memcpy_node_is_refused():
    data = pdl_spec()
    data["nodes"][3]["launch"] = "programmatic"
    i = one(data)
    assert i.code == "launch_config" and i.nodes == ("down",) and i.field == "launch" and "kernel" in i.message


def test_node_launch_overrides_the_kernel():
    data = pdl_spec(launch="plain")
    data["nodes"][2]["launch"] = "programmatic"
    p = plan(from_dict(data))
    assert p.edge_kind("k1", "k2") == "programmatic"


def test_dot_draws_programmatic_edges_apart():
    text = dot.to_dot(plan(from_dict(pdl_spec())))
    assert '"k1" -> "k2" [color=' in text and '"up" -> "k1";' in text


def test_yaml_round_trip_keeps_launch_and_checks():
    data = pdl_spec()
    data["checks"] = [{"expr": "n % 2 == 0", "message": "even"}]
    s = from_dict(data)
    back = parse_spec(s.to_yaml())
    assert back == s and yaml.safe_load(s.to_yaml())["kernels"]["step"]["launch"] == "programmatic"


nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="NVRTC (cuda-bindings) is not installed")


def test_compile_check_refuses_a_programmatic_kernel_without_the_wait():
    from dagbuild.kernels import check_plan

    assert "step" in check_plan(plan(from_dict(pdl_spec())), arch="sm_90")
    with pytest.raises(SpecError) as info:  # through YAML, so that the issue has a line
        check_plan(plan(parse_spec(from_dict(pdl_spec(NO_WAIT)).to_yaml())), arch="sm_90")
    (i,) = info.value.issues
    assert i.code == "signature" and i.nodes == ("k2",) and "'step'" in i.message and "griddepcontrol.wait" in i.message
    assert i.line is not None and i.field == "launch"
    check_plan(plan(from_dict(pdl_spec(NO_WAIT, launch="plain"))), arch="sm_90")  # plain edges: fine


def test_compile_and_signature_issues_carry_the_kernel_line():
    from dagbuild.kernels import check_plan

    text = (SPECS / "chain.yaml").read_text().replace("params: [f32 a, const f32* x, f32* y, i32 n]",
                                                       "params: [f32 a, const f32* x, f32* y, f64 n]")
    p = plan(parse_spec(text, base_dir=SPECS))
    with pytest.raises(SpecError) as info:
        check_plan(p, arch="sm_90")
    (i,) = info.value.issues
    line = next(k + 1 for k, ln in enumerate(text.splitlines()) if ln.strip().startswith("saxpy:"))
    assert i.code == "signature" and i.line == line and i.field == "n"


def test_one_compile_per_source_without_the_disk_cache(monkeypatch):
    from dagbuild import kernels

    monkeypatch.setenv("DAGBUILD_CACHE_DIR", "")
    monkeypatch.setattr(kernels, "_PTX_CACHE", {})
    calls = []
    real = kernels.compile_ptx
    monkeypatch.setattr(kernels, "compile_ptx", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    p = plan(load_spec(SPECS / "llama_decode.yaml"), {"wt": "f32"})
    kernels.check_plan(p, arch="sm_90")
    assert len(calls) == 1 and len(p.kernels) > 5


def test_yaml_with_more_nodes_than_the_limit_stops_reading_there():
    text = "dagbuild: 1\nname: big\nnodes:\n" + "".join(f"  - {{id: n{i}, empty: {{}}}}\n"
                                                        for i in range(MAX_NODES + 10))
    t0 = time.perf_counter()
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    (i,) = info.value.issues
    assert i.code == "size_limit" and str(MAX_NODES) in i.message and i.line == MAX_NODES + 4
    assert time.perf_counter() - t0 < 20
