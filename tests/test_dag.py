"""DAG analysis: inferred edges on hand-made cases, `after`, races under `deps: explicit`, reduction,
the summary, and the 1,000-node case."""

from __future__ import annotations

import textwrap

import networkx as nx
import pytest
from conftest import SPECS
from helpers import load_tool

from dagbuild.bind import bind
from dagbuild.dag import full_graph, infer_edges, max_width
from dagbuild.errors import SpecError
from dagbuild.load import load_spec, parse_spec
from dagbuild.plan import plan

HEAD = """\
dagbuild: 1
name: t
dims: {n: 64}
deps: DEPS
kernels:
  copy:
    code: |
      extern "C" __global__ void copy(const float* x, float* y, int n) {}
    entry: copy
    params: [const f32* x, f32* y, i32 n]
  inc:
    code: |
      extern "C" __global__ void inc(float* y, int n) {}
    entry: inc
    params: [f32* y, i32 n]
buffers:
  a: {dtype: f32, shape: [n]}
  b: {dtype: f32, shape: [n]}
  c: {dtype: f32, shape: [n]}
  m: {dtype: f32, shape: [4, n]}
  host: {dtype: f32, shape: [n], memory: pinned}
nodes:
"""


def make(body: str, deps: str = "infer"):
    text = HEAD.replace("DEPS", deps) + textwrap.dedent(body).lstrip("\n")
    return parse_spec(text)


def copy(node_id: str, src: str, dst: str, after: str = "") -> str:
    extra = f", after: [{after}]" if after else ""
    return f'- {{id: {node_id}, kernel: copy, grid: [1], block: [64], args: {{x: "{src}", y: "{dst}", n: n}}{extra}}}\n'


def inc(node_id: str, buf: str) -> str:
    return f'- {{id: {node_id}, kernel: inc, grid: [1], block: [64], args: {{y: "{buf}", n: n}}}}\n'


def edges_of(body: str) -> set[tuple[str, str]]:
    """Edges inferred before reduction."""
    p, issues = bind(make(body))
    assert issues == []
    return infer_edges(p.nodes)


def reduced(body: str, deps: str = "infer") -> list[tuple[str, str]]:
    return plan(make(body, deps)).edges


# --- inference on hand-made cases ------------------------------------------------------------------------------------


def test_raw():
    assert edges_of(copy("w", "a", "b") + copy("r", "b", "c")) == {("w", "r")}


def test_war():
    assert edges_of(copy("r", "b", "c") + copy("w", "a", "b")) == {("r", "w")}


def test_waw():
    assert edges_of(copy("w1", "a", "b") + copy("w2", "c", "b")) == {("w1", "w2")}


def test_read_after_read_gives_no_edge():
    assert edges_of(copy("r1", "a", "b") + copy("r2", "a", "c")) == set()


def test_disjoint_views_give_no_edge():
    body = copy("w0", "a", "m[0]") + copy("w1", "a", "m[1]") + copy("r2", "m[2]", "b") + copy("w3", "b", "m[3]")
    assert edges_of(body) == {("r2", "w3")}  # only the b hazard: the rows of m never overlap


def test_whole_buffer_overlaps_each_row():
    body = copy("w0", "a", "m[0]") + copy("w1", "a", "m[1]") + "- {id: all, memset: {dst: m, value: 0}}\n"
    assert edges_of(body) == {("w0", "all"), ("w1", "all")}


def test_element_views_of_a_row():
    body = copy("row", "a", "m[1]") + "- {id: e0, memset: {dst: 'm[1, 0]', value: 1.0}}\n" \
        + "- {id: e9, memset: {dst: 'm[2, 9]', value: 1.0}}\n"
    assert edges_of(body) == {("row", "e0")}


def test_read_write_param_orders_both_ways():
    # inc reads and writes its T* param: any earlier reader or writer comes first, later ones after
    body = copy("r", "a", "b") + inc("i", "a") + copy("r2", "a", "c")
    assert edges_of(body) == {("r", "i"), ("i", "r2")}


