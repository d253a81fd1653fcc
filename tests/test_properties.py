"""Property tests on random DAG specs.

* Validation never raises anything but SpecError, however a spec is mangled.
* ``deps: infer`` orders every conflicting pair (overlapping bytes, one a write) in list order; the reduced
  edges keep exactly the full graph's reachability and are minimal.
* ``deps: explicit`` reports a race for exactly the conflicting pairs that ``after`` leaves unordered.
* The summary's critical path and max width match brute force; to_yaml() round-trips.

Expected byte ranges are computed here from the generator's own bookkeeping, not from dagbuild's views.
"""

from __future__ import annotations

import copy
import itertools

import networkx as nx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dagbuild.errors import SpecError
from dagbuild.load import from_dict, parse_spec
from dagbuild.plan import plan

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CODES = {"yaml", "schema", "duplicate_id", "unknown_reference", "expression", "arg_mismatch", "out_of_bounds",
         "launch_config", "cycle", "race"}
N = 8  # elements per row; every buffer is f32 [rows, N]
ROW = N * 4

KERNELS = {
    "rw": {"code": 'extern "C" __global__ void rw(const float* a, float* b, int n) {}', "entry": "rw",
           "params": ["const f32* a", "f32* b", "i32 n"]},
    "w1": {"code": 'extern "C" __global__ void w1(float* b, int n) {}', "entry": "w1", "params": ["f32* b", "i32 n"]},
}


@st.composite
def dag_specs(draw, deps: str = "infer"):
    """(spec dict, expected) where expected is [(node id, [(buffer, lo, hi, writes?)], [after ids])] in order."""
    nbuf = draw(st.integers(1, 3))
    rows = [draw(st.integers(1, 4)) for _ in range(nbuf)]
    buffers = {f"b{i}": {"dtype": "f32", "shape": [r, "n"], "memory": draw(st.sampled_from(["device", "pinned"]))}
               for i, r in enumerate(rows)}

    def view(in_repeat: bool):
        b = draw(st.integers(0, nbuf - 1))
        if draw(st.booleans()) and not in_repeat:
            return (b, None)
        return (b, draw(st.integers(0, rows[b] - 1)))

    def text(v, in_repeat: bool) -> str:
        b, row = v
        if row is None:
            return f"b{b}"
        return f"b{b}[({row} + r) % {rows[b]}]" if in_repeat else f"b{b}[{row}]"

    def rng(v, r: int):
        b, row = v
        if row is None:
            return (f"b{b}", 0, rows[b] * ROW)
        actual = (row + r) % rows[b]
        return (f"b{b}", actual * ROW, (actual + 1) * ROW)

    def node(idx: int, in_repeat: bool):
        """A node template: (spec dict without id/after, function r -> accesses)."""
        kind = draw(st.sampled_from(["memset", "memcpy", "rw", "w1", "empty"]))
        if kind == "empty":
            return {"empty": {}}, lambda r: []
        if kind == "memset":
            v = view(in_repeat)
            return ({"memset": {"dst": text(v, in_repeat), "value": draw(st.sampled_from([0, 1.5, -2]))}},
                    lambda r: [(*rng(v, r), True)])
        if kind == "memcpy" and nbuf > 1:
            src = view(True)  # rows only: every row is ROW bytes, so sizes always match
            dst = view(True)
            if dst[0] == src[0]:  # a memcpy may not overlap itself: copy into another buffer
                other = (src[0] + 1) % nbuf
                dst = (other, dst[1] % rows[other])
            return ({"memcpy": {"dst": text(dst, in_repeat), "src": text(src, in_repeat)}},
                    lambda r: [(*rng(src, r), False), (*rng(dst, r), True)])
        if kind in ("rw", "memcpy"):
            a, b = view(in_repeat), view(in_repeat)
            return ({"kernel": "rw", "grid": [1], "block": [N],
                     "args": {"a": text(a, in_repeat), "b": text(b, in_repeat), "n": "n"}},
                    lambda r: [(*rng(a, r), False), (*rng(b, r), True)])
        b = view(in_repeat)
        return ({"kernel": "w1", "grid": [1], "block": [N], "args": {"b": text(b, in_repeat), "n": "n"}},
                lambda r: [(*rng(b, r), True)])

    nodes, expected = [], []
    count = draw(st.integers(1, 9))
    i = 0
    while i < count:
        if draw(st.integers(0, 5)) == 0:  # a repeat block of 1-3 templates, 1-3 iterations
            reps, size = draw(st.integers(1, 3)), draw(st.integers(1, 3))
            templates = [(f"rep{i + k}", *node(i + k, True)) for k in range(size)]
            nodes.append({"repeat": {"var": "r", "count": reps},
                          "nodes": [dict(body, id=f"{name}.{{r}}") for name, body, _ in templates]})
            for r in range(reps):
                for name, _, acc in templates:
                    expected.append((f"{name}.{r}", acc(r), []))
            i += size
        else:
            body, acc = node(i, False)
            earlier = [e[0] for e in expected]
            after = draw(st.lists(st.sampled_from(earlier), max_size=2, unique=True)) if earlier else []
            nodes.append(dict(body, id=f"n{i}", **({"after": after} if after else {})))
            expected.append((f"n{i}", acc(0), after))
            i += 1
    spec = {"dagbuild": 1, "name": "random", "dims": {"n": N}, "deps": deps, "kernels": KERNELS,
            "buffers": buffers, "nodes": nodes}
    return spec, expected


