"""The Python DSL builds the same GraphSpec as the YAML (with ``Graph.repeat``) and the same plan and
edges when ``repeat`` is replaced by Python loops."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import SPECS

from dagbuild import Graph
from dagbuild.errors import SpecError
from dagbuild.ir import KernelArg, View
from dagbuild.load import load_spec, parse_spec
from dagbuild.plan import plan

BASIC = "../kernels/basic.cu"


def layers_graph(loops: bool) -> Graph:
    g = Graph("layers", dims={"batch": 1, "n": 1024, "layers": 4}, base_dir=SPECS)
    g.kernel("gemv", source=BASIC, entry="gemv_f16",
             params=["const f16* w", "const f32* x", "f32* y", "i32 n", "i32 batch"])
    g.buffer("x_host", "f32", ["batch", "n"], memory="pinned")
    g.buffer("y_host", "f32", ["batch", "n"], memory="pinned")
    g.buffer("w", "f16", ["layers", "n", "n"])
    g.buffer("act", "f32", [2, "batch", "n"])
    g.memcpy("upload", dst="act[0]", src="x_host")
    if loops:
        for layer in range(4):
            g.launch(f"proj.{layer}", "gemv", grid=["ceil_div(n, 8)"], block=[256],
                     args={"w": f"w[{layer}]", "x": f"act[{layer % 2}]", "y": f"act[{(layer + 1) % 2}]",
                           "n": "n", "batch": "batch"})
    else:
        with g.repeat("l", "layers") as layer:
            g.launch(f"proj.{layer}", "gemv", grid=["ceil_div(n, 8)"], block=[256],
                     args={"w": "w[l]", "x": "act[l % 2]", "y": "act[(l + 1) % 2]", "n": "n", "batch": "batch"})
    g.memcpy("download", dst="y_host", src="act[layers % 2]")
    return g


def chain_graph(loops: bool, steps: int = 8) -> Graph:
    g = Graph("saxpy_chain", dims={"n": 4096, "steps": steps}, base_dir=SPECS)
    g.kernel("saxpy", source=BASIC, entry="saxpy", params=["f32 a", "const f32* x", "f32* y", "i32 n"])
    for name, memory in (("x_host", "pinned"), ("y_host", "pinned"), ("x", "device"), ("y", "device")):
        g.buffer(name, "f32", ["n"], memory=memory)
    g.memcpy("upload", dst="x", src="x_host").memset("zero", dst="y", value=0)
    step = dict(grid=["ceil_div(n, 256)"], block=[256], args={"a": 0.5, "x": "x", "y": "y", "n": "n"})
    if loops:
        for s in range(steps):
            g.launch(f"step.{s}", "saxpy", **step)
    else:
        with g.repeat("s", "steps") as s:
            g.launch(f"step.{s}", "saxpy", **step)
    g.memcpy("download", dst="y_host", src="y")
    return g


def fanout_graph(loops: bool) -> Graph:
    depth = 4
    g = Graph("fanout4", dims={"n": 256, "depth": depth, "iters": 2000}, base_dir=SPECS)
    g.kernel("spin", source=BASIC, entry="spin", params=["const f32* x", "f32* y", "i32 n", "i32 iters"])
    g.kernel("add", source=BASIC, entry="add", params=["const f32* a", "const f32* b", "f32* out", "i32 n"])
    g.buffer("x_host", "f32", ["n"], memory="pinned").buffer("out_host", "f32", ["n"], memory="pinned")
    g.buffer("x", "f32", ["n"]).buffer("lanes", "f32", [4, 2, "n"]).buffer("pair", "f32", [2, "n"])
    g.buffer("out", "f32", ["n"])
    g.memcpy("upload", dst="x", src="x_host")
    spin = dict(grid=["ceil_div(n, 128)"], block=[128])
    if loops:
        for b in range(4):
            g.launch(f"branch{b}.0", "spin", **spin, args={"x": "x", "y": f"lanes[{b}, 0]", "n": "n", "iters": "iters"})
            for d in range(depth - 1):
                g.launch(f"branch{b}.{d + 1}", "spin", **spin,
                         args={"x": f"lanes[{b}, {d % 2}]", "y": f"lanes[{b}, {(d + 1) % 2}]", "n": "n",
                               "iters": "iters"})
    else:
        with g.repeat("b", 4) as b:
            g.launch(f"branch{b}.0", "spin", **spin, args={"x": "x", "y": "lanes[b, 0]", "n": "n", "iters": "iters"})
            with g.repeat("d", "depth - 1"):
                g.launch(f"branch{b}.{{d+1}}", "spin", **spin,
                         args={"x": "lanes[b, d % 2]", "y": "lanes[b, (d + 1) % 2]", "n": "n", "iters": "iters"})
    add = dict(grid=["ceil_div(n, 256)"], block=[256])
    last = "(depth - 1) % 2"
    for node_id, i, out in (("sum01", 0, "pair[0]"), ("sum23", 2, "pair[1]")):
        g.launch(node_id, "add", **add, args={"a": f"lanes[{i}, {last}]", "b": f"lanes[{i + 1}, {last}]", "out": out,
                                              "n": "n"})
    g.launch("total", "add", **add, args={"a": "pair[0]", "b": "pair[1]", "out": "out", "n": "n"})
    g.memcpy("download", dst="out_host", src="out")
    return g


def diamond_graph() -> Graph:
    g = Graph("diamond", dims={"n": 8192}, base_dir=SPECS)
    g.kernel("scale", source=BASIC, entry="scale", params=["const f32* x", "f32* y", "f32 a", "i32 n"])
    g.kernel("add", source=BASIC, entry="add", params=["const f32* a", "const f32* b", "f32* out", "i32 n"])
    g.buffer("x_host", "f32", ["n"], "pinned").buffer("out_host", "f32", ["n"], "pinned")
    g.buffer("x", "f32", ["n"]).buffer("halves", "f32", [2, "n"]).buffer("out", "f32", ["n"])
    g.memcpy("upload", dst="x", src="x_host")
    launch = dict(grid=["ceil_div(n, 256)"], block=[256])
    g.launch("left", "scale", **launch, args={"x": "x", "y": "halves[0]", "a": 2.0, "n": "n"})
    g.launch("right", "scale", **launch, args={"x": "x", "y": "halves[1]", "a": -3.0, "n": "n"})
    g.launch("join", "add", **launch, args={"a": "halves[0]", "b": "halves[1]", "out": "out", "n": "n"})
    g.memcpy("download", dst="out_host", src="out")
    return g


REPEAT_BUILDERS = {"layers": lambda: layers_graph(False), "chain": lambda: chain_graph(False),
                   "fanout4": lambda: fanout_graph(False), "diamond": diamond_graph}
LOOP_BUILDERS = {"layers": lambda: layers_graph(True), "chain": lambda: chain_graph(True),
                 "fanout4": lambda: fanout_graph(True), "diamond": diamond_graph}


def _bound(value):
    """A payload field with views reduced to their byte ranges (the text "w[2]" vs "w[l]" may differ)."""
    if isinstance(value, View):
        return (value.buffer, value.offset, value.nbytes, value.label)
    if isinstance(value, KernelArg):
        return (value.param, value.value, _bound(value.view))
    if isinstance(value, tuple):
        return tuple(_bound(v) for v in value)
    return value


def node_facts(p) -> list[tuple]:
    """Everything about a plan node except where in the spec it came from (paths, repeat frames)."""
    return [(n.id, type(n.op), {f.name: _bound(getattr(n.op, f.name)) for f in dataclasses.fields(n.op)},
             tuple((v.buffer, v.offset, v.nbytes) for v in n.reads),
             tuple((v.buffer, v.offset, v.nbytes) for v in n.writes), n.after) for n in p.nodes]


@pytest.mark.parametrize("name", sorted(REPEAT_BUILDERS))
def test_dsl_with_repeat_equals_yaml_spec(name):
    built = REPEAT_BUILDERS[name]().spec()
    yaml_spec = load_spec(SPECS / f"{name}.yaml")
    assert built == yaml_spec
    assert plan(built).edges == plan(yaml_spec).edges


@pytest.mark.parametrize("name", sorted(LOOP_BUILDERS))
def test_dsl_with_loops_gives_the_same_plan(name):
    looped = plan(LOOP_BUILDERS[name]().spec())
    yaml_plan = plan(load_spec(SPECS / f"{name}.yaml"))
    assert looped.edges == yaml_plan.edges
    assert [(n.id, n.kind) for n in looped.nodes] == [(n.id, n.kind) for n in yaml_plan.nodes]
    # views differ only in their text ("w[2]" vs "w[l]"): node_facts compares byte ranges and bound labels
    assert node_facts(looped) == node_facts(yaml_plan)
    assert looped.summary | {"dims": None} == yaml_plan.summary | {"dims": None}


def test_loops_and_repeat_differ_as_specs_but_not_as_plans():
    assert chain_graph(True).spec() != chain_graph(False).spec()
    assert plan(chain_graph(True, steps=3).spec()).edges == plan(chain_graph(False).spec(), steps=3).edges


def test_dsl_spec_round_trips_through_yaml():
    spec = fanout_graph(False).spec()
    assert parse_spec(spec.to_yaml(), base_dir=SPECS) == spec


def test_repeat_yields_the_template_and_nests():
    g = Graph("t", dims={"n": 2})
    with g.repeat("i", "n") as i:
        assert i == "{i}"
        with g.repeat("j", 3) as j:
            g.empty(f"e.{i}.{j}")
        g.empty(f"after_inner.{i}", after=[f"e.{i}.2"])
    g.empty("last", after=["after_inner.{n - 1}"])
    p = plan(g.spec())
    assert [n.id for n in p.nodes] == ["e.0.0", "e.0.1", "e.0.2", "after_inner.0", "e.1.0", "e.1.1", "e.1.2",
                                       "after_inner.1", "last"]
    assert p.edges == [("e.0.2", "after_inner.0"), ("e.1.2", "after_inner.1"), ("after_inner.1", "last")]


def test_repeat_block_closes_even_on_error():
    g = Graph("t")
    with pytest.raises(RuntimeError), g.repeat("i", 2):
        raise RuntimeError
    g.empty("outside")
    assert [type(n).__name__ for n in g.spec().nodes] == ["RepeatBlock", "EmptyNode"]


def test_methods_chain():
    g = Graph("t").dim("n", 8).buffer("x", "f32", ["n"]).memset("z", dst="x", value=1.0).empty("e", after=["z"])
    assert isinstance(g, Graph)
    p = plan(g.spec())
    assert p.edges == [("z", "e")] and p.dims == {"n": 8}


def test_dsl_inline_kernel_options_and_types():
    g = Graph("t", dims={"n": 16}, types={"wt": "f16"}, deps="explicit")
    g.kernel("k", code='extern "C" __global__ void k(const void* w, int n) {}', entry="k",
             params=["const wt* w", "i32 n"], options=["-lineinfo"])
    g.buffer("w", "wt", ["n"])
    g.launch("a", "k", grid=[1], block=[16], shared="n * 4", args={"w": "w", "n": "n"})
    spec = g.spec()
    assert spec.deps == "explicit" and spec.types == {"wt": "f16"} and spec.kernels["k"].options == ["-lineinfo"]
    node = plan(spec).nodes[0]
    assert node.op.shared == 64 and node.op.args[0].param.dtype == "f16"


def test_dsl_schema_error_is_spec_error_naming_node():
    g = Graph("t")
    g._data["nodes"].append({"id": "odd", "memset": {"dst": "x"}, "empty": {}})
    with pytest.raises(SpecError) as info:
        g.spec()
    (issue,) = info.value.issues
    assert issue.code == "schema" and issue.nodes == ("odd",) and issue.line is None


def test_dsl_validation_errors_match_yaml():
    g = Graph("t", dims={"n": 4})
    g.buffer("x", "f32", ["n"])
    g.memset("a", dst="x[9]")
    g.memset("a", dst="x")
    with pytest.raises(SpecError) as info:
        plan(g.spec())
    assert [(i.code, i.nodes) for i in info.value.issues] == [("out_of_bounds", ("a",)), ("duplicate_id", ("a",))]
