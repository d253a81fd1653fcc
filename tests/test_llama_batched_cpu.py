"""kernels/llama_batched.cu and the fused spec's batch variants without a GPU: NVRTC compile of every entry with
the params the spec declares, the PDL contract in the PTX (only weight copies before the wait), thread-block
clusters on sm_90, no spills, and which kernel and launch shape each batch bucket binds."""

from __future__ import annotations

import re

import pytest
from conftest import KERNELS, SPECS
from helpers import entry_bodies, entry_param_types, needs_nvrtc, nvrtc_reason, ptxas_resources

from dagbuild import kernels
from dagbuild.bind import bind
from dagbuild.dot import to_dot
from dagbuild.llama.decode import llama_plan
from dagbuild.load import load_spec
from dagbuild.sources import read_kernel_source

SRC = KERNELS / "llama_batched.cu"
FUSED = SPECS / "llama_decode_fused.yaml"
P, N, F = ".u64", ".u32", ".f32"
PROJ_PARAMS = {
    "qkv_rope": [P, P, P, P, P, P, P, P, P, N, N, N, N, N, N, F],
    "gate_up_silu": [P, P, P, P, N, N, N, F],
    "gemv_res": [P, P, P, N, N, N],
    "gemv_norm": [P, P, P, P, N, N, N, F],
}
MMA_PARAMS = {f"{k}_mma": v for k, v in PROJ_PARAMS.items()}
MV_PARAMS = {f"{k}_mv": v for k, v in PROJ_PARAMS.items()}
MVC_PARAMS = {f"{k}_mvc": v for k, v in PROJ_PARAMS.items()}
MINE = {**{f"{k}_{wt}": v for k, v in (MMA_PARAMS | MV_PARAMS | MVC_PARAMS).items() for wt in ("f32", "f16", "bf16")},
        **{f"attn_decode_batched_{wt}": [P, P, P, P, P, P, P, P, N, N, N, N, N, F] for wt in ("f32", "f16", "bf16")},
        **{f"attn_qkv_{wt}": [P] * 10 + [N] * 5 + [F] for wt in ("f32", "f16", "bf16")},
        **{f"attn_qkv_mma_{wt}": [P] * 10 + [N] * 5 + [F] for wt in ("f32", "f16", "bf16")}}


@pytest.fixture(scope="module")
def bodies() -> dict[str, str]:
    if nvrtc_reason():
        pytest.skip(str(nvrtc_reason()))
    return entry_bodies(kernels.compile_ptx(read_kernel_source(SRC), "llama_batched"))


@needs_nvrtc
def test_entries_and_params(bodies):
    entries = entry_param_types(kernels.compile_ptx(read_kernel_source(SRC), "llama_batched"))
    for name, params in MINE.items():
        assert entries[name] == params, name