def conflicts(expected) -> set[tuple[str, str]]:
    """Pairs (earlier, later) that touch overlapping bytes of one buffer, at least one writing."""
    out = set()
    for (a, acc_a, _), (b, acc_b, _) in itertools.combinations(expected, 2):
        for (ba, lo_a, hi_a, wa), (bb, lo_b, hi_b, wb) in itertools.product(acc_a, acc_b):
            if ba == bb and (wa or wb) and lo_a < hi_b and lo_b < hi_a:
                out.add((a, b))
    return out


def graph(ids, edges) -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_nodes_from(ids)
    g.add_edges_from(edges)
    return g


@SETTINGS
@given(dag_specs("infer"))
def test_inferred_edges_order_every_conflict(case):
    spec, expected = case
    p = plan(from_dict(spec))
    ids = [e[0] for e in expected]
    assert [n.id for n in p.nodes] == ids
    order = {v: k for k, v in enumerate(ids)}
    reduced = graph(ids, p.edges)
    assert all(order[u] < order[v] for u, v in p.edges)  # edges follow list order (after only looks back)
    closure = nx.transitive_closure_dag(reduced)
    for a, b in conflicts(expected):
        assert closure.has_edge(a, b), f"{a} and {b} conflict but are not ordered"
    # reduction keeps reachability: every `after` is implied, and each reduced edge is the only path
    for node_id, _, after in expected:
        for a in after:
            assert closure.has_edge(a, node_id)
    for u, v in p.edges:
        reduced.remove_edge(u, v)
        assert not nx.has_path(reduced, u, v), f"edge {u} → {v} is redundant"
        reduced.add_edge(u, v)
    # nothing is ordered that need not be: every reduced edge is a conflict or an `after`
    after_edges = {(a, n) for n, _, after in expected for a in after}
    assert set(p.edges) <= conflicts(expected) | after_edges


@SETTINGS
@given(dag_specs("explicit"))
def test_explicit_races_are_exactly_the_unordered_conflicts(case):
    spec, expected = case
    ids = [e[0] for e in expected]
    after_closure = nx.transitive_closure_dag(graph(ids, [(a, n) for n, _, after in expected for a in after]))
    unordered = {(a, b) for a, b in conflicts(expected) if not after_closure.has_edge(a, b)}
    try:
        p = plan(from_dict(spec))
    except SpecError as e:
        assert set(e.codes) == {"race"}
        assert {i.nodes for i in e.issues} == unordered
        for issue in e.issues:
            assert issue.buffer in spec["buffers"]
        return
    assert unordered == set()
    assert set(nx.transitive_closure_dag(graph(ids, p.edges)).edges) == set(after_closure.edges)


