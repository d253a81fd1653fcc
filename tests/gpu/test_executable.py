"""The builder on a real GPU: shipped specs against NumPy, byte-exact copies/memsets, update/rebind
without re-instantiation, the driver's graph equal to the reduced DAG, and bad inputs that leak nothing."""

from __future__ import annotations

import gc
import textwrap

import numpy as np
import numpy_dag
import pytest
from conftest import ROOT, SPECS, CountingBackend

from dagbuild import BuildError, CompileError, SpecError, build, load_spec, parse_spec, plan
from dagbuild.llama.decode import llama_plan

pytestmark = pytest.mark.gpu

BASIC_SPECS = ["chain", "diamond", "fanout4", "layers"]


@pytest.fixture
def cp():
    import cupy

    return cupy


def _fill_random(exe, rng, skip=()):
    """Fresh random inputs everywhere, NaN-poisoned float outputs are part of the same state."""
    for name, arr in exe.buffers.items():
        if name in skip:
            continue
        b = exe.plan.buffers[name]
        if b.dtype in ("f32", "f64", "f16"):
            host = rng.standard_normal(b.shape).astype(arr.dtype)
        else:
            host = rng.integers(0, 100, size=b.shape).astype(arr.dtype)
        if isinstance(arr, np.ndarray):
            arr[...] = host
        else:
            arr.set(host)


def _poison(exe, names):
    for name in names:
        arr = exe.buffers[name]
        if arr.dtype.kind == "f":
            arr[...] = np.nan
        else:
            arr[...] = 0x5A


def _mem(cp):
    gc.collect()
    return (cp.get_default_memory_pool().used_bytes(), cp.get_default_pinned_memory_pool().n_free_blocks())


@pytest.mark.parametrize("name", BASIC_SPECS)
def test_shipped_spec_matches_numpy(name, cp):
    p = plan(load_spec(SPECS / f"{name}.yaml"), {"iters": 50} if name == "fanout4" else None)
    rng = np.random.default_rng(hash(name) % 2**32)
    with build(p) as exe:
        for trial in range(2):  # twice: a relaunch must recompute everything from the inputs
            _fill_random(exe, rng)
            if name == "layers":  # keep the chained f16 GEMVs well scaled
                w = rng.standard_normal(exe.buffers["w"].shape) / np.sqrt(p.dims["n"])
                exe.buffers["w"].set(w.astype(np.float16))
            written = {v.buffer for n in p.nodes for v in n.writes}
            _poison(exe, [b for b in written if exe.plan.buffers[b].dtype == "f32"])
            expect = numpy_dag.host_copy(exe)
            numpy_dag.run(p, expect)
            exe.launch(sync=True)
            got = numpy_dag.host_copy(exe)
            for buf in p.buffers:
                e, g = expect[buf].astype(np.float64), got[buf].astype(np.float64)
                assert not np.isnan(g).any(), f"{name}: {buf} has unwritten (NaN) elements"
                err = np.linalg.norm(g - e) / max(np.linalg.norm(e), 1e-30)
                assert err < 1e-5, f"{name} trial {trial}: buffer {buf} differs from NumPy (rel {err:.2e})"


MEMORY_SPEC = """
dagbuild: 1
name: memops
dims: {n: 1000}
buffers:
  src_host: {dtype: u8, shape: [4, n], memory: pinned}
  dst_host: {dtype: u8, shape: [4, n], memory: pinned}
  dev: {dtype: u8, shape: [4, n]}
  dev2: {dtype: u8, shape: [4, n]}
  f32s: {dtype: f32, shape: [n]}
  f16s: {dtype: f16, shape: [n]}
  bf16s: {dtype: bf16, shape: [n]}
  i8s: {dtype: i8, shape: [n]}
  u64s: {dtype: u64, shape: [n]}
nodes:
  - {id: h2d, memcpy: {dst: dev, src: src_host}}
  - {id: d2d, memcpy: {dst: "dev2[1]", src: "dev[2]"}}
  - {id: set_row, memset: {dst: "dev2[3]", value: 171}}
  - {id: d2h, memcpy: {dst: dst_host, src: dev2}}
  - {id: f32, memset: {dst: f32s, value: -1.5}}
  - {id: f16, memset: {dst: f16s, value: 0.333}}
  - {id: bf16, memset: {dst: bf16s, value: 3.14159}}
  - {id: i8, memset: {dst: i8s, value: -7}}
  - {id: u64, memset: {dst: u64s, value: 0}}
"""