@needs_nvrtc
def test_pdl_contract_and_clusters(bodies):
    for name in MINE:
        body = bodies[name]
        assert "griddepcontrol.wait" in body and "griddepcontrol.launch_dependents" in body, name
        assert ".local" not in body, name
        head = body.split("griddepcontrol.wait", 1)[0]
        ops = set(re.findall(r"\b((?:ld|st|atom|red|prefetch)\.(?:global|shared)(?:\.\w+)*|cp\.async[\w.]*)", head))
        if name in ("attn_qkv_mma_f16", "attn_qkv_mma_bf16") or name.startswith("attn_decode_batched_"):
            # pos (a step input) and the first pass of cached K/V rows (kernels/llama_fused.md, PDL contract)
            assert ops <= {"ld.global.u32", "cp.async.cg.shared.global", "cp.async.commit_group"}, (name, ops)
            assert {"ld.global.u32", "cp.async.cg.shared.global"} <= ops, name
        elif name.startswith("attn_"):  # nothing before the wait: q, K and V are all produced data
            assert not ops, (name, ops)
        else:  # weights only: 16-byte copies into the ring
            assert ops == {"cp.async.cg.shared.global", "cp.async.commit_group"}, (name, ops)
        assert "cp.async.wait_group 0;" in body, name
    for wt in ("f16", "bf16"):
        for k in MMA_PARAMS:
            body = bodies[f"{k}_{wt}"]
            assert f"mma.sync.aligned.m16n8k16.row.col.f32.{wt}.{wt}.f32" in body, (k, wt)
            assert "ldmatrix.sync.aligned" in body and "mapa.shared::cluster" in body, (k, wt)
            assert re.search(r"\.reqnctapercluster 8, 1, 1", body), (k, wt)
        for k in MV_PARAMS:  # weights as A straight from the ring (no ldmatrix), no clusters, two blocks per SM
            body = bodies[f"{k}_{wt}"]
            assert f"mma.sync.aligned.m16n8k16.row.col.f32.{wt}.{wt}.f32" in body, (k, wt)
            assert "ldmatrix" not in body and ".reqnctapercluster" not in body, (k, wt)
            assert re.search(r"\.maxntid 512, 1, 1", body), (k, wt)  # 256- or 512-thread blocks
        for k in MVC_PARAMS:  # the MV engine's streaming in clusters of 4 (MVC_CLUSTER) that split K
            body = bodies[f"{k}_{wt}"]
            assert f"mma.sync.aligned.m16n8k16.row.col.f32.{wt}.{wt}.f32" in body, (k, wt)
            assert "ldmatrix" not in body and "mapa.shared::cluster" in body, (k, wt)
            assert re.search(r"\.reqnctapercluster 4, 1, 1", body) and re.search(r"\.maxntid 512, 1, 1", body)
            assert "barrier.cluster.arrive" in body and "ld.shared::cluster" in body, (k, wt)
        assert ".reqnctapercluster" not in bodies["gemv_res_mma_f32"]
        assert ".reqnctapercluster" not in bodies["gemv_res_mvc_f32"]  # f32: the GEMV engine


@needs_nvrtc
def test_ptxas_no_spills():
    props = ptxas_resources(read_kernel_source(SRC), "llama_batched")
    for name in MINE:
        stack, st, ld, regs, _ = props[name]
        assert (stack, st, ld) == (0, 0, 0), name
        assert regs <= 255, (name, regs)


@pytest.mark.parametrize("wt", ["f16", "f32"])
def test_buckets_choose_their_kernels(wt):
    """Without the GEMM path (gemm_batch 0): batch 1: the GEMV engine's batch-1 forms; from 2: the MV engine (two
    blocks per SM up to mv_small_batch, except the down projection, whose ffn-wide x rows need one), but the down
    projection from mma_batch (32): the MMA engine in clusters of 8; attention from attn_batch (2) one block a (row,
    KV head)."""
    spec, programs = load_spec(FUSED), {}
    for batch in [1, 2, 3, 4, *range(8, 257, 8)]:
        p, issues = bind(spec, {"batch": batch, "cache_batch": 256, "wt": wt, "gemm_batch": 0}, programs)
        assert not issues, issues
        chosen = {n.id.split(".")[0]: n.op for n in p.nodes if hasattr(n.op, "kernel")}
        engine = "_1" if batch == 1 else "_mv"
        assert chosen["qkv"].kernel == "qkv" + engine
        assert chosen["o_proj"].kernel == "gemv_res" + engine
        assert chosen["down_proj"].kernel == "gemv_res" + ("_mma" if batch >= 32 else engine)
        assert chosen["gate_up"].kernel == "gate_up" + engine
        assert chosen["lm_head"].kernel == "gemv_norm" + engine
        assert chosen["attn"].kernel == ("attn_batched" if batch >= 2 else "attn")
        if batch >= 32:
            op = chosen["down_proj"]
            assert op.grid[0] % 8 == 0 and op.block == (256, 1, 1) and op.shared == 185600
            assert p.kernels["gemv_res_mma"].entry == f"gemv_res_mma_{wt}"
        if batch >= 2:
            for key in ("qkv", "o_proj", "gate_up", "down_proj", "lm_head"):
                op, two = chosen[key], batch <= 8 and key != "down_proj"
                if op.kernel.endswith("_mma"):
                    continue
                assert op.shared == (115712 if two else 232448), (batch, key)
                assert op.grid[0] <= (2 if two else 1) * 132 and op.block == (256, 1, 1), (batch, key)
            assert chosen["o_proj"].grid[0] == 128  # one block per 16-row tile: 1024 row pairs, 8 per tile
            assert p.kernels["gate_up_mv"].entry == f"gate_up_silu_mv_{wt}"
        if batch >= 2:
            attn = chosen["attn"]
            assert attn.grid[0] == batch * 4 and attn.grid[1] <= 8
            assert {a.param.name: a.value for a in attn.args}["chunk"] == 64


