"""kernels/llama_fused.cu and specs/llama_decode_fused.yaml without a GPU: NVRTC compile of every entry for
every weight type, the params each spec declaration checks against, the PTX properties the kernels promise
(PDL wait and trigger, 16-byte weight loads, only weight loads before the wait, no local memory, no spills),
and the packed weight layout (pack/unpack round trip, state-dict planning of a fused plan)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import yaml
from conftest import KERNELS, SPECS
from helpers import entry_bodies, entry_param_types, needs_nvrtc, ptx_or_skip, ptxas_resources

from dagbuild.cli import main
from dagbuild.llama import weights as W
from dagbuild.llama.decode import llama_plan
from dagbuild.sources import read_kernel_source

SRC = KERNELS / "llama_fused.cu"
FUSED = SPECS / "llama_decode_fused.yaml"
WTYPES = ("f32", "f16", "bf16")
P, N, F = ".u64", ".u32", ".f32"  # pointer, 32-bit int, float in PTX .param lists
GEMV_PARAMS = {
    "qkv_rope": [P, P, P, P, P, P, P, P, P, N, N, N, N, N, N, F],
    "gate_up_silu": [P, P, P, P, N, N, N, F],
    "gemv_res": [P, P, P, N, N, N],
    "gemv_norm": [P, P, P, P, N, N, N, F],
}
OTHER_PARAMS = {
    **{f"attn_decode_{wt}": [P, P, P, P, P, P, P, P, N, N, N, N, N, F] for wt in WTYPES},
    "argmax_pdl": [P, P, N],
    **{f"embed_pdl_{wt}": [P, P, P, N] for wt in WTYPES},
}
ENTRIES = {**{f"{k}_{wt}": v for k, v in GEMV_PARAMS.items() for wt in WTYPES}, **OTHER_PARAMS}


@pytest.fixture(scope="module")
def ptx() -> str:
    return ptx_or_skip(read_kernel_source(SRC), "llama_fused")


@needs_nvrtc
def test_every_entry_with_its_params(ptx):
    entries = entry_param_types(ptx)
    assert set(entries) == set(ENTRIES)
    for name, params in ENTRIES.items():
        assert entries[name] == params, name


@needs_nvrtc
def test_every_entry_waits_and_triggers(ptx):
    for name, body in entry_bodies(ptx).items():
        assert "griddepcontrol.wait" in body, name
        assert "griddepcontrol.launch_dependents" in body, name
        assert ".local" not in body, f"{name} uses local memory"


@needs_nvrtc
def test_gemvs_stream_weights_16_bytes_at_a_time_and_only_weights_before_the_wait(ptx):
    for name, body in entry_bodies(ptx).items():
        if not any(name.startswith(k) for k in GEMV_PARAMS):
            continue
        # staged: 16-byte cp.async copies into the shared ring; the fallback without a ring: 16-byte read-only
        # loads
        assert re.search(r"cp\.async\.cg\.shared\.global \[%r\d+\], \[%rd\d+\], 16, %r\d+;", body), name
        assert "ld.global.nc.v4.u32" in body, name
        # In text order, everything before the first wait is the ring's first fill: weight copies only, no
        # load of x/pos and no store.
        head = body.split("griddepcontrol.wait", 1)[0]
        ops = re.findall(r"\b((?:ld|st|atom|red|prefetch)\.(?:global|shared)(?:\.\w+)*|cp\.async[\w.]*)", head)
        assert set(ops) == {"cp.async.cg.shared.global", "cp.async.commit_group"}, (name, set(ops))
        # every copy group is waited for before the kernel ends
        assert "cp.async.wait_group 0;" in body, name


@needs_nvrtc
def test_nothing_touches_memory_before_the_wait_in_the_other_kernels(ptx):
    for name, body in entry_bodies(ptx).items():
        if name in OTHER_PARAMS:
            head = body.split("griddepcontrol.wait", 1)[0]
            ops = set(re.findall(r"\b(?:ld|st|atom|red)\.global(?:\.\w+)*", head))
            if name.startswith("attn_decode_"):  # pos (a step input) and the first tile's cached K/V rows
                kv_load = "ld.global.cg.v4.f32" if name.endswith("f32") else "ld.global.cg.v2.u32"
                assert ops == {"ld.global.u32", kv_load}, (name, ops)
            else:
                assert not ops, (name, ops)


@needs_nvrtc
def test_ptxas_no_spills_no_stack_and_register_budget():
    props = ptxas_resources(read_kernel_source(SRC), "llama_fused")
    assert set(props) == set(ENTRIES)
    for name, (stack, st, ld, regs, _) in props.items():
        assert (stack, st, ld) == (0, 0, 0), name
        # two 256-thread GEMV blocks per SM (__launch_bounds__(256, 2)): at most 128 registers
        assert regs <= 128, (name, regs)


@needs_nvrtc
def test_x_staging_knob_keeps_the_projection_gemvs_unspilled():
    # -DFW_X_INFLIGHT=6 (down's 5632-wide x in one round trip) applies to gemv_res only; it must still fit
    props = ptxas_resources("#define FW_X_INFLIGHT 6\n" + read_kernel_source(SRC), "llama_fused_x6")
    for name, (stack, st, ld, regs, _) in props.items():
        assert (stack, st, ld) == (0, 0, 0), name
        assert regs <= 128, (name, regs)


@needs_nvrtc
def test_batch_one_knobs(ptx):
    """The defines of the spec's batch-1 GEMV forms build every entry and do what they say: DB_EVICT_FIRST hints
    the GEMVs' weight copies evict-first in L2 (and nothing else), FW_ONE_ROW drops the 2- and 4-row chunks' code;
    neither is in the default build."""
    src = read_kernel_source(SRC)
    hint = "cp.async.cg.shared.global.L2::cache_hint"
    assert hint not in ptx and "createpolicy" not in ptx
    ef = entry_bodies(ptx_or_skip("#define DB_EVICT_FIRST 1\n" + src, "llama_fused_ef"))
    assert set(ef) == set(ENTRIES)
    for name, body in ef.items():
        gemv = not name.startswith(("attn_decode_", "embed_pdl_", "argmax_pdl"))
        assert (hint in body and "createpolicy.fractional.L2::evict_first" in body) == gemv, name
    one = entry_bodies(ptx_or_skip("#define FW_ONE_ROW 1\n" + src, "llama_fused_one"))
    base = entry_bodies(ptx)
    for name in ENTRIES:
        if not name.startswith(("attn_decode_", "embed_pdl_", "argmax_pdl")):
            assert len(one[name]) < 0.6 * len(base[name]), name
    props = ptxas_resources("#define FW_ONE_ROW 1\n#define DB_EVICT_FIRST 1\n" + src, "llama_fused_one_ef")
    for name, (stack, st, ld, regs, _) in props.items():
        assert (stack, st, ld) == (0, 0, 0) and regs <= 128, (name, regs)


@needs_nvrtc
def test_attention_chain_knobs(ptx):
    """ATTN_GROUPED with ATTN_PRELOAD2 (off by default) builds every attn_decode entry, still reads only pos and
    cached K/V rows before the wait, and issues twice the default's K/V loads there (the second tile too)."""
    both = entry_bodies(ptx_or_skip("#define ATTN_GROUPED 1\n#define ATTN_PRELOAD2 1\n" + read_kernel_source(SRC),
                                    "llama_fused_attn_grouped"))
    base = entry_bodies(ptx)
    for wt in WTYPES:
        name = f"attn_decode_{wt}"
        kv_load = "ld.global.cg.v4.f32" if wt == "f32" else "ld.global.cg.v2.u32"
        heads = [b[name].split("griddepcontrol.wait", 1)[0] for b in (base, both)]
        ops = set(re.findall(r"\b(?:ld|st|atom|red)\.global(?:\.\w+)*", heads[1]))
        assert ops == {"ld.global.u32", kv_load}, (name, ops)
        assert heads[1].count(kv_load) == 2 * heads[0].count(kv_load) > 0, name
        assert ".local" not in both[name], name


