"""Loop nodes on a GPU: a WHILE conditional node (and the unrolled fallback, forced) runs its body until
`until` is set or `max` iterations ran, in one launch; update() reaches body nodes; the driver's graph
shows the conditional node and its body."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from conftest import SPECS

from dagbuild import build, parse_spec, plan
from dagbuild.executable import ExecOptions

pytestmark = pytest.mark.gpu

MODES = ["conditional", "unroll"]

# tick: one more iteration, recorded; a no-op once `done` is set (what the unrolled form needs).
# pdl_add: y[i] += 1 after griddepcontrol.wait (a programmatic consumer).
CODE = r"""
extern "C" __global__ void tick(int* count, int* done, int* trace, int limit) {
    if (threadIdx.x != 0 || done[0] != 0) return;
    const int c = count[0] + 1;
    count[0] = c;
    trace[c - 1] = c;
    if (c >= limit) done[0] = 1;
}
extern "C" __global__ void pdl_add(const float* x, float* y, int n) {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += x[i];
}
"""


def spec(body: str, dims: str = "{K: 8, limit: 5, n: 1024}"):
    text = textwrap.dedent("""
    dagbuild: 1
    name: loop_gpu
    dims: DIMS
    kernels:
      tick:
        code: |
    CODE
        entry: tick
        params: [i32* count, i32* done, i32* trace, i32 limit]
      add:
        code: |
    CODE
        entry: pdl_add
        params: [const f32* x, f32* y, i32 n]
        launch: programmatic
    buffers:
      count: {dtype: i32, shape: [1]}
      done: {dtype: i32, shape: [1]}
      trace: {dtype: i32, shape: [64]}
      count_host: {dtype: i32, shape: [1], memory: pinned}
      x: {dtype: f32, shape: [n]}
      y: {dtype: f32, shape: [n]}
    nodes:
      - {id: zero_count, memset: {dst: count, value: 0}}
      - {id: zero_done, memset: {dst: done, value: 0}}
    """).replace("DIMS", dims).replace("CODE", textwrap.indent(CODE.strip("\n"), " " * 8))
    return parse_spec(text + textwrap.indent(textwrap.dedent(body).strip("\n"), "  ") + "\n"
                      "  - {id: down, memcpy: {dst: count_host, src: count}}\n", base_dir=SPECS)


TICK_LOOP = """
- id: lp
  loop: {max: K, until: done}
  nodes:
    - {id: t, kernel: tick, grid: [1], block: [32], args: {count: count, done: done, trace: trace, limit: limit}}
