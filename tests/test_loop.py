"""Loop nodes on the CPU: the format (YAML and DSL), validation errors naming the culprit, analysis per
graph, DOT clusters, the loop kernels through NVRTC, and the graph an executable builds (conditional and
unrolled) through a recording backend."""

from __future__ import annotations

import textwrap
from types import SimpleNamespace

import pytest
from conftest import SPECS
from helpers import issues_of, line, needs_nvrtc

import dagbuild
from dagbuild.buffers import BufferMap
from dagbuild.dot import to_dot
from dagbuild.errors import BuildError
from dagbuild.executable import ExecOptions, Executable
from dagbuild.ir import LOOP_ENTER, LOOP_NEXT, LoopOp
from dagbuild.load import parse_spec
from dagbuild.plan import plan

HEAD = """\
dagbuild: 1
name: loopy
dims: {n: 256, K: 8}
kernels:
  step:
    code: |
      extern "C" __global__ void step(int* x, int* done, int n) {}
    entry: step
    params: [i32* x, i32* done, i32 n]
  scale:
    source: ../kernels/basic.cu
    entry: scale
    params: [const f32* x, f32* y, f32 a, i32 n]
buffers:
  x: {dtype: i32, shape: [n]}
  done: {dtype: i32, shape: [1]}
  flags: {dtype: u32, shape: [4]}
  fdone: {dtype: f32, shape: [1]}
  hdone: {dtype: i32, shape: [1], memory: pinned}
  a: {dtype: f32, shape: [n]}
  b: {dtype: f32, shape: [n]}
nodes:
"""

GOOD = """\
- {id: start, memset: {dst: done, value: 0}}
- id: decode
  loop: {max: K, until: done}
  nodes:
    - {id: s1, kernel: step, grid: [1], block: [256], args: {x: x, done: done, n: n}}
    - {id: sc, kernel: scale, grid: [1], block: [256], args: {x: a, y: b, a: 2.0, n: n}}
    - {id: s2, kernel: step, grid: [1], block: [256], args: {x: x, done: done, n: n}}
- {id: out, memset: {dst: x, value: 0}}
"""


def spec_text(body: str, head: str = HEAD) -> str:
    return head + textwrap.dedent(body).lstrip("\n")


# ---- format and analysis --------------------------------------------------------------------------------


def test_loop_plan_scopes_edges_and_summary():
    p = plan(parse_spec(spec_text(GOOD), base_dir=SPECS))
    by_id = p.node_by_id
    assert [n.id for n in p.scoped(None)] == ["start", "decode", "out"]
    assert [n.id for n in p.scoped("decode")] == ["s1", "sc", "s2"]
    op = by_id["decode"].op
    assert isinstance(op, LoopOp) and op.max == 8 and op.until.buffer == "done"
    assert op.body == ("s1", "sc", "s2") and op.counter.buffer == "decode.iter"
    # the top graph orders the loop as one node; the body's edges join body nodes only
    assert set(p.edges) == {("start", "decode"), ("decode", "out"), ("s1", "s2")}
    assert {b for b, _ in [(v.buffer, w) for v, w in op.accesses()]} == {"x", "done", "a", "b"}
    s = p.summary
    assert s["nodes"] == 6 and s["nodes_by_kind"]["loop"] == 1 and s["nodes_by_kind"]["kernel"] == 3
    assert s["loops"] == {"decode": {"max": 8, "body_nodes": 3, "body_critical_path": 2}}
    assert {LOOP_ENTER, LOOP_NEXT} <= set(p.kernels)
    assert p.buffers["decode.iter"].dtype == "i32"


