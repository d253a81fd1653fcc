"""kernels/llama_batched.cu and the fused spec's batch variants without a GPU: NVRTC compile of every entry with
the params the spec declares, the PDL contract in the PTX (only weight copies before the wait), thread-block
clusters on sm_90, no spills, and which kernel and launch shape each batch bucket binds."""

from __future__ import annotations

import re

import pytest
from conftest import KERNELS, SPECS
from helpers import entry_bodies, needs_nvrtc, nvrtc_reason, ptxas_resources

from dagbuild import kernels
from dagbuild.bind import bind
from dagbuild.dot import to_dot
from dagbuild.llama.decode import llama_plan
from dagbuild.load import load_spec
from dagbuild.sources import read_kernel_source

SRC = KERNELS / "llama_batched.cu"
FUSED = SPECS / "llama_decode_fused.yaml"
P, N, F = ".u64", ".u32", ".f32"
MMA_PARAMS = {
    "qkv_rope_mma": [P, P, P, P, P, P, P, P, P, N, N, N, N, N, N, F],
    "gate_up_silu_mma": [P, P, P, P, N, N, N, F],
    "gemv_res_mma": [P, P, P, N, N, N],
    "gemv_norm_mma": [P, P, P, P, N, N, N, F],
}
MINE = {**{f"{k}_{wt}": v for k, v in MMA_PARAMS.items() for wt in ("f32", "f16", "bf16")},
        "attn_decode_batched": [P, P, P, P, P, P, P, P, N, N, N, N, N, F]}


@pytest.fixture(scope="module")
def bodies() -> dict[str, str]:
    if nvrtc_reason():
        pytest.skip(str(nvrtc_reason()))
    return entry_bodies(kernels.compile_ptx(read_kernel_source(SRC), "llama_batched"))


@needs_nvrtc
def test_entries_and_params(bodies):
    entries = kernels.ptx_entries(kernels.compile_ptx(read_kernel_source(SRC), "llama_batched"))
    for name, params in MINE.items():
        assert [t.replace(".s32", ".u32").replace(".b32", ".u32") for t in entries[name]] == params, name


@needs_nvrtc
def test_pdl_contract_and_clusters(bodies):
    for name in MINE:
        body = bodies[name]
        assert "griddepcontrol.wait" in body and "griddepcontrol.launch_dependents" in body, name
        assert ".local" not in body, name
        head = body.split("griddepcontrol.wait", 1)[0]
        ops = set(re.findall(r"\b((?:ld|st|atom|red|prefetch)\.(?:global|shared)(?:\.\w+)*|cp\.async[\w.]*)", head))
        if name == "attn_decode_batched":
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
        assert ".reqnctapercluster" not in bodies["gemv_res_mma_f32"]


@needs_nvrtc
def test_ptxas_no_spills():
    props = ptxas_resources(read_kernel_source(SRC), "llama_batched")
    for name in MINE:
        stack, st, ld, regs, _ = props[name]
        assert (stack, st, ld) == (0, 0, 0), name
        assert regs <= 255, (name, regs)


@pytest.mark.parametrize("wt", ["f16", "f32"])
def test_buckets_choose_their_kernels(wt):
    spec, programs = load_spec(FUSED), {}
    for batch in [1, 2, 4, *range(8, 257, 8)]:
        p, issues = bind(spec, {"batch": batch, "cache_batch": 256, "wt": wt}, programs)
        assert not issues, issues
        chosen = {n.id.split(".")[0]: n.op for n in p.nodes if hasattr(n.op, "kernel")}
        big = batch >= 8
        assert chosen["qkv"].kernel == ("qkv_mma" if big else "qkv")
        assert chosen["o_proj"].kernel == chosen["down_proj"].kernel == ("gemv_res_mma" if big else "gemv_res")
        assert chosen["gate_up"].kernel == ("gate_up_mma" if big else "gate_up")
        assert chosen["lm_head"].kernel == ("gemv_norm_mma" if big else "gemv_norm")
        assert chosen["attn"].kernel == ("attn_batched" if big else "attn")
        if big:
            for key in ("qkv", "o_proj", "gate_up", "down_proj", "lm_head"):
                op = chosen[key]
                assert op.grid[0] % 8 == 0 and op.block == (256, 1, 1) and op.shared == 185600, key
            assert p.kernels["qkv_mma"].entry == f"qkv_rope_mma_{wt}"
            attn = chosen["attn"]
            assert attn.grid[0] == batch * 4 and attn.grid[1] <= 8
            assert {a.param.name: a.value for a in attn.args}["chunk"] == 32


def test_dot_and_threshold_dim():
    plan = llama_plan({"batch": 64, "layers": 2}, FUSED)
    dot = to_dot(plan)
    assert "gemv_res_mma" in dot and "attn_batched" in dot
    plan = llama_plan({"batch": 64, "layers": 2, "mma_batch": 128, "attn_batch": 128}, FUSED)
    assert "gemv_res_mma" not in to_dot(plan) and "attn_batched" not in to_dot(plan)


@needs_nvrtc
def test_fused_spec_compiles_with_variants(capsys):
    from dagbuild.cli import main

    assert main(["compile", str(FUSED), "--set", "wt=bf16"]) == 0
    out = capsys.readouterr().out
    assert "qkv_rope_mma_bf16 ok" in out and "attn_decode_batched ok" in out