def test_memcpy_and_memset_byte_for_byte(cp):
    from dagbuild.llama.reference import f32_to_bf16

    p = plan(parse_spec(MEMORY_SPEC))
    rng = np.random.default_rng(1)
    with build(p) as exe:
        src = rng.integers(0, 256, size=(4, 1000), dtype=np.uint8)
        exe.buffers["src_host"][...] = src
        base = rng.integers(0, 256, size=(4, 1000), dtype=np.uint8)
        exe.buffers["dev2"].set(base)
        exe.buffers["u64s"].set(np.full(1000, 2**60 + 5, np.uint64))
        exe.launch(sync=True)
        want = base.copy()
        want[1] = src[2]
        want[3] = 171
        assert np.array_equal(exe.buffers["dst_host"], want)
        assert np.array_equal(exe.buffers["dev"].get(), src)
        assert (exe.buffers["f32s"].get() == np.float32(-1.5)).all()
        assert (exe.buffers["f16s"].get() == np.float16(0.333)).all()
        assert (exe.buffers["bf16s"].get() == f32_to_bf16(np.float32(3.14159))).all()
        assert (exe.buffers["i8s"].get() == -7).all()
        assert (exe.buffers["u64s"].get() == 0).all()


def test_update_and_rebind_without_reinstantiation(cp):
    from dagbuild.backends import get_backend

    be = CountingBackend(get_backend("cuda"))
    p = plan(load_spec(SPECS / "chain.yaml"), {"steps": 3, "n": 512})
    with build(p, backend=be) as exe:
        x = np.linspace(-1, 1, 512, dtype=np.float32)
        exe.buffers["x_host"][...] = x
        exe.launch(sync=True)
        assert np.allclose(exe.buffers["y_host"], 1.5 * x)  # y = 0; three times y += 0.5 x
        exec_handle = exe.exec
        exe.update("step.0", args={"a": 2.0})
        exe.launch(sync=True)
        assert np.allclose(exe.buffers["y_host"], 3.0 * x)
        exe.update("zero", value=1.0)
        exe.launch(sync=True)
        assert np.allclose(exe.buffers["y_host"], 1.0 + 3.0 * x)
        # rebind y to memory the caller owns: every node touching y now uses it
        mine = cp.full(512, 7.0, dtype=cp.float32)
        exe.rebind("y", mine)
        exe.launch(sync=True)
        assert np.allclose(mine.get(), 1.0 + 3.0 * x)
        assert np.allclose(exe.buffers["y_host"], 1.0 + 3.0 * x)
        assert exe.buffers["y"].data.ptr == mine.data.ptr
        # a PyTorch tensor binds too, through __cuda_array_interface__
        torch = pytest.importorskip("torch")
        t = torch.zeros(512, dtype=torch.float32, device="cuda")
        exe.rebind("y", t)
        exe.launch(sync=True)
        torch.cuda.synchronize()
        assert np.allclose(t.cpu().numpy(), 1.0 + 3.0 * x)
        assert exe.exec is exec_handle and be.instantiations == 1
        with pytest.raises(BuildError, match="'y' needs exactly 2048 bytes"):
            exe.rebind("y", cp.zeros(100, cp.float32))
        with pytest.raises(BuildError, match="'y' is f32"):
            exe.rebind("y", cp.zeros(512, cp.float64))
        with pytest.raises(BuildError, match="no param 'bogus'"):
            exe.update("step.1", args={"bogus": 1})
        with pytest.raises(BuildError, match="no node 'nope'"):
            exe.update("nope", args={})
        exe.launch(sync=True)  # still usable after refused updates
        assert np.allclose(t.cpu().numpy(), 1.0 + 3.0 * x)


def _driver_matches(exe):
    kinds, edges = exe.driver_graph()
    want_kinds = {n.id: n.kind for n in exe.plan.nodes}
    assert kinds == want_kinds
    assert edges == {(u, v): exe.plan.edge_kind(u, v) for u, v in exe.plan.edges}
    dot = exe.driver_dot()
    assert dot.count("->") >= len(exe.plan.edges) and "digraph" in dot