GEMM_LAYER = ["attn_norm", "qkv_gemm", "attn", "o_gemm", "mlp_norm", "gate_up_gemm", "silu", "down_gemm"]
TC_LAYER = [k for k in GEMM_LAYER if k != "silu"]  # kernels/gemm.cu: SiLU*up is the gate/up GEMM's epilogue
RIDING_LAYER = [k for k in TC_LAYER if not k.endswith("_norm")]  # tc_norm 2: the norms on the GEMMs
GEMM_SHAPES = {"qkv_gemm": (2560, 2048), "o_gemm": (2048, 2048), "gate_up_gemm": (11264, 2048),
               "down_gemm": (2048, 5632), "lm_head": (32000, 2048)}


@pytest.mark.parametrize("tc_norm", [2, 0])
@pytest.mark.parametrize("wt", ["f16", "f32"])
def test_gemm_path_from_gemm_batch(wt, tc_norm):
    """From gemm_batch rows a layer is RMSNorm rounded to wt, the QKV GEMM, attention fed by it (RoPE, KV append,
    output in wt), the O GEMM (into x), RMSNorm, the gate/up GEMM, SiLU*up, the down GEMM (into x), and the LM
    head a GEMM after the final norm. Up to tc_batch rows the GEMMs are kernels/gemm.cu's programmatic kernel
    nodes (SiLU in the gate/up GEMM, each projection's split from its dim, no cuBLAS workspace); above it cuBLAS
    child graphs (beta 1 for the residual adds). Below gemm_batch (or with gemm_batch 0) the fused nodes. With
    tc_norm 2 (up to tc_batch rows) the O and down GEMMs prepare the next norm's operand (the next
    layer's attention norm, after the last layer the final norm) and the QKV, gate/up and LM-head GEMMs scale
    their rows by it: one norm node (the first layer's rms_partials)."""
    spec, programs = load_spec(FUSED), {}
    cases = ((31, 32, 64), (32, 32, 64), (256, 32, 64), (64, 0, 64), (2, 2, 64), (64, 12, 0), (65, 12, 64))
    for batch, gemm_batch, tc_batch in cases:
        p, issues = bind(spec, {"batch": batch, "cache_batch": 256, "wt": wt, "gemm_batch": gemm_batch,
                                "tc_batch": tc_batch, "o_split": 2, "tc_norm": tc_norm, "attn_mma": 1}, programs)
        assert not issues, issues
        ids = [n.id for n in p.nodes]
        by_id = {n.id: n.op for n in p.nodes}
        if not (gemm_batch and batch >= gemm_batch):
            assert "qkv.0" in ids and "lm_head" in ids and not any("gemm" in i for i in ids), batch
            assert p.buffers["gemm_ws"].nbytes == 256
            continue
        tc = batch <= tc_batch
        riding = tc and tc_norm == 2  # the norms on the GEMMs around them: no norm nodes in the layers
        layer = (RIDING_LAYER if riding else TC_LAYER) if tc else GEMM_LAYER
        first = ["attn_norm"] * riding + layer  # the first layer's operand (rms_partials)
        assert [i for i in ids if i.endswith(".0")] == [f"{k}.0" for k in first], batch
        tail = ["final_norm"] * (not riding) + ["lm_head_gemm", "argmax", "download"]
        assert len(ids) == 3 + len(layer) * 22 + riding + len(tail) and ids[-len(tail):] == tail
        if riding:
            op = by_id["attn_norm.0"]
            assert op.kernel == "rms_partials" and p.kernels["rms_partials"].entry == f"rms_partials_{wt}"
            assert {a.param.name: a.view.label for a in op.args if a.view} == {
                "x": "x", "norm": "attn_norm[0]", "xn": "xh", "ssq": "ssq"}
            assert p.buffers["ssq"].shape == (batch, 2048 // 16)
        assert not any(i.split(".")[0] in ("qkv", "o_proj", "gate_up", "down_proj", "lm_head") for i in ids)
        ops = {k: by_id[f"{k}.21"] for k in ("qkv_gemm", "o_gemm", "gate_up_gemm", "down_gemm")}
        ops["lm_head"] = by_id["lm_head_gemm"]
        if tc:
            split = {"qkv_gemm": 4, "o_gemm": 2, "gate_up_gemm": 1, "down_gemm": 4, "lm_head": 1}
            epi = {"qkv_gemm": "store", "o_gemm": "add", "gate_up_gemm": "silu", "down_gemm": "add",
                   "lm_head": "store"}
            norms = {"qkv_gemm": "attn_norm[21]", "gate_up_gemm": "mlp_norm[21]", "lm_head": "final_norm"}
            # tc_norm 2: the residual GEMMs write the next norm's operand, the norms' consumers scale by it
            nexts = {"o_gemm": "mlp_norm[21]", "down_gemm": "final_norm"}
            for k, op in ops.items():
                args = {a.param.name: a for a in op.args}
                n, kk = GEMM_SHAPES[k]
                scaled, adds = riding and k in norms, riding and k in nexts
                name = "add_norm" if adds else f"scaled_{epi[k]}" if scaled else epi[k]
                assert op.kernel == f"tc_{name}_{split[k]}", k
                assert p.kernels[op.kernel].entry == f"gemm_{name}_{wt}"
                if scaled:
                    assert (args["a"].view.label, args["ssq"].view.label) == ("xh", "ssq"), k
                    assert args["eps"].value == pytest.approx(1e-5) and op.shared == 3 * 32768 + 256
                if adds:
                    assert (args["norm"].view.label, args["xn"].view.label, args["ssq"].view.label) == (
                        nexts[k], "xh", "ssq"), k
                assert p.kernels[op.kernel].options == (f"-DGT_SPLIT={split[k]}", "-DGT_ROW=256")
                assert op.launch == "programmatic"
                assert (args["m"].value, args["n"].value, args["k"].value) == (batch, n, kk), k
                assert op.grid == (-(-n // 64) * split[k], -(-batch // 64), 1), k
                assert op.block == (256, 1, 1) and op.shared == 3 * 32768 + 256 * scaled
            out = {k: op.args[2].view.label for k, op in ops.items()}
            assert out == {"qkv_gemm": "qkv", "o_gemm": "x", "gate_up_gemm": "act_h", "down_gemm": "x",
                           "lm_head": "logits"}
            assert ops["down_gemm"].args[1].view.label == "w_down[21]"
            if riding:  # a layer before the last hands the next layer's attention norm on
                assert by_id["down_gemm.3"].args[6].view.label == "attn_norm[4]"
            assert by_id["qkv_gemm.3" if riding else "attn_norm.3"].launch == "programmatic"
            assert by_id["attn.3"].launch == "programmatic"
            assert p.buffers["gemm_ws"].nbytes == 256
        else:
            gemm = {k: op.body[0] for k, op in ops.items()}
            shape = {k: tuple(c.arg(x).value for x in "mnk") for k, c in gemm.items()}
            assert shape == {k: (batch, *nk) for k, nk in GEMM_SHAPES.items()}
            assert {k: (c.arg("c").view.label, c.arg("beta").value) for k, c in gemm.items()} == {
                "qkv_gemm": ("qkv", 0.0), "o_gemm": ("x", 1.0), "gate_up_gemm": ("gu", 0.0),
                "down_gemm": ("x", 1.0), "lm_head": ("logits", 0.0)}
            assert gemm["down_gemm"].arg("b").view.label == "w_down[21]"
            assert p.buffers["gemm_ws"].nbytes == 32 << 20
        attn = by_id["attn.21"]
        # the tensor-core attention (attn_mma; f32 models run attn_qkv's arithmetic in it), 74,496 bytes of
        # shared memory at head_dim 64: passes of 128 keys of K and V in f32, q in wt, the new key and value
        assert attn.kernel == "attn_qkv_mma" and p.kernels["attn_qkv_mma"].entry == f"attn_qkv_mma_{wt}"
        assert attn.shared == 4 * (128 * (2 * 64 + 12) + 8 * (64 + 8) + 2 * 64) == 74496
        args = {a.param.name: a for a in attn.args}
        assert args["chunk"].value == 256  # attn_mma_keys: two passes in one split, no combine
        assert {k: args[k].view.label for k in ("qkv", "k_cache", "v_cache", "bias", "out")} == {
            "qkv": "qkv", "k_cache": "k_cache[21]", "v_cache": "v_cache[21]", "bias": "qkv_bias[21]",
            "out": "attn_h"}
        # one block a (row, kv head) (TinyLlama: 8 query heads a kv head, one group); splits: max_seq / attn_chunk,
        # but one wave of `sms` blocks at most
        assert attn.grid[0] == batch * 4 and attn.grid[1] == min(512 // 64, -(-132 // (batch * 4)))


def test_gemm_splits_and_stages_are_checked():
    spec = load_spec(FUSED)
    bad = (({"down_split": 3}, "down_split"), ({"qkv_split": 16}, "qkv_split"), ({"head_split": 0}, "head_split"),
           ({"tc_stages": 1}, "tc_stages"), ({"tc_stages": 8}, "tc_stages"), ({"tc_batch": -1}, "tc_batch"))
    for dims, word in bad:
        _, issues = bind(spec, {"batch": 32, "cache_batch": 32, **dims})
        assert issues and word in str(issues[0]), (dims, issues)


@pytest.mark.parametrize("gemm_pad", [1, 64])
def test_gemm_pad_rounds_the_cublas_rows(gemm_pad):
    """gemm_pad: where cuBLAS runs (above tc_batch), its GEMMs' m and the GEMM path's row buffers are the batch
    rounded up to a multiple of gemm_pad (fewer distinct shapes for cuBLAS to plan in a pool build); below it, and
    with gemm_pad 1, exactly the batch. Every bucket still plans (no race, every child access declared)."""
    from dagbuild.plan import plan

    spec = load_spec(FUSED)
    ms = set()
    for batch in (1, 8, 32, 40, 72, 300):
        p = plan(spec, {"batch": batch, "cache_batch": 300, "max_seq": 64, "gemm_pad": gemm_pad})
        rows = batch if batch <= 32 or gemm_pad == 1 else -(-batch // gemm_pad) * gemm_pad
        for name in ("x", "xh", "qkv", "attn_h", "gu", "act_h", "logits"):
            assert p.buffers[name].shape[0] == rows, (batch, name)
        assert p.buffers["next"].shape[0] == batch
        for n in p.nodes:
            if n.op.kind == "child":
                (m,) = [a.value for call in n.op.body for a in call.args if a.param.name == "m"]
                assert m == rows, (batch, n.id)
                ms.add(m)
    assert ms == ({40, 72, 300} if gemm_pad == 1 else {64, 128, 320})
    _, issues = bind(spec, {"batch": 4, "cache_batch": 4, "gemm_pad": 0})
    assert issues and "gemm_pad must be >= 1" in str(issues[0])


def test_buckets_padded_to_one_size_share_their_child_ops():
    """A pool binds every bucket with one ``programs``: where gemm_pad makes two buckets' GEMM calls equal (40 and
    64 rows pad to 64), the second bucket gets the first one's child ops (the same objects), and every op equals a
    fresh bind's; a bucket padded to another size (72 → 128) gets ops of its own."""
    spec = load_spec(FUSED)
    programs: dict = {}
    dims = {"cache_batch": 128, "max_seq": 64, "gemm_pad": 64}
    plans = {}
    for batch in (72, 40, 64):  # the first bind validates, the later ones run compiled bindings
        plans[batch], issues = bind(spec, {**dims, "batch": batch}, programs)
        fresh, fresh_issues = bind(spec, {**dims, "batch": batch}, {})
        assert not issues and not fresh_issues
        assert [(n.id, n.op) for n in plans[batch].nodes] == [(n.id, n.op) for n in fresh.nodes]

    def children(p):
        return {n.id: n.op for n in p.nodes if n.op.kind == "child"}

    a, b, c = (children(plans[n]) for n in (40, 64, 72))
    assert len(a) > 80 and a.keys() == b.keys() == c.keys()
    assert all(a[i] is b[i] for i in a)
    assert not any(a[i] == c[i] for i in a)


def test_gemm_batch_is_checked():
    _, issues = bind(load_spec(FUSED), {"batch": 4, "cache_batch": 4, "gemm_batch": 1})
    assert issues and "gemm_batch must be 0" in str(issues[0])


def test_attn_min_keys_is_checked():
    """The batched attention divides by it (and attn_wide_keys, attn_mma_keys) on the device: 0 is refused at bind,
    naming it; tc_norm other than 0 or 2 likewise (1, the norms inside the GEMMs, is gone), and tc_norm 2 with a
    residual GEMM split 8 ways."""
    _, issues = bind(load_spec(FUSED), {"batch": 4, "cache_batch": 4, "attn_min_keys": 0})
    assert issues and issues[0].code == "check" and "attn_min_keys" in issues[0].message
    _, issues = bind(load_spec(FUSED), {"batch": 64, "cache_batch": 64, "attn_wide_keys": 0})
    assert issues and issues[0].code == "check" and "attn_wide_keys" in issues[0].message
    _, issues = bind(load_spec(FUSED), {"batch": 16, "cache_batch": 16, "attn_mma_keys": 0})
    assert issues and issues[0].code == "check" and "attn_mma_keys" in issues[0].message
    for bad in (1, 3):
        _, issues = bind(load_spec(FUSED), {"batch": 16, "cache_batch": 16, "tc_norm": bad})
        assert issues and issues[0].code == "check" and "tc_norm must be 0" in issues[0].message
    _, issues = bind(load_spec(FUSED), {"batch": 16, "cache_batch": 16, "tc_norm": 2, "o_split": 8})
    assert issues and issues[0].code == "check" and "o_split and down_split" in issues[0].message
    _, issues = bind(load_spec(FUSED), {"gemv_one_row": 2})
    assert issues and issues[0].code == "check" and "gemv_one_row must be 0" in issues[0].message


def test_mvc_engine_from_mvc_batch_in_whole_clusters():
    """mvc_batch (0: off) switches every projection and the LM head to the MVC engine from that batch: grids of
    whole clusters of mvc_cluster blocks, at most sms blocks, one block per SM (mv_shared_max)."""
    spec, programs = load_spec(FUSED), {}
    projections = ("qkv", "o_proj", "gate_up", "down_proj", "lm_head")
    for batch in (1, 8, 15, 16, 64, 256):
        p, issues = bind(spec, {"batch": batch, "cache_batch": 256, "wt": "f16", "mvc_batch": 16, "gemm_batch": 0},
                         programs)
        assert not issues, issues
        chosen = {n.id.split(".")[0]: n.op for n in p.nodes if hasattr(n.op, "kernel")}
        for key in projections:
            op = chosen[key]
            assert op.kernel.endswith("_mvc") == (batch >= 16), (batch, key, op.kernel)
            if batch >= 16:
                assert op.grid[0] % 4 == 0 and 4 <= op.grid[0] <= 132 and op.shared == 232448, (batch, key, op.grid)
    assert chosen["qkv"].grid[0] == 128  # 160 tiles over 32 clusters of 4: 5 tiles each
    p, issues = bind(spec, {"batch": 64, "cache_batch": 64, "wt": "f16"}, {})
    assert not issues and not any(str(getattr(n.op, "kernel", "")).endswith("_mvc") for n in p.nodes)


@pytest.mark.parametrize("sets,word", [({"mvc_cluster": 9}, "mvc_cluster"),
                                       ({"mvc_cluster": 8, "sms": 4}, "mvc_cluster"), ({"mvc_batch": -1}, "mvc_batch")])
def test_mvc_dims_are_checked(sets, word):
    _, issues = bind(load_spec(FUSED), {"batch": 16, "cache_batch": 16, "mvc_batch": 16, **sets}, {})
    assert issues and issues[0].code == "check" and word in issues[0].message, issues


def test_mv_variant_skipped_where_x_does_not_fit():
    """An ffn too wide for 8 staged x rows beside a two-stage ring in mv_shared_max: the down projection falls
    back to the GEMV engine instead of trapping on the GPU."""
    p, issues = bind(load_spec(FUSED), {"batch": 8, "cache_batch": 8, "ffn": 14336, "gemm_batch": 0}, {})
    assert not issues, issues
    chosen = {n.id.split(".")[0]: n.op.kernel for n in p.nodes if hasattr(n.op, "kernel")}
    assert chosen["down_proj"] == "gemv_res" and chosen["gate_up"] == "gate_up_mv"


def test_dot_and_threshold_dim():
    plan = llama_plan({"batch": 64, "layers": 2, "gemm_batch": 0}, FUSED)
    dot = to_dot(plan)
    assert "gemv_res_mma" in dot and "gemv_res_mv" in dot and "attn_batched" in dot
    plan = llama_plan({"batch": 64, "layers": 2, "mma_batch": 128, "attn_batch": 128, "gemm_batch": 0}, FUSED)
    assert "gemv_res_mma" not in to_dot(plan) and "attn_batched" not in to_dot(plan)
    dot = to_dot(llama_plan({"batch": 128, "layers": 2, "attn_mma": 1}, FUSED))  # the GEMM path: cuBLAS child graphs
    assert "gemm(a=xh, b=w_gate_up[1], c=gu" in dot and "gemv_res" not in dot
    assert "attn_qkv_mma  512 × 256\\nshared 72.8 KiB" in dot  # one wave of sms blocks: one split
    dims = {"batch": 64, "layers": 2, "tc_batch": 64, "attn_mma": 1}
    dot = to_dot(llama_plan(dims, FUSED))  # up to tc_batch: kernels/gemm.cu, the norms riding on its GEMMs
    assert "tc_scaled_silu_1  176 × 256\\nshared 96.2 KiB" in dot and "tc_scaled_store_4  160 × 256" in dot
    assert "tc_add_norm_4  128 × 256\\nshared 96.0 KiB" in dot and "rmsnorm_cast" not in dot
    assert "attn_qkv_mma  256 × 256" in dot and "gemm(a=" not in dot and "silu_pairs" not in dot
    assert "rope" not in dot and "cast_" not in dot  # RoPE and the cast run inside the attention node
    assert dot.count("rms_partials") == 1  # the first layer's operand
    dot = to_dot(llama_plan({**dims, "batch": 16, "tc_norm": 0}, FUSED))  # norm nodes
    assert "tc_silu_1  176 × 256\\nshared 96.0 KiB" in dot and "rmsnorm_cast" in dot and "rms_partials" not in dot


@needs_nvrtc
def test_fused_spec_compiles_with_variants(capsys):
    from dagbuild.cli import main

    assert main(["compile", str(FUSED), "--set", "wt=bf16"]) == 0
    out = capsys.readouterr().out
    assert "gemv_res_mma_bf16 ok" in out and "qkv_rope_mv_bf16 ok" in out and "attn_decode_batched_bf16 ok" in out
    assert "attn_qkv_bf16 ok" in out