# ----------------------------------------------------------------------------------------------------------
# the spec
# ----------------------------------------------------------------------------------------------------------


@needs_nvrtc
@pytest.mark.parametrize("wt", WTYPES)
def test_fused_spec_compiles_for_every_weight_type(wt, capsys):
    assert main(["compile", str(FUSED), "--set", f"wt={wt}"]) == 0
    out = capsys.readouterr().out
    assert f"qkv_rope_{wt} ok" in out and f"gemv_res_{wt} ok" in out and f"attn_decode_{wt} ok" in out


@pytest.mark.parametrize("config", ["llama_tiny.yaml", "tinyllama.yaml", "llama32_1b.yaml"])
def test_fused_spec_with_configs(config, capsys):
    assert main(["validate", str(FUSED), "--config", str(SPECS / "configs" / config)]) == 0
    plan = llama_plan(yaml.safe_load((SPECS / "configs" / config).read_text()), FUSED)
    per_layer = [n for n in plan.nodes if n.id.endswith(".0")]
    assert len(per_layer) <= 6
    assert {n.op.kernel for n in plan.nodes if n.kind == "kernel"} <= set(plan.spec.kernels)
    # every kernel launches programmatically, but the SiLU of the GEMM path's cuBLAS form (batch >= gemm_batch),
    # which follows a cuBLAS child graph (a plain edge) and so has no producer kernel to overlap (the GEMM path's
    # norms and attention may follow kernels/gemm.cu's GEMMs: programmatic there, plain after a child graph)
    gemm_path = {"silu_pairs"}
    assert all((k.launch == "plain") == (name in gemm_path) for name, k in plan.spec.kernels.items())