def test_dsl_builds_the_same_spec_as_yaml():
    yaml_spec = parse_spec(spec_text(GOOD), base_dir=SPECS)
    g = dagbuild.SpecBuilder("loopy", dims={"n": 256, "K": 8}, base_dir=SPECS)
    for name, k in yaml_spec.kernels.items():
        g.kernel(name, entry=k.entry, params=k.params, source=k.source, code=k.code)
    for name, b in yaml_spec.buffers.items():
        g.buffer(name, b.dtype, b.shape, memory=b.memory)
    g.memset("start", dst="done", value=0)
    with g.loop("decode", max="K", until="done"):
        g.launch("s1", "step", grid=[1], block=[256], args={"x": "x", "done": "done", "n": "n"})
        g.launch("sc", "scale", grid=[1], block=[256], args={"x": "a", "y": "b", "a": 2.0, "n": "n"})
        g.launch("s2", "step", grid=[1], block=[256], args={"x": "x", "done": "done", "n": "n"})
    g.memset("out", dst="x", value=0)
    spec = g.spec()
    assert spec == yaml_spec
    assert parse_spec(spec.to_yaml(), base_dir=SPECS) == spec  # YAML out and back in


def test_loop_inside_repeat_and_repeat_inside_loop():
    text = spec_text("""
    - repeat: {var: r, count: 2}
      nodes:
        - id: "lp.{r}"
          loop: {max: 3}
          nodes:
            - repeat: {var: j, count: 2}
              nodes:
                - {id: "k.{r}.{j}", kernel: scale, grid: [1], block: [256], args: {x: a, y: b, a: 1.0, n: n}}
    """)
    p = plan(parse_spec(text, base_dir=SPECS))
    assert [n.id for n in p.scoped("lp.1")] == ["k.1.0", "k.1.1"]
    assert ("lp.0", "lp.1") in p.edges and ("k.1.0", "k.1.1") in p.edges
    dot = to_dot(p)
    assert dot.count('label="loop lp.') == 2 and 'label="repeat j × 2"' in dot


def test_nested_loops_union_their_accesses():
    text = spec_text("""
    - id: outer
      loop: {max: 4}
      nodes:
        - id: inner
          loop: {max: 2, until: done}
          nodes:
            - {id: s, kernel: step, grid: [1], block: [256], args: {x: x, done: done, n: n}}
        - {id: sc, kernel: scale, grid: [1], block: [256], args: {x: a, y: b, a: 1.0, n: n}}
    """)
    p = plan(parse_spec(text, base_dir=SPECS))
    outer = p.node_by_id["outer"].op
    assert outer.body == ("inner", "sc")
    assert {v.buffer for v, _ in outer.accesses()} == {"x", "done", "a", "b"}
    assert p.node_by_id["s"].scope == "inner" and p.node_by_id["inner"].scope == "outer"


# ---- validation errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("until, what", [("fdone", "f32"), ("hdone", "pinned"), ("flags", "16 bytes")])
def test_until_of_the_wrong_type(until, what):
    text = spec_text(GOOD.replace("until: done", f"until: {until}"))
    issues = [i for i in issues_of(text) if i.code == "arg_mismatch"]
    assert len(issues) == 1
    i = issues[0]
    assert i.nodes == ("decode",) and i.buffer == until and i.field == "loop.until" and what in i.message
    assert i.line == line(text, "until:")


def test_until_may_be_one_element_of_a_u32_buffer():
    text = spec_text(GOOD.replace("until: done", "until: \"flags[2]\""))
    text = text.replace("- {id: start, memset: {dst: done, value: 0}}",
                        "- {id: start, memset: {dst: flags, value: 0}}")
    text = text.replace("{x: x, done: done, n: n}}\n    - {id: sc", "{x: x, done: done, n: n}}\n"
                        "    - {id: f, memset: {dst: \"flags[2]\", value: 1}}\n    - {id: sc")
    p = plan(parse_spec(text, base_dir=SPECS))
    assert p.node_by_id["decode"].op.until.offset == 8


def test_body_that_never_writes_until_is_an_error():
    """A body reading its condition that nothing in it writes could never stop early."""
    text = spec_text(GOOD.replace("args: {x: x, done: done, n: n}", "args: {x: x, done: x, n: n}"))
    issues = [i for i in issues_of(text) if i.field == "loop.until"]
    assert len(issues) == 1
    i = issues[0]
    assert i.code == "unknown_reference" and i.nodes == ("decode",) and i.buffer == "done"
    assert "no node of its body writes" in i.message and i.line == line(text, "until:")