@SETTINGS
@given(dag_specs("infer"))
def test_summary_matches_brute_force(case):
    spec, expected = case
    p = plan(from_dict(spec))
    ids = [e[0] for e in expected]
    g = graph(ids, p.edges)
    closure = nx.transitive_closure_dag(g)
    s = p.summary
    assert s["nodes"] == len(ids)
    assert s["critical_path"] == nx.dag_longest_path_length(g) + 1
    if len(ids) <= 10:
        def antichain(sub):
            return all(not closure.has_edge(a, b) and not closure.has_edge(b, a)
                       for a, b in itertools.combinations(sub, 2))
        width = max(k for k in range(1, len(ids) + 1) if any(antichain(c) for c in itertools.combinations(ids, k)))
        assert s["max_width"] == width
    pinned = sum(b["shape"][0] * ROW for b in spec["buffers"].values() if b["memory"] == "pinned")
    device = sum(b["shape"][0] * ROW for b in spec["buffers"].values() if b["memory"] == "device")
    assert s["bytes_by_memory"] == {"device": device, "pinned": pinned}


@SETTINGS
@given(st.sampled_from(["infer", "explicit"]).flatmap(dag_specs))
def test_yaml_round_trip_of_random_specs(case):
    spec, _ = case
    gs = from_dict(spec)
    again = parse_spec(gs.to_yaml())
    assert again == gs
    assert parse_spec(yaml.safe_dump(spec)) == gs


# --- validation never raises anything but SpecError ------------------------------------------------------------------

JUNK = ["", " ", "x[", "b9", "b0[99]", "b0[1, 2, 3]", "b0[-1]", "b0[]", "b0[0]]", -1, 0, 1, 2.5, 1e300, 10**30,
        -(10**30), "n // 0", "n % 0", "zz", None, [], {}, [[1]], {"a": 1}, "{q}", "{r", "x.{r + }", "ceil_div(n)",
        "min()", True, "__import__('os')", "n.real", "n ** 99", "1e400", "(" * 300, "-" * 5000 + "1", "rw", "w1",
        "f16", "const f32* a", "f32", "pinned", "explicit", "infer", "r", "n", "b0", "nodes", "repeat", "empty",
        "n0", "n1", "rep0.{r}", "{r}", "{r - 1}", "a" * 300, "\x00", "ü", "1" + "0" * 5000]