def test_fused_spec_has_what_the_runner_needs():
    from dagbuild.llama.decode import REQUIRED

    plan = llama_plan({}, FUSED)
    for name in (*REQUIRED, "tokens", "pos", "next", "wqkv", "w_gate_up", "embed_tokens", "attn_norm", "mlp_norm",
                 "wo", "w_down", "final_norm", "lm_head"):
        assert name in plan.buffers, name
    unfused = llama_plan({})
    launch_shape = {"attn_chunk", "attn_decode_chunk", "attn_decode_splits",  # the fused kernels' own tuning dims
                    "sms", "gemv_blocks_per_sm", "gemv_shared",
                    "gemv_qkv_threads", "gemv_res_threads", "gemv_qkv_grid", "gemv_one_row",
                    "mma_batch", "mma_cluster", "mma_shared", "attn_batch", "attn_min_keys",  # and the batched ones
                    "attn_wide_batch", "attn_wide_keys", "attn_mma", "attn_mma_keys",
                    "mv_batch", "mv_small_batch", "mv_shared", "mv_shared_max", "mv_fit", "mvc_batch", "mvc_cluster",
                    "layer_kernel", "layer_slots", "stack_slots",  # and the persistent layer kernel's
                    "gemm_batch", "gemm_ws_bytes", "gemm_pad", "tc_batch", "tc_stages", "tc_norm", "qkv_split",
                    "o_split",
                    "gate_up_split", "down_split", "head_split"}  # and the GEMM path's
    assert {k: v for k, v in plan.dims.items() if k not in launch_shape} == \
        {k: v for k, v in unfused.dims.items() if k not in launch_shape}


@pytest.mark.parametrize("threads", [256, 128, 64])
def test_gemv_block_threads_at_batch_one(threads):
    """gemv_qkv_threads / gemv_res_threads: the same warps (a row pair each) in blocks of that many threads, so
    more, smaller blocks; the QKV GEMV keeps gemv_shared at 256 threads, others (and the O and down GEMVs, with
    their 3-slot rings) get their ring and one x row of shared memory. The MV
    engine (batch >= 2) keeps its 256-thread blocks."""
    warps = threads // 32
    plan = llama_plan({"gemv_qkv_threads": threads, "gemv_res_threads": threads}, FUSED)
    ops = {n.id: n.op for n in plan.nodes}
    for node, pairs, k in (("qkv.0", 1280, 2048), ("o_proj.0", 1024, 2048), ("down_proj.21", 1024, 5632)):
        op = ops[node]
        assert op.block == (threads, 1, 1) and op.grid[0] == pairs // warps, node
        if node.startswith("qkv"):
            assert op.shared == (106496 if threads == 256 else 256 * threads + 2 * k + 4 * k), node
        else:  # gemv_res: a ring of 3 slots (FW_STAGES, 384 bytes a thread) and one x row
            assert op.shared == 384 * threads + 4 * k and op.kernel == "gemv_res_1", node
            assert plan.kernels[op.kernel].options == ("-DFW_STAGES=3", "-DFW_ONE_ROW=1", "-DDB_EVICT_FIRST=1"), node
    ops = {n.id: n.op for n in llama_plan({"batch": 2, "gemv_res_threads": threads, "gemm_batch": 0}, FUSED).nodes}
    assert ops["o_proj.0"].kernel == "gemv_res_mv" and ops["o_proj.0"].block == (256, 1, 1)
    with pytest.raises(Exception, match="gemv_qkv_threads and gemv_res_threads"):
        llama_plan({"gemv_res_threads": 96 + threads % 64 + 8}, FUSED)