def test_race_inside_the_body_is_found():
    head = HEAD.replace("name: loopy", "name: loopy\ndeps: explicit")
    text = spec_text("""
    - id: lp
      loop: {max: 2}
      nodes:
        - {id: w1, kernel: scale, grid: [1], block: [256], args: {x: a, y: b, a: 1.0, n: n}}
        - {id: w2, kernel: scale, grid: [1], block: [256], args: {x: a, y: b, a: 2.0, n: n}}
    """, head)
    issues = issues_of(text)
    assert [i.code for i in issues] == ["race"]
    assert issues[0].nodes == ("w1", "w2") and issues[0].buffer == "b" and issues[0].line == line(text, "id: w2")
    ok = text.replace("a: 2.0, n: n}}", "a: 2.0, n: n}, after: [w1]}")
    plan(parse_spec(ok, base_dir=SPECS))


def test_race_between_a_loop_and_a_top_node_is_found():
    head = HEAD.replace("name: loopy", "name: loopy\ndeps: explicit")
    text = spec_text("""
    - id: lp
      loop: {max: 2}
      nodes:
        - {id: w1, kernel: scale, grid: [1], block: [256], args: {x: a, y: b, a: 1.0, n: n}}
    - {id: top, kernel: scale, grid: [1], block: [256], args: {x: b, y: a, a: 1.0, n: n}}
    """, head)
    issues = issues_of(text)
    assert {i.code for i in issues} == {"race"} and issues[0].nodes == ("lp", "top")
    ok = text.replace("{x: b, y: a, a: 1.0, n: n}}", "{x: b, y: a, a: 1.0, n: n}, after: [lp]}")
    assert ("lp", "top") in plan(parse_spec(ok, base_dir=SPECS)).edges


def test_after_across_a_loop_boundary_is_an_error():
    text = spec_text(GOOD.replace("- {id: s2, kernel: step, grid: [1], block: [256], args: {x: x, done: done, n: n}}",
                                  "- {id: s2, kernel: step, grid: [1], block: [256], args: {x: x, done: done, n: n}, "
                                  "after: [start]}"))
    issues = issues_of(text)
    assert [i.code for i in issues] == ["unknown_reference"]
    assert issues[0].nodes == ("s2", "start") and "order the loop node itself" in issues[0].message


@pytest.mark.parametrize("bad, code, needle", [
    ("loop: {max: 0, until: done}", "out_of_bounds", "must be ≥ 1"),
    ("loop: {max: nope, until: done}", "unknown_reference", "nope"),
    ("loop: {max: K, until: nothing}", "unknown_reference", "nothing"),
    ("loop: {max: 6, until: done, unroll: 4}", "out_of_bounds", "divide max = 6"),
    ("loop: {max: K, until: done, unroll: 0}", "out_of_bounds", "unroll = 0"),
    ("loop: {max: K, until: done, unroll: U}", "unknown_reference", "U"),
])
def test_loop_args_errors(bad, code, needle):
    text = spec_text(GOOD.replace("loop: {max: K, until: done}", bad))
    issues = issues_of(text)
    assert [i.code for i in issues] == [code] and needle in issues[0].message
    assert issues[0].nodes == ("decode",) and issues[0].line == line(text, "loop:")


def test_empty_body_and_programmatic_loop_are_errors():
    text = spec_text("- {id: lp, loop: {max: 2}, nodes: []}\n")
    assert [i.code for i in issues_of(text)] == ["schema"]
    text = spec_text(GOOD.replace("  loop: {max: K, until: done}",
                                  "  loop: {max: K, until: done}\n  launch: programmatic"))
    issues = issues_of(text)
    assert [i.code for i in issues] == ["launch_config"] and "loop node" in issues[0].message


def test_a_loop_needs_its_body():
    issues = issues_of(spec_text("- {id: lp, loop: {max: 2}}\n"))
    assert issues[0].code == "schema" and "nodes" in issues[0].message