@pytest.mark.parametrize("name", BASIC_SPECS)
def test_driver_graph_equals_reduced_dag(name):
    with build(plan(load_spec(SPECS / f"{name}.yaml"))) as exe:
        _driver_matches(exe)


def test_driver_graph_equals_reduced_dag_llama():
    cfg = load_spec(SPECS / "llama_decode.yaml")
    assert cfg.name == "llama_decode"
    import yaml

    tiny = yaml.safe_load((SPECS / "configs" / "llama_tiny.yaml").read_text())
    with build(llama_plan(tiny)) as exe:
        _driver_matches(exe)


BAD_KERNEL = """
dagbuild: 1
name: bad
dims: {n: 256}
kernels:
  k:
    code: |
      extern "C" __global__ void k(float* y, int n) { int i = threadIdx.x; if (i < n) y[i] = 1.f; }
    entry: k
    params: [f32* y, {param}]
buffers:
  y: {dtype: f32, shape: [n]}
nodes:
  - {id: node, kernel: k, grid: [1], block: [256], shared: {shared}, args: {y: y, n: n}}
"""


def _bad(param="i32 n", shared=0, code=None):
    text = BAD_KERNEL.replace("{param}", param).replace("{shared}", str(shared))
    if code is not None:
        text = text.replace('extern "C" __global__ void k(float* y, int n) { int i = threadIdx.x; '
                            'if (i < n) y[i] = 1.f; }', code)
    return parse_spec(textwrap.dedent(text))


@pytest.mark.parametrize("case", ["signature", "shared", "compile", "rebind"])
def test_bad_inputs_are_clear_and_leak_nothing(case, cp):
    before = _mem(cp)
    if case == "signature":
        with pytest.raises(SpecError) as e:
            build(plan(_bad(param="f32 n")))
        assert e.value.codes == ["signature"] and "'k'" in str(e.value) and "'n'" in str(e.value)
    elif case == "shared":
        with pytest.raises(SpecError) as e:
            build(plan(_bad(shared=1 << 20)))
        assert e.value.codes == ["launch_config"] and "'node'" in str(e.value) and "shared" in str(e.value)
    elif case == "compile":
        with pytest.raises(CompileError) as e:
            build(plan(_bad(code='extern "C" __global__ void k(float* y, int n) { y[0] = undefined_name; }')))
        assert "undefined_name" in str(e.value) and "'k'" in str(e.value)
    else:
        with build(plan(_bad())) as exe, pytest.raises(BuildError, match="'y'"):
            exe.rebind("y", cp.zeros(3, cp.float32))
    assert _mem(cp) == before, "device or pinned memory leaked"


def test_launch_limits_checked_against_the_device(cp):
    """A block the format allows but this device does not is refused before the driver sees it."""
    from dagbuild.backends import get_backend

    inner = get_backend("cuda")

    class Small(CountingBackend):
        def limits(self):
            return {**inner.limits(), "max_threads_per_block": 128}

    before = _mem(cp)
    with pytest.raises(SpecError) as e:
        build(plan(_bad()), backend=Small(inner))
    assert e.value.codes == ["launch_config"] and "'node'" in str(e.value) and "256 threads" in str(e.value)
    text = BAD_KERNEL.replace("{param}", "i32 n").replace("{shared}", "0").replace("block: [256]", "block: [64, 32]")
    with pytest.raises(SpecError) as e:
        plan(parse_spec(text))
    assert e.value.codes == ["launch_config"] and "2048 threads" in str(e.value)
    assert _mem(cp) == before


def test_dynamic_shared_memory_above_48k(cp):
    code = ('extern "C" __global__ void k(float* y, int n) { extern __shared__ float s[]; '
            'int i = threadIdx.x; s[i * 64] = (float)i; __syncthreads(); if (i < n) y[i] = s[i * 64]; }')
    with build(plan(_bad(shared=96 * 1024, code=code))) as exe:
        exe.launch(sync=True)
        assert np.array_equal(exe.buffers["y"].get(), np.arange(256, dtype=np.float32))


def test_closed_executable_refuses_work(cp):
    exe = build(plan(_bad()))
    exe.close()
    exe.close()  # idempotent
    with pytest.raises(BuildError, match="closed"):
        exe.launch()