def test_memcpy_and_memset_accesses():
    body = "- {id: up, memcpy: {dst: a, src: host}}\n- {id: z, memset: {dst: b, value: 0}}\n" \
        + copy("k", "a", "b") + "- {id: down, memcpy: {dst: host, src: b}}\n"
    assert edges_of(body) == {("up", "k"), ("z", "k"), ("k", "down"), ("up", "down")}
    # up → down: WAR on host (up reads it, down writes it); reduction drops it as k orders them
    assert set(reduced(body)) == {("up", "k"), ("z", "k"), ("k", "down")}


def test_covering_write_retires_older_accesses_without_losing_order():
    body = copy("w1", "a", "b") + copy("r1", "b", "c") + copy("w2", "a", "b") + copy("r2", "b", "c")
    e = edges_of(body)
    assert {("w1", "r1"), ("r1", "w2"), ("w1", "w2"), ("w2", "r2")} <= e
    assert ("w1", "r2") not in e  # w2 covers b: no need to remember w1
    g = nx.DiGraph(e)
    assert all(nx.has_path(g, u, v) for u, v in [("w1", "r2"), ("r1", "r2")])


def test_partial_write_does_not_retire():
    body = "- {id: full, memset: {dst: m, value: 0}}\n" + copy("part", "a", "m[0]") + copy("r3", "m[3]", "b")
    assert ("full", "r3") in edges_of(body)  # m[0] does not cover m[3]
    assert ("part", "r3") not in edges_of(body)


def test_after_adds_edges_under_infer():
    body = copy("x1", "a", "b") + copy("x2", "a", "c", after="x1")
    assert edges_of(body) == set()
    assert reduced(body) == [("x1", "x2")]


def test_empty_node_as_join():
    body = copy("p", "a", "b") + copy("q", "a", "c") + "- {id: j, empty: {}, after: [p, q]}\n"
    p = plan(make(body))
    assert p.edges == [("p", "j"), ("q", "j")]
    assert p.summary["nodes_by_kind"] == {"kernel": 2, "memcpy": 0, "memset": 0, "empty": 1}


def test_repeat_chain_with_views_and_templates():
    body = """
    - {id: seed, memset: {dst: "m[0]", value: 1.0}}
    - repeat: {var: i, count: 3}
      nodes:
        - id: "step.{i}"
          kernel: copy
          grid: [1]
          block: [64]
          args: {x: "m[i]", y: "m[i + 1]", n: n}
    """
    p = plan(make(body))
    assert [n.id for n in p.nodes] == ["seed", "step.0", "step.1", "step.2"]
    assert p.edges == [("seed", "step.0"), ("step.0", "step.1"), ("step.1", "step.2")]
    step2 = p.node_by_id["step.2"]
    assert [(v.buffer, v.offset, v.nbytes) for v in step2.reads] == [("m", 2 * 64 * 4, 64 * 4)]
    assert [(f.var, f.value, f.count) for f in step2.repeats] == [("i", 2, 3)]


def test_repeat_of_count_0_or_1_is_a_switch_with_plain_ids():
    """A dim picks one of two blocks (count 0 or 1 each) that keep plain ids; at count 2 a plain id is refused."""
    body = """
    - repeat: {var: s, count: "n >= 32"}
      nodes:
        - {id: wide, kernel: copy, grid: [1], block: [64], args: {x: a, y: b, n: n}}
    - repeat: {var: s, count: "n < 32"}
      nodes:
        - {id: narrow, kernel: copy, grid: [1], block: [64], args: {x: a, y: b, n: n}}
    - {id: after, kernel: copy, grid: [1], block: [64], args: {x: b, y: c, n: n}}
    """
    spec = make(body)
    assert [n.id for n in plan(spec).nodes] == ["wide", "after"]
    p, issues = bind(spec, {"n": 16})
    assert not issues and [n.id for n in p.nodes] == ["narrow", "after"]
    two = make(body.replace('count: "n >= 32"', "count: 2"))
    with pytest.raises(SpecError) as info:
        plan(two)
    assert info.value.issues[0].code == "duplicate_id" and "'wide' inside repeat 's' must use {s}" in str(info.value)