@pytest.mark.parametrize("grid", [0, 132, 80])
def test_gemv_qkv_grid_sets_the_batch_one_qkv_blocks(grid):
    """gemv_qkv_grid: that many blocks for the batch-1 QKV GEMV (warps stride over the 1280 pairs), 0 the rule's
    160; the other GEMVs and shared memory keep theirs; a negative grid is refused by name."""
    ops = {n.id: n.op for n in llama_plan({"gemv_qkv_grid": grid}, FUSED).nodes}
    base = {n.id: n.op for n in llama_plan({}, FUSED).nodes}
    assert ops["qkv.3"].grid == (grid or 160, 1, 1) and ops["qkv.3"].kernel == "qkv_1"
    assert ops["qkv.3"].shared == base["qkv.3"].shared and ops["o_proj.3"] == base["o_proj.3"]
    with pytest.raises(Exception, match="gemv_qkv_grid"):
        llama_plan({"gemv_qkv_grid": -grid - 1}, FUSED)


# ----------------------------------------------------------------------------------------------------------
# packed weights
# ----------------------------------------------------------------------------------------------------------

TINY = yaml.safe_load((SPECS / "configs" / "llama_tiny.yaml").read_text())


def test_pack_unpack_round_trip():
    rng = np.random.default_rng(0)
    heads, kv_heads, hd, hidden, ffn = 4, 2, 16, 24, 10
    wq = rng.standard_normal((3, heads * hd, hidden))
    wk = rng.standard_normal((3, kv_heads * hd, hidden))
    wv = rng.standard_normal((3, kv_heads * hd, hidden))
    packed = W.pack_qkv(wq, wk, wv)
    assert packed.shape == (3, (heads + 2 * kv_heads) * hd, hidden)
    for a, b in zip(W.unpack_qkv(packed, heads, kv_heads, hd), (wq, wk, wv), strict=True):
        assert np.array_equal(a, b)
    gate, up = rng.standard_normal((2, ffn, hidden)), rng.standard_normal((2, ffn, hidden))
    gu = W.pack_gate_up(gate, up)
    assert gu.shape == (2, 2 * ffn, hidden)
    assert np.array_equal(gu[:, 0::2], gate) and np.array_equal(gu[:, 1::2], up)
    assert np.array_equal(gu[1, 6], gate[1, 3]) and np.array_equal(gu[1, 7], up[1, 3])
    g2, u2 = W.unpack_gate_up(gu)
    assert np.array_equal(g2, gate) and np.array_equal(u2, up)
    with pytest.raises(W.WeightsError):
        W.unpack_qkv(packed, heads, kv_heads + 1, hd)
    with pytest.raises(W.WeightsError):
        W.pack_gate_up(gate, up[:, :-1])