def paths(value, prefix=()):
    """Every path to a leaf or container inside nested dicts and lists."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(value, list):
        for k, v in enumerate(value):
            yield from paths(v, (*prefix, k))


@st.composite
def mangled_specs(draw):
    spec, _ = draw(dag_specs(draw(st.sampled_from(["infer", "explicit"]))))
    spec = copy.deepcopy(spec)
    for _ in range(draw(st.integers(1, 4))):
        where = [p for p in paths(spec) if p]
        path = draw(st.sampled_from(where))
        parent = spec
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add_key"]))
        # a copy of the junk: a later step may mangle inside it, which must not change JUNK for later examples
        # (hypothesis then sees a strategy that draws differently for the same choices: FlakyStrategyDefinition)
        if action == "delete":
            del parent[path[-1]]
        elif action == "add_key" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["after", "id", "kernel", "memset", "repeat", "nodes", "extra", "shared",
                                         "grid", "value", "memory"]))] = copy.deepcopy(draw(st.sampled_from(JUNK)))
        else:
            parent[path[-1]] = copy.deepcopy(draw(st.sampled_from(JUNK)))
    return spec


def check_issues(err: SpecError, with_lines: bool):
    assert err.issues, "SpecError without issues"
    for issue in err.issues:
        assert issue.code in CODES, issue
        assert isinstance(issue.message, str) and issue.message
        assert all(isinstance(n, str) for n in issue.nodes)
        if with_lines:
            assert issue.line is None or (isinstance(issue.line, int) and issue.line >= 1)
        issue.to_json()
        str(issue)


@SETTINGS
@given(mangled_specs())
def test_mangled_specs_raise_only_spec_error(spec):
    try:
        plan(from_dict(spec))
    except SpecError as e:
        check_issues(e, with_lines=False)
    try:
        text = yaml.safe_dump(spec, allow_unicode=True)
    except yaml.YAMLError:
        return
    try:
        plan(parse_spec(text))
    except SpecError as e:
        check_issues(e, with_lines=True)


@SETTINGS
@given(st.text(max_size=300))
def test_random_text_raises_only_spec_error(text):
    try:
        plan(parse_spec(text))
    except SpecError as e:
        check_issues(e, with_lines=True)


@SETTINGS
@given(st.lists(st.sampled_from(["dagbuild: 1\n", "name: t\n", "nodes:\n", "  - id: a\n", "    empty: {}\n",
                                 "    after: [a]\n", "  - repeat: {var: r, count: 2}\n", "    nodes:\n",
                                 "      - {id: 'x.{r}', empty: {}}\n", "buffers: {b: {dtype: f32, shape: [4]}}\n",
                                 "  - {id: m, memset: {dst: b}}\n", "    memset: {dst: 'b[1]'}\n", "dims: {n: 2}\n",
                                 "deps: explicit\n", "  - {id: c, memcpy: {dst: b, src: b}}\n", "\t", ":", "- ",
                                 "  ", "'"]), max_size=14))
def test_yamlish_fragments_raise_only_spec_error(parts):
    try:
        plan(parse_spec("".join(parts)))
    except SpecError as e:
        check_issues(e, with_lines=True)


def test_generator_makes_conflicts_and_repeats():
    """The strategies exercise what they claim to: conflicts, repeats, races (a guard against a vacuous
    generator)."""
    seen = {"conflict": 0, "repeat": 0, "race": 0}

    @settings(max_examples=60, deadline=None, database=None)
    @given(dag_specs("explicit"))
    def probe(case):
        spec, expected = case
        seen["conflict"] += bool(conflicts(expected))
        seen["repeat"] += any("repeat" in n for n in spec["nodes"])
        try:
            plan(from_dict(spec))
        except SpecError:
            seen["race"] += 1

    probe()
    assert all(v > 0 for v in seen.values()), seen


@pytest.mark.parametrize("deps", ["infer", "explicit"])
def test_conflicts_helper_on_a_known_case(deps):
    spec = {"dagbuild": 1, "name": "k", "dims": {"n": N}, "deps": deps, "kernels": KERNELS,
            "buffers": {"b0": {"dtype": "f32", "shape": [2, "n"]}},
            "nodes": [{"id": "w0", "memset": {"dst": "b0[0]"}}, {"id": "w1", "memset": {"dst": "b0[1]"}},
                      {"id": "all", "kernel": "rw", "grid": [1], "block": [N],
                       "args": {"a": "b0", "b": "b0[1]", "n": "n"}}]}
    expected = [("w0", [("b0", 0, ROW, True)], []), ("w1", [("b0", ROW, 2 * ROW, True)], []),
                ("all", [("b0", 0, 2 * ROW, False), ("b0", ROW, 2 * ROW, True)], [])]
    assert conflicts(expected) == {("w0", "all"), ("w1", "all")}
    if deps == "infer":
        assert plan(from_dict(spec)).edges == [("w0", "all"), ("w1", "all")]
    else:
        with pytest.raises(SpecError) as info:
            plan(from_dict(spec))
        assert {i.nodes for i in info.value.issues} == {("w0", "all"), ("w1", "all")}