def test_templates_in_ids_and_after():
    body = """
    - {id: a.0, empty: {}}
    - repeat: {var: l, count: 3}
      nodes:
        - {id: "a.{l + 1}", empty: {}, after: ["a.{l}"]}
        - {id: "b.{2 * l}", empty: {}, after: ["a.{l + 1}", "a.{max(l - 1, 0)}"]}
    """
    p = plan(make(body))
    assert [n.id for n in p.nodes] == ["a.0", "a.1", "b.0", "a.2", "b.2", "a.3", "b.4"]
    assert p.node_by_id["b.4"].after == ("a.3", "a.1")
    assert p.edges == [("a.0", "a.1"), ("a.1", "b.0"), ("a.1", "a.2"), ("a.2", "b.2"), ("a.2", "a.3"), ("a.3", "b.4")]


# --- deps: explicit and races ----------------------------------------------------------------------------------------


def test_race_found_under_explicit_and_gone_with_after():
    body = copy("w", "a", "b") + copy("r", "b", "c")
    with pytest.raises(SpecError) as info:
        plan(make(body, "explicit"))
    (issue,) = info.value.issues
    assert (issue.code, issue.nodes, issue.buffer) == ("race", ("w", "r"), "b")

    p = plan(make(copy("w", "a", "b") + copy("r", "b", "c", after="w"), "explicit"))
    assert p.edges == [("w", "r")]


def test_race_needs_a_path_not_a_direct_edge():
    body = copy("w", "a", "b") + "- {id: mid, empty: {}, after: [w]}\n" + copy("r", "b", "c", after="mid")
    p = plan(make(body, "explicit"))
    assert p.edges == [("w", "mid"), ("mid", "r")]


def test_race_every_unordered_pair_is_reported():
    body = copy("w1", "a", "b") + copy("w2", "c", "b") + copy("r", "b", "a", after="w1, w2")
    with pytest.raises(SpecError) as info:
        plan(make(body, "explicit"))
    # w1/w2 both write b (unordered); r reads b and writes a, which w1 and w2 read: ordered by `after`
    assert [(i.code, i.nodes, i.buffer) for i in info.value.issues] == [("race", ("w1", "w2"), "b")]


def test_explicit_disjoint_views_do_not_race():
    body = copy("w0", "a", "m[0]") + copy("w1", "a", "m[1]")
    p = plan(make(body, "explicit"))
    assert p.edges == [] and p.summary["max_width"] == 2


def test_explicit_uses_only_after_edges():
    body = copy("w", "a", "b") + copy("r", "b", "c", after="w") + copy("r2", "b", "a", after="w")
    p = plan(make(body, "explicit"))
    assert p.edges == [("w", "r"), ("w", "r2")]
    # under infer, r2 also writes a which w reads (WAR, implied by w → r2) and nothing else: same edges
    assert plan(make(body, "infer")).edges == [("w", "r"), ("w", "r2")]


# --- reduction and summary -------------------------------------------------------------------------------------------


def test_transitive_reduction_keeps_reachability():
    for spec in ("chain", "diamond", "fanout4", "layers"):
        p = plan(load_spec(SPECS / f"{spec}.yaml"))
        full = full_graph(p)
        red = nx.DiGraph(p.edges)
        red.add_nodes_from(full)
        assert nx.is_directed_acyclic_graph(red)
        assert set(nx.transitive_closure_dag(full).edges) == set(nx.transitive_closure_dag(red).edges)
        assert len(p.edges) == p.summary["edges_reduced"] <= p.summary["edges"] == full.number_of_edges()