def test_root_layout():
    assert (ROOT / "kernels" / "basic.cu").is_file()


def test_update_refuses_a_view_that_would_race(cp):
    """diamond: left writes halves[0], right writes halves[1], with no path between them."""
    with build(plan(load_spec(SPECS / "diamond.yaml"))) as exe:
        with pytest.raises(BuildError) as e:
            exe.update("left", args={"y": "halves[1]"})
        assert e.value.code == "race" and "'right'" in str(e.value) and "'left'" in str(e.value)
        exe.update("join", args={"a": "halves[1]"})  # join comes after both: no race, allowed
        x = np.arange(8192, dtype=np.float32)
        exe.buffers["x_host"][...] = x
        exe.launch(sync=True)
        assert np.allclose(exe.buffers["out_host"], -6.0 * x)  # halves[1] + halves[1] = 2 * (-3 x)


PDL_KERNEL = r'''
extern "C" __global__ void bump(const float* x, float* y, const float* w, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float wi = i < n ? w[i] : 0.0f;  // weights (never written by the graph) before the wait
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    if (i < n) y[i] = x[i] * 0.5f + wi;
}
'''


def _pdl_spec(steps: int = 24):
    from dagbuild.load import from_dict

    nodes = [{"id": "up", "memcpy": {"dst": "act[0]", "src": "h"}}]
    for s in range(steps):
        nodes.append({"id": f"k{s}", "kernel": "bump", "grid": ["ceil_div(n, 256)"], "block": [256],
                      "args": {"x": f"act[{s % 2}]", "y": f"act[{(s + 1) % 2}]", "w": f"w[{s}]", "n": "n"}})
    nodes.append({"id": "down", "memcpy": {"dst": "h", "src": f"act[{steps % 2}]"}})
    return from_dict({"dagbuild": 1, "name": "pdl", "dims": {"n": 1 << 16, "steps": steps},
                      "kernels": {"bump": {"code": PDL_KERNEL, "entry": "bump", "launch": "programmatic",
                                           "params": ["const f32* x", "f32* y", "const f32* w", "i32 n"]}},
                      "buffers": {"h": {"dtype": "f32", "shape": ["n"], "memory": "pinned"},
                                  "act": {"dtype": "f32", "shape": [2, "n"]},
                                  "w": {"dtype": "f32", "shape": ["steps", "n"]}},
                      "nodes": nodes})


def test_programmatic_edges_run_exactly_and_show_in_the_driver_graph(cp):
    from dagbuild.executable import ExecOptions

    p = plan(_pdl_spec())
    assert len(p.analysis.programmatic) == 23
    rng = np.random.default_rng(7)
    x0 = rng.standard_normal(p.dims["n"]).astype(np.float32)
    w = rng.standard_normal((p.dims["steps"], p.dims["n"])).astype(np.float32)
    want = x0.astype(np.float64)
    for s in range(p.dims["steps"]):
        want = want * 0.5 + w[s]
    for programmatic in (True, False):
        with build(p, options=ExecOptions(programmatic=programmatic)) as exe:
            exe.buffers["w"][...] = cp.asarray(w)
            for _ in range(3):  # repeated launches: each reads the last one's download only through h
                exe.buffers["h"][...] = x0
                exe.launch(sync=True)
                assert np.allclose(exe.buffers["h"], want, rtol=1e-5, atol=1e-5)
            kinds, edges = exe.driver_graph()
            n_prog = sum(k == "programmatic" for k in edges.values())
            assert n_prog == (23 if programmatic else 0)
            if programmatic:
                _driver_matches(exe)


def test_update_checks_ranges_like_binding(cp):
    with build(plan(load_spec(SPECS / "chain.yaml"), {"steps": 3})) as exe:
        node = next(n for n in exe.plan.nodes if n.kind == "kernel")
        ints = [a.param.name for a in node.op.args if a.param.dtype == "i32"]
        with pytest.raises(BuildError, match="does not fit in i32"):
            exe.update(node.id, args={ints[0]: 2**40})
        floats = [a.param.name for a in node.op.args if a.param.dtype == "f32"]
        if floats:
            with pytest.raises(BuildError, match="does not fit in f32"):
                exe.update(node.id, args={floats[0]: 3.0e40})
        exe.launch(sync=True)