"""


def _count(exe) -> int:
    exe.launch(sync=True)
    return int(exe.buffers["count_host"][0])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("K, limit", [(8, 5), (8, 8), (8, 20), (1, 3), (64, 40)])
def test_loop_runs_until_set_or_max(mode, K, limit):
    with build(plan(spec(TICK_LOOP), K=K, limit=limit), options=ExecOptions(loops=mode)) as exe:
        assert exe.loop_mode == mode
        for _ in range(3):  # every launch starts over (the memsets, and loop_enter's counter reset)
            assert _count(exe) == min(K, limit)
        trace = exe.buffers["trace"].get()
        assert list(trace[:min(K, limit)]) == list(range(1, min(K, limit) + 1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("unroll, limit", [(2, 5), (4, 5), (4, 8), (8, 20)])
def test_copies_per_iteration_stop_where_one_copy_does(mode, unroll, limit):
    """unroll copies of the body per WHILE iteration: the copies after the stop do nothing (the tick kernel
    checks `done`), so the count is the same as one copy per iteration."""
    body = TICK_LOOP.replace("loop: {max: K, until: done}", f"loop: {{max: K, until: done, unroll: {unroll}}}")
    with build(plan(spec(body), K=8, limit=limit), options=ExecOptions(loops=mode)) as exe:
        for _ in range(2):
            assert _count(exe) == min(8, limit)
        assert list(exe.buffers["trace"].get()[:min(8, limit)]) == list(range(1, min(8, limit) + 1))


@pytest.mark.parametrize("mode", MODES)
def test_until_set_before_the_loop_runs_no_iteration(mode):
    body = TICK_LOOP.replace("- id: lp", "- {id: preset, memset: {dst: done, value: 1}}\n- id: lp")
    with build(plan(spec(body)), options=ExecOptions(loops=mode)) as exe:
        assert _count(exe) == 0


@pytest.mark.parametrize("mode", MODES)
def test_fixed_count_and_nested_loops(mode):
    body = """
    - id: outer
      loop: {max: 3}
      nodes:
        - id: inner
          loop: {max: 4}
          nodes:
            - {id: t, kernel: tick, grid: [1], block: [32], args: {count: count, done: done, trace: trace, limit: 1000}}
    """
    with build(plan(spec(body)), options=ExecOptions(loops=mode)) as exe:
        assert _count(exe) == 12


@pytest.mark.parametrize("mode", MODES)
def test_update_reaches_body_nodes(mode):
    with build(plan(spec(TICK_LOOP)), options=ExecOptions(loops=mode)) as exe:
        assert _count(exe) == 5
        exe.update("t", args={"limit": 2})
        assert _count(exe) == 2
        exe.update("t", args={"limit": 100})
        assert _count(exe) == 8


PDL_LOOP = TICK_LOOP + """\
    - {id: a1, kernel: add, grid: [4], block: [256], args: {x: x, y: y, n: n}}
    - {id: a2, kernel: add, grid: [4], block: [256], args: {x: y, y: x, n: n}}
"""


@pytest.mark.parametrize("mode", MODES)
def test_programmatic_edges_inside_a_body_run_exactly(mode):
    import cupy

    p = plan(spec(PDL_LOOP))
    assert ("a1", "a2") in p.analysis.programmatic
    with build(p, options=ExecOptions(loops=mode)) as exe:
        x0 = np.arange(1024, dtype=np.float32) / 1024
        exe.buffers["x"].set(x0)
        exe.buffers["y"].set(np.zeros(1024, np.float32))
        assert _count(exe) == 5
        # the adds do not stop with `done`: the unrolled form runs them all K = 8 times
        x, y = x0.astype(np.float64), np.zeros(1024)
        for _ in range(5 if mode == "conditional" else 8):
            y = y + x
            x = x + y
        np.testing.assert_allclose(exe.buffers["x"].get(), x, rtol=1e-6)
        cupy.cuda.Device().synchronize()
        kinds, edges = exe.driver_graph()
        kept = edges.get(("a1", "a2") if mode == "conditional" else ("a1#0", "a2#0"))
        print(f"programmatic edge a1 -> a2 inside the {mode} body: {kept}")
        if mode == "unroll":
            assert kept == "programmatic"


def test_driver_graph_and_dot_show_the_conditional_node_and_its_body():
    with build(plan(spec(TICK_LOOP))) as exe:
        kinds, edges = exe.driver_graph()
        assert kinds["lp"] == "conditional" and kinds["lp.enter"] == "kernel"
        assert kinds["t"] == "kernel" and kinds["lp.next"] == "kernel"
        assert edges[("zero_done", "lp.enter")] == "plain" and ("lp.enter", "lp") in edges
        assert ("t", "lp.next") in edges and ("lp", "down") in edges
        dot = exe.driver_dot()
        assert "conditional" in dot.lower() and "tick" in dot and "loop_next" in dot


def test_unrolled_driver_graph_names_every_copy():
    with build(plan(spec(TICK_LOOP), K=3), options=ExecOptions(loops="unroll")) as exe:
        kinds, edges = exe.driver_graph()
        assert {k for k in kinds if k.startswith("t#")} == {"t#0", "t#1", "t#2"}
        assert kinds["lp#2"] == "empty" and ("lp#0", "t#1") in edges and ("lp#2", "down") in edges