def test_weight_view_writes_the_packed_layout():
    """Writing every HF role through weight_view into a fused plan's (NumPy) buffers gives pack_qkv /
    pack_gate_up, and reading back through it gives the HF tensors."""
    fused = llama_plan({**TINY, "wt": "f32"}, FUSED)
    unfused = llama_plan({**TINY, "wt": "f32"})
    bufs = {name: np.zeros(b.shape, np.float32) for name, b in fused.buffers.items()}
    rng = np.random.default_rng(1)
    hf = {}
    for role in W.WEIGHT_BUFFERS:
        shape = W.weight_shape(fused, role)
        assert shape == tuple(unfused.buffers[role].shape), role
        hf[role] = rng.standard_normal(shape).astype(np.float32)
        if role in W.LAYERED_BUFFERS:
            for i in range(fused.dims["layers"]):
                W.weight_view(bufs, fused.dims, role, i)[...] = hf[role][i]
        else:
            W.weight_view(bufs, fused.dims, role, None)[...] = hf[role]
    assert np.array_equal(bufs["wqkv"], W.pack_qkv(hf["wq"], hf["wk"], hf["wv"]))
    assert np.array_equal(bufs["w_gate_up"], W.pack_gate_up(hf["w_gate"], hf["w_up"]))
    for role in W.WEIGHT_BUFFERS:
        for i in range(fused.dims["layers"]) if role in W.LAYERED_BUFFERS else [None]:
            got = W.weight_view(bufs, fused.dims, role, i)
            assert np.array_equal(got, hf[role] if i is None else hf[role][i]), (role, i)
    assert W.weight_buffer_names(fused) == ["embed_tokens", "attn_norm", "wqkv", "wo", "mlp_norm", "w_gate_up",
                                            "w_down", "final_norm", "lm_head"]
    assert W.weight_buffer_names(unfused) == list(W.WEIGHT_BUFFERS)
    assert W.weight_dtype(fused, "wk") == "f32"


def test_plan_state_dict_of_a_fused_plan():
    fused = llama_plan(dict(TINY), FUSED)
    unfused = llama_plan(dict(TINY))
    shapes = {key: (unfused.buffers[buf].shape[1:] if idx is not None else unfused.buffers[buf].shape)
              for key, (buf, idx) in W.hf_key_map(TINY["layers"]).items()}
    assert sorted(W.plan_state_dict(fused, shapes)) == sorted(W.plan_state_dict(unfused, shapes))
    bad = dict(shapes)
    bad["model.layers.1.self_attn.k_proj.weight"] = (3, 3)
    with pytest.raises(W.WeightsError, match=r"wqkv\[1\] \(wk rows\)"):
        W.plan_state_dict(fused, bad)
    del bad["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(W.WeightsError, match=r"missing .*wqkv\[1\] \(wk rows\)"):
        W.plan_state_dict(fused, bad)


def test_a_packed_buffer_of_the_wrong_shape_is_refused():
    class Fake:
        name = "fake"

        def __init__(self, plan, shape):
            self.dims = plan.dims
            self.buffers = dict(plan.buffers)
            self.buffers["wqkv"] = type("B", (), {"shape": shape, "dtype": "f16"})()

    fused = llama_plan(dict(TINY), FUSED)
    good = tuple(fused.buffers["wqkv"].shape)
    with pytest.raises(W.WeightsError, match="packed buffer 'wqkv'"):
        W.plan_state_dict(Fake(fused, (good[0], good[1] - 64, good[2])), {})


def test_attn_decode_chunk_below_attn_chunk_is_refused():
    """Batch 1's splits (whole chunks of attn_decode_chunk keys, at most attn_decode_splits of them) must fit the
    split buffers sized by attn_chunk."""
    from dagbuild.bind import bind
    from dagbuild.load import load_spec

    _, issues = bind(load_spec(FUSED), {"attn_decode_chunk": 32, "attn_chunk": 64})
    assert issues and "attn_decode_chunk must be at least attn_chunk" in str(issues[0])
    for max_seq, splits in ((1000, 8), (2048, 12), (100, 1)):  # ceil(max_seq / 128) splits, at most 12
        plan = llama_plan({"max_seq": max_seq}, FUSED)
        attn = next(n for n in plan.nodes if n.id == "attn.0").op
        chunk = next(a.value for a in attn.args if a.param.name == "chunk")
        assert attn.grid[1] == splits and chunk == 128, max_seq  # the kernel sizes them by the context
    _, issues = bind(load_spec(FUSED), {"attn_decode_splits": 0})
    assert issues and "attn_decode_splits" in str(issues[0])