# ---- DOT -----------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pyparsing's, inside pydot
def test_dot_draws_the_body_as_a_cluster_headed_by_the_loop():
    p = plan(parse_spec(spec_text(GOOD), base_dir=SPECS))
    dot = to_dot(p)
    cluster = dot[dot.index("subgraph cluster_"):]
    cluster = cluster[:cluster.index("\n  }")]
    assert 'label="loop decode: loop ≤ 8 until done"' in cluster
    for nid in ("decode", "s1", "sc", "s2"):
        assert f'"{nid}" [label=' in cluster
    assert '"start" [label=' not in cluster and "doubleoctagon" in cluster
    assert '"start" -> "decode";' in dot and '"decode" -> "out";' in dot and '"s1" -> "s2";' in dot
    assert '"decode" -> "s1" [style=dotted' in dot and '"s2" -> "decode" [style=dotted' in dot
    assert '"sc" -> "decode" [style=dotted' in dot  # sc is a sink of the body too
    pydot = pytest.importorskip("pydot")
    assert pydot.graph_from_dot_data(dot)


# ---- the loop kernels through NVRTC -----------------------------------------------------------------------


@needs_nvrtc
def test_loop_kernels_compile_and_match_their_signatures():
    from dagbuild import kernels

    p = plan(parse_spec(spec_text(GOOD), base_dir=SPECS))
    report = kernels.check_plan(p, "sm_90")
    assert report[LOOP_ENTER]["entry"] == "loop_enter" and report[LOOP_NEXT]["params"] == 4
    ptx = kernels.plan_ptx(p.kernels[LOOP_NEXT].source, LOOP_NEXT, "sm_90", ())
    assert "cudaGraphSetConditional" in ptx


# ---- what an executable builds, through a recording backend -------------------------------------------------


class RecordingBackend:
    """Records graphs, nodes and edges instead of calling a driver."""

    name = "recording"
    programmatic_edges = True

    def __init__(self, conditional: bool = True):
        self.conditional_nodes = conditional
        self.nodes: dict[int, dict] = {}  # handle → {graph, kind, deps, what}
        self.sets: list[tuple] = []
        self.graphs = 0

    def _add(self, graph, kind, deps, what):
        h = len(self.nodes) + 1
        self.nodes[h] = {"graph": graph, "kind": kind, "deps": list(deps), "what": what}
        return h

    def graph_create(self):
        self.graphs += 1
        return ("graph", self.graphs)

    def add_kernel(self, graph, deps, func, grid, block, shared, args):
        return self._add(graph, "kernel", deps, (func, tuple(args)))

    def add_memset(self, graph, deps, *p):
        return self._add(graph, "memset", deps, p)

    def add_memcpy(self, graph, deps, *p):
        return self._add(graph, "memcpy", deps, p)

    def add_empty(self, graph, deps):
        return self._add(graph, "empty", deps, ())

    def add_dependency(self, graph, u, v, kind):
        self.nodes[v]["deps"].append((u, kind))

    def conditional_handle(self, graph):
        return 0xC0DE

    def add_while(self, graph, deps, handle):
        self.graphs += 1
        body = ("body", self.graphs)
        return self._add(graph, "while", deps, handle), body

    def instantiate(self, graph):
        return ("exec", graph)

    def set_kernel(self, ex, node, func, grid, block, shared, args):
        self.sets.append((node, func, tuple(args)))

    def set_memset(self, ex, node, *p):
        self.sets.append((node, p))

    def exec_destroy(self, ex):
        pass

    def graph_destroy(self, g):
        pass


