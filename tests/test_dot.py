"""DOT output: parses back with pydot, with the reduced DAG's nodes and edges, and repeat clusters."""

from __future__ import annotations

import shutil

import pytest
from conftest import SPECS

from dagbuild import dot
from dagbuild.errors import DagbuildError
from dagbuild.load import from_dict, load_spec
from dagbuild.plan import plan

pydot = pytest.importorskip("pydot")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pyparsing's, inside pydot
SHIPPED = sorted(SPECS.glob("*.yaml"))
_NOT_NODES = {"node", "edge", "graph"}


def unquote(name: str) -> str:
    if len(name) >= 2 and name[0] == name[-1] == '"':
        return name[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return name


def parse(text: str):
    graphs = pydot.graph_from_dot_data(text)
    assert graphs is not None and len(graphs) == 1, "DOT did not parse"
    return graphs[0]


def all_nodes(g) -> list:
    out = [n for n in g.get_nodes() if n.get_name() not in _NOT_NODES]
    for sub in g.get_subgraphs():
        out += all_nodes(sub)
    return out


def own_node_ids(g) -> list[str]:
    return [unquote(n.get_name()) for n in g.get_nodes() if n.get_name() not in _NOT_NODES]


def all_edges(g) -> list[tuple[str, str]]:
    out = [(unquote(e.get_source()), unquote(e.get_destination())) for e in g.get_edges()]
    for sub in g.get_subgraphs():
        out += all_edges(sub)
    return out


def label(g) -> str:
    return unquote(g.get_label() or "")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_dot_parses_with_the_reduced_dag(path):
    p = plan(load_spec(path))
    g = parse(dot.to_dot(p))
    assert unquote(g.get_name()) == p.name
    ids = [unquote(n.get_name()) for n in all_nodes(g)]
    assert sorted(ids) == sorted(n.id for n in p.nodes) and len(ids) == len(set(ids))
    edges = all_edges(g)
    assert len(edges) == len(p.edges) == p.summary["edges_reduced"]
    assert set(edges) == set(p.edges)


def test_chain_repeat_cluster():
    p = plan(load_spec(SPECS / "chain.yaml"))
    g = parse(dot.to_dot(p))
    assert own_node_ids(g) == ["upload", "zero", "download"]
    (cluster,) = g.get_subgraphs()
    assert cluster.get_name().startswith("cluster_") and label(cluster) == "repeat s × 8"
    iters = cluster.get_subgraphs()
    assert [label(s) for s in iters] == [f"s = {i}" for i in range(8)]
    assert [own_node_ids(s) for s in iters] == [[f"step.{i}"] for i in range(8)]


def test_fanout_nested_repeat_clusters():
    g = parse(dot.to_dot(plan(load_spec(SPECS / "fanout4.yaml"))))
    (outer,) = g.get_subgraphs()
    assert label(outer) == "repeat b × 4"
    branches = outer.get_subgraphs()
    assert [label(b) for b in branches] == ["b = 0", "b = 1", "b = 2", "b = 3"]
    for b, branch in enumerate(branches):
        assert own_node_ids(branch) == [f"branch{b}.0"]
        (inner,) = branch.get_subgraphs()
        assert label(inner) == "repeat d × 3"
        assert [own_node_ids(s) for s in inner.get_subgraphs()] == [[f"branch{b}.{d + 1}"] for d in range(3)]
    names = [s.get_name() for s in g.get_subgraphs()]
    names += [s.get_name() for b in branches for s in [b, *b.get_subgraphs()]]
    assert all(n.startswith("cluster_") for n in names) and len(names) == len(set(names))


def test_no_clusters_without_repeat():
    g = parse(dot.to_dot(plan(load_spec(SPECS / "diamond.yaml"))))
    assert g.get_subgraphs() == []


def test_shapes_and_labels_by_kind():
    spec = from_dict({
        "dagbuild": 1, "name": "kinds", "dims": {"n": 1024},
        "kernels": {"k": {"code": "x", "entry": "k", "params": ["f32* y"]}},
        "buffers": {"h": {"dtype": "f32", "shape": ["n"], "memory": "pinned"}, "d": {"dtype": "f32", "shape": ["n"]}},
        "nodes": [{"id": "set", "memset": {"dst": "d", "value": 1.5}},
                  {"id": "run", "kernel": "k", "grid": [4, 2], "block": [256], "shared": 2048, "args": {"y": "d"}},
                  {"id": "down", "memcpy": {"dst": "h", "src": "d"}},
                  {"id": "end", "empty": {}, "after": ["down"]}]})
    g = parse(dot.to_dot(plan(spec)))
    nodes = {unquote(n.get_name()): n for n in all_nodes(g)}
    assert {k: n.get_shape() for k, n in nodes.items()} == {"set": "parallelogram", "run": "box", "down": "cds",
                                                            "end": "circle"}
    assert unquote(nodes["run"].get_label()) == "run\\nk  4×2 × 256\\nshared 2.0 KiB"
    assert unquote(nodes["down"].get_label()) == "down\\nD2H 4.0 KiB\\nd → h"
    assert unquote(nodes["set"].get_label()) == "set\\nmemset d = 1.5\\n4.0 KiB"
    assert all_edges(g) == [("set", "run"), ("run", "down"), ("down", "end")]


def test_awkward_ids_are_quoted():
    ids = ['say "hi"', "back\\slash", "a -> b", "digraph", "x;y", "[brackets] {}"]
    spec = from_dict({"dagbuild": 1, "name": "the.graph-1",
                      "nodes": [{"id": i, "empty": {}, "after": ids[k - 1:k]} for k, i in enumerate(ids)]})
    p = plan(spec)
    g = parse(dot.to_dot(p))
    assert sorted(unquote(n.get_name()) for n in all_nodes(g)) == sorted(ids)
    assert all_edges(g) == list(zip(ids, ids[1:], strict=False))


def test_render_without_graphviz_says_so(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(DagbuildError, match="Graphviz") as info:
        dot.render("digraph g {}", "svg")
    assert "--format dot" in str(info.value)


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
def test_render_svg_with_graphviz():
    data = dot.render(dot.to_dot(plan(load_spec(SPECS / "diamond.yaml"))), "svg")
    assert b"<svg" in data and b"join" in data