def test_summary_diamond():
    s = plan(load_spec(SPECS / "diamond.yaml")).summary
    assert s["nodes"] == 5
    assert s["nodes_by_kind"] == {"kernel": 3, "memcpy": 2, "memset": 0, "empty": 0}
    assert (s["edges"], s["edges_reduced"], s["critical_path"], s["max_width"]) == (5, 5, 4, 2)
    assert s["bytes_by_memory"] == {"device": (8192 + 2 * 8192 + 8192) * 4, "pinned": 2 * 8192 * 4}


def test_summary_chain():
    p = plan(load_spec(SPECS / "chain.yaml"))
    s = p.summary
    assert s["nodes_by_kind"] == {"kernel": 8, "memcpy": 2, "memset": 1, "empty": 0}
    assert (s["edges_reduced"], s["critical_path"], s["max_width"]) == (10, 10, 2)
    assert p.edges[:3] == [("upload", "step.0"), ("zero", "step.0"), ("step.0", "step.1")]
    assert p.edges[-1] == ("step.7", "download")


def test_summary_fanout4():
    s = plan(load_spec(SPECS / "fanout4.yaml")).summary
    assert (s["nodes"], s["critical_path"], s["max_width"]) == (21, 8, 4)


def test_summary_with_overrides():
    s = plan(load_spec(SPECS / "chain.yaml"), {"steps": 3, "n": 1024}).summary
    assert s["nodes"] == 6 and s["critical_path"] == 5 and s["dims"] == {"n": 1024, "steps": 3}
    assert s["bytes_by_memory"] == {"device": 2 * 1024 * 4, "pinned": 2 * 1024 * 4}


def test_plan_keyword_dims():
    assert plan(load_spec(SPECS / "chain.yaml"), steps=2).summary["nodes"] == 5


def test_width_and_critical_path_of_independent_nodes():
    body = "".join(f"- {{id: e{i}, empty: {{}}}}\n" for i in range(5))
    s = plan(make(body)).summary
    assert (s["edges"], s["critical_path"], s["max_width"]) == (0, 1, 5)


def test_empty_spec_summary():
    s = plan(parse_spec("dagbuild: 1\nname: nothing\nnodes: []\n")).summary
    assert (s["nodes"], s["edges"], s["critical_path"], s["max_width"]) == (0, 0, 0, 0)


@pytest.mark.parametrize("edges, width", [
    ([], 1),
    ([("a", "b"), ("b", "c")], 1),
    ([("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")], 2),
    ([("a", "d"), ("b", "d"), ("c", "d"), ("d", "e"), ("d", "f")], 3),
    # a zig-zag: the largest antichain is {b, c, d} though no node has 3 children
    ([("a", "b"), ("a", "c"), ("c", "e"), ("d", "e"), ("b", "f"), ("d", "f")], 3),
])
def test_max_width(edges, width):
    g = nx.DiGraph(edges)
    if not edges:
        g.add_node("a")
    assert max_width(g) == width


# --- the 1,000-node case ---------------------------------------------------------------------------------------------


def test_thousand_node_spec_validates():
    bench = load_tool("bench_validate")
    p = bench.validate(bench.spec_text(64))
    s = p.summary
    assert s["nodes"] == 64 * bench.NODES_PER_LAYER + 4 == 1028
    assert s["nodes_by_kind"] == {"kernel": 1026, "memcpy": 2, "memset": 0, "empty": 0}
    # one layer's attention half: q/k/v in parallel, then the cache write and attention
    assert {("attn_norm.5", "q.5"), ("attn_norm.5", "k.5"), ("attn_norm.5", "v.5"), ("kv.5", "attn.5"),
            ("res2.4", "attn_norm.5"), ("res2.63", "final_norm")} <= set(p.edges)
    assert s["max_width"] == 3  # q, k, v (and gate/up) at once, never more
    assert s["critical_path"] == 2 + 64 * 12 + 2  # 12 of each layer's 16 nodes lie on the longest path
    kv = p.node_by_id["kv.7"]
    row = 2048 * 2  # one f16 row of the cache
    assert [(w.buffer, w.offset) for w in kv.writes] == [("kcache", (7 * 2048 + 17) * row),
                                                         ("vcache", (7 * 2048 + 17) * row)]