def recorded(p, backend, **options) -> Executable:
    """An Executable's graph building on a recording backend (no CuPy, no memory: addresses are fake)."""
    exe = object.__new__(Executable)
    exe.plan, exe.options, exe.backend = p, ExecOptions(**options), backend
    exe.graph = exe.exec = None
    exe.handles, exe._nodes = {}, {n.id: n for n in p.nodes}
    exe._funcs = {k: 100 + i for i, k in enumerate(p.kernels)}
    exe._refs = {b: SimpleNamespace(ptr=0x10000 * (i + 1)) for i, b in enumerate(p.buffers)}
    exe._copies, exe._named, exe._loops, exe._bodies, exe.phases = {}, {}, {}, [], {}
    exe.buffers, exe._arena, exe._closed, exe._own_graph, exe._built_params = BufferMap(), None, False, True, None
    exe.limits = {"max_threads_per_block": 1024, "max_shared_per_block_optin": 99 * 1024}
    exe.loop_mode = exe._loop_mode()
    exe._build()
    return exe


def test_conditional_build_enter_while_body_next():
    p = plan(parse_spec(spec_text(GOOD), base_dir=SPECS))
    be = RecordingBackend()
    exe = recorded(p, be)
    assert exe.loop_mode == "conditional"
    n = be.nodes
    top = exe.graph
    names = {h: name for name, h in exe._named.items()}
    enter, node = exe._named["decode.enter"], exe.handles["decode"]
    assert n[enter]["graph"] == top and n[enter]["deps"] == [exe.handles["start"]]
    assert n[node]["kind"] == "while" and n[node]["deps"] == [enter] and n[node]["what"] == 0xC0DE
    body = exe._bodies[0]
    in_body = sorted(names[h] for h, v in n.items() if v["graph"] == body)
    assert in_body == ["decode.next", "s1", "s2", "sc"]
    # the loop kernels: until, counter, the handle, max; loop_next after both writers of `until`
    nxt = n[exe._named["decode.next"]]
    assert nxt["what"][0] == exe._funcs[LOOP_NEXT]
    assert nxt["what"][1] == (("ptr", exe._refs["done"].ptr), ("ptr", exe._refs["decode.iter"].ptr),
                              ("u64", 0xC0DE), ("i32", 8))
    assert sorted(names[d] for d in nxt["deps"]) == ["s1", "s2"]
    assert n[exe.handles["s2"]]["deps"] == [exe.handles["s1"]] and n[exe.handles["s1"]]["deps"] == []
    assert n[exe.handles["out"]]["deps"] == [node]
    # update reaches a body node; a rebind of `until` re-sets both loop kernels
    exe.update("sc", args={"a": 3.0})
    assert be.sets[-1][0] == exe.handles["sc"] and ("f32", 3.0) in be.sets[-1][2]
    be.sets.clear()
    exe._push(exe.node("decode"))
    assert [s[0] for s in be.sets] == [enter, exe._named["decode.next"]]


def test_conditional_build_with_copies_per_iteration():
    """unroll: 2 puts two copies of the body in the WHILE node's body graph, joined by an empty node; loop_next
    follows the last copy's writers of `until` and counts iterations (max / unroll)."""
    p = plan(parse_spec(spec_text(GOOD.replace("loop: {max: K, until: done}",
                                               "loop: {max: K, until: done, unroll: 2}")), base_dir=SPECS))
    be = RecordingBackend()
    exe = recorded(p, be)
    n, named = be.nodes, exe._named
    names = {h: name for name, h in named.items()}
    in_body = sorted(names[h] for h, v in n.items() if v["graph"] == exe._bodies[0])
    assert in_body == ["decode.next", "decode~0", "s1~0", "s1~1", "s2~0", "s2~1", "sc~0", "sc~1"]
    assert n[named["s1~0"]]["deps"] == [] and n[named["s1~1"]]["deps"] == [named["decode~0"]]
    assert sorted(names[d] for d in n[named["decode~0"]]["deps"]) == ["s2~0", "sc~0"]
    nxt = n[named["decode.next"]]
    assert sorted(names[d] for d in nxt["deps"]) == ["s1~1", "s2~1"] and nxt["what"][1][-1] == ("i32", 4)
    assert n[named["decode.enter"]]["what"][1][-1] == ("i32", 4)
    exe.update("sc", args={"a": 2.0})
    assert sorted(s[0] for s in be.sets) == sorted(exe._copies["sc"]) and len(exe._copies["sc"]) == 2
    assert "loop ≤ 8 (2 per iteration) until done" in to_dot(p)


def test_unrolled_build_chains_max_copies():
    p = plan(parse_spec(spec_text(GOOD.replace("max: K", "max: 3")), base_dir=SPECS))
    for be, opts in ((RecordingBackend(conditional=False), {}), (RecordingBackend(), {"loops": "unroll"})):
        exe = recorded(p, be, **opts)
        assert exe.loop_mode == "unroll" and not exe._bodies
        n, named = be.nodes, exe._named
        assert all(v["kind"] != "while" for v in n.values()) and "decode.enter" not in named
        assert len(exe._copies["s1"]) == 3 and exe.handles["s1"] == named["s1#0"]
        assert n[named["s1#0"]]["deps"] == [exe.handles["start"]]
        assert n[named["sc#0"]]["deps"] == [exe.handles["start"]]
        for i in (1, 2):
            assert n[named[f"s1#{i}"]]["deps"] == [named[f"decode#{i - 1}"]]
            assert n[named[f"s2#{i}"]]["deps"] == [named[f"s1#{i}"]]
            assert sorted(n[named[f"decode#{i}"]]["deps"]) == sorted([named[f"s2#{i}"], named[f"sc#{i}"]])
        assert n[exe.handles["out"]]["deps"] == [named["decode#2"]]
        exe.update("sc", args={"a": 5.0})
        assert sorted(s[0] for s in be.sets) == sorted(exe._copies["sc"])


def test_serial_build_chains_each_graph():
    p = plan(parse_spec(spec_text(GOOD), base_dir=SPECS))
    be = RecordingBackend()
    exe = recorded(p, be, concurrent=False)
    n = be.nodes
    assert n[exe.handles["sc"]]["deps"] == [exe.handles["s1"]]
    assert n[exe.handles["s1"]]["deps"] == []  # first of its body graph


def test_conditional_loops_on_a_backend_without_them_is_an_error():
    p = plan(parse_spec(spec_text(GOOD), base_dir=SPECS))
    with pytest.raises(BuildError, match="no conditional nodes"):
        recorded(p, RecordingBackend(conditional=False), loops="conditional")


def test_a_moved_view_in_a_body_is_checked_against_the_whole_loop():
    head = HEAD.replace("  b: {dtype: f32, shape: [n]}",
                        "  b: {dtype: f32, shape: [n]}\n  rows: {dtype: f32, shape: [2, n]}")
    text = spec_text("""
    - id: lp
      loop: {max: 2}
      nodes:
        - {id: w, kernel: scale, grid: [1], block: [256], args: {x: a, y: "rows[0]", a: 1.0, n: n}}
    - {id: other, memset: {dst: "rows[1]", value: 0}}
    - {id: after_all, kernel: scale, grid: [1], block: [256], args: {x: rows, y: b, a: 1.0, n: 512}}
    """, head)
    p = plan(parse_spec(text, base_dir=SPECS))
    assert ("lp", "after_all") in p.edges and not any("other" in e and "lp" in e for e in p.edges)
    exe = recorded(p, RecordingBackend())
    with pytest.raises(BuildError) as info:
        exe.update("w", args={"y": "rows[1]"})  # `other` writes rows[1] with no path to the loop
    assert info.value.code == "race" and "'other'" in str(info.value) and "after_all" not in str(info.value)


def test_pool_flow_check_looks_inside_loop_bodies():
    from dagbuild.pool import _flow_fixed

    spec = parse_spec(spec_text(GOOD), base_dir=SPECS)
    assert _flow_fixed(spec, {"n"})
    text = spec_text(GOOD.replace("args: {x: a, y: b, a: 2.0, n: n}", "args: {x: a, y: \"rows[n - 1]\", a: 2.0, n: n}"),
                     HEAD.replace("  b: {dtype: f32, shape: [n]}", "  b: {dtype: f32, shape: [n]}\n"
                                  "  rows: {dtype: f32, shape: [n, n]}"))
    assert not _flow_fixed(parse_spec(text, base_dir=SPECS), {"n"})
