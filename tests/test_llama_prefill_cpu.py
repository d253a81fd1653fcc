"""specs/llama_prefill.yaml and kernels/llama_prefill.cu without a GPU: the prefill plans take the decode plan's
consts, RoPE table, Q/K/V biases and GEMV launch shape (for every shipped HF family), head_dim 32/64/96/128
served and others refused naming it, and the kernels compiled by NVRTC (params against the spec, no spills,
no local memory, static shared memory under 48 KiB)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from conftest import KERNELS, SPECS
from helpers import entry_param_types, needs_nvrtc, ptxas_resources

from dagbuild import kernels, plan
from dagbuild.errors import BuildError, SpecError
from dagbuild.ir import KernelOp
from dagbuild.llama.config import from_hf
from dagbuild.llama.decode import llama_plan
from dagbuild.llama.prefill import SHARED_BUFFERS, SHARED_CONSTS, prefill_overrides, prefill_spec
from dagbuild.sources import read_kernel_source

FUSED = SPECS / "llama_decode_fused.yaml"
HF = SPECS / "configs" / "hf"
FAMILIES = sorted(p.stem for p in HF.glob("*.json"))
SMALL = {"hidden": 256, "heads": 4, "kv_heads": 2, "head_dim": 64, "ffn": 512, "vocab": 1000, "layers": 2,
         "max_seq": 128}


def _args(p, node_id: str) -> dict:
    op = next(n.op for n in p.nodes if n.id == node_id)
    assert isinstance(op, KernelOp)
    return {a.param.name: a.value if a.view is None else a.view.buffer for a in op.args}


def _op(p, node_id: str) -> KernelOp:
    return next(n.op for n in p.nodes if n.id == node_id)


def _prefill(decode_plan, seq: int = 32):
    return plan(prefill_spec(), {**prefill_overrides(decode_plan), "seq": seq})


# ---- the decode plan's model inputs reach prefill ---------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_every_shipped_family_prefills_with_its_consts(name):
    m = from_hf(json.loads((HF / f"{name}.json").read_text()))
    dec = llama_plan({**m.overrides(), "batch": 2, "max_seq": 256}, FUSED)
    pre = _prefill(dec, 64)
    assert pre.consts == {"rms_eps": m.rms_eps, "attn_scale": m.attn_scale}
    hd = m.dims["head_dim"]
    for layer in (0, m.dims["layers"] - 1):
        assert _args(pre, f"attn_norm.{layer}")["eps"] == pytest.approx(m.rms_eps, rel=1e-7)
        assert _args(pre, f"mlp_norm.{layer}")["eps"] == pytest.approx(m.rms_eps, rel=1e-7)
        attn = _args(pre, f"attn.{layer}")
        assert attn["scale"] == pytest.approx(hd ** -0.5, rel=1e-7) and attn["head_dim"] == hd
        assert _op(pre, f"attn.{layer}").block == (64 * -(-hd // 64), 1, 1)
        rope = _args(pre, f"rope.{layer}")
        assert (rope["bias"], rope["inv_freq"]) == ("qkv_bias", "rope_inv_freq")
    assert _args(pre, "lm_head")["eps"] == pytest.approx(m.rms_eps, rel=1e-7)
    for b in SHARED_BUFFERS:
        assert (pre.buffers[b].dtype, pre.buffers[b].shape) == (dec.buffers[b].dtype, dec.buffers[b].shape), b


def test_overridden_consts_and_launch_dims_are_carried():
    dec = llama_plan({**SMALL, "wt": "f16", "rms_eps": 1e-6, "attn_scale": 0.1, "sms": 78,
                      "gemv_blocks_per_sm": 1, "gemv_shared": 70000}, FUSED)
    ov = prefill_overrides(dec)
    assert (ov["rms_eps"], ov["attn_scale"]) == (1e-6, 0.1)
    assert (ov["sms"], ov["gemv_blocks_per_sm"], ov["gemv_shared"]) == (78, 1, 70000)
    pre = _prefill(dec)
    assert _args(pre, "attn.1")["scale"] == pytest.approx(0.1)
    assert _args(pre, "attn_norm.0")["eps"] == pytest.approx(1e-6)
    # the LM head runs with the decode graph's shared memory and grid: the GEMV engine's staged path
    assert _op(pre, "lm_head").shared == _op(dec, "lm_head").shared == 70000
    assert _op(pre, "lm_head").grid == _op(dec, "lm_head").grid


def test_lm_head_takes_the_fused_specs_shared_memory_by_default():
    dec = llama_plan({**SMALL, "wt": "f16"}, FUSED)
    pre = _prefill(dec)
    assert _op(pre, "lm_head").shared == dec.dims["gemv_shared"] > 48 * 1024
    assert _op(pre, "lm_head").grid == _op(dec, "lm_head").grid


def test_prefill_overrides_refuses_a_plan_without_the_model_inputs():
    dec = llama_plan({**SMALL, "wt": "f16"}, FUSED)
    for missing in ("qkv_bias", "rope_inv_freq"):
        fake = SimpleNamespace(name="custom", dims=dec.dims, types=dec.types, consts=dec.consts,
                               buffers={k: v for k, v in dec.buffers.items() if k != missing})
        with pytest.raises(BuildError, match=f"no buffer {missing!r}") as e:
            prefill_overrides(fake)
        assert e.value.buffer == missing
    for missing in SHARED_CONSTS:
        fake = SimpleNamespace(name="custom", dims=dec.dims, types=dec.types, buffers=dec.buffers,
                               consts={k: v for k, v in dec.consts.items() if k != missing})
        with pytest.raises(BuildError, match=f"no const {missing!r}"):
            prefill_overrides(fake)


@pytest.mark.parametrize("head_dim", [32, 64, 96, 128])
def test_served_head_dims(head_dim):
    heads = 4
    dec = llama_plan({**SMALL, "head_dim": head_dim, "hidden": 256, "heads": heads, "wt": "bf16"}, FUSED)
    pre = _prefill(dec, 16)
    assert pre.buffers["qkv"].shape == (16, (heads + 2 * 2) * head_dim)
    assert _op(pre, "attn.0").grid == (1, heads, 1)


@pytest.mark.parametrize("head_dim", [16, 48, 80, 160])
def test_other_head_dims_are_refused_naming_head_dim(head_dim):
    with pytest.raises(SpecError) as e:
        plan(prefill_spec(), {**SMALL, "head_dim": head_dim, "seq": 16})
    issue = next(i for i in e.value.issues if i.code == "check")
    assert "head_dim must be 32, 64, 96 or 128" in issue.message


def test_the_spec_no_longer_needs_heads_times_head_dim_to_be_hidden():
    # Llama 3.x / Qwen2-style: heads * head_dim != hidden (wo is [hidden, heads * head_dim])
    p = plan(prefill_spec(), {**SMALL, "hidden": 512, "heads": 8, "kv_heads": 1, "head_dim": 128, "seq": 16})
    assert p.buffers["attn_out"].shape == (16, 8 * 128)
    assert p.buffers["wo"].shape == (2, 512, 8 * 128)


# ---- the kernels through NVRTC ------------------------------------------------------------------------------


SRC = KERNELS / "llama_prefill.cu"
P, N, L, F = ".u64", ".u32", ".u64", ".f32"  # pointer, i32, i64, f32 in PTX .param lists
ENTRIES = {
    **{f"rope_kv_prefill_{wt}": [P, P, P, P, P, P, N, N, N, N, N] for wt in ("f32", "f16", "bf16")},
    "last_rows": [P, P, P, N, N],
    **{f"rmsnorm_cast_{wt}": [P, P, P, N, F] for wt in ("f32", "f16", "bf16")},
    **{f"attn_prefill_{wt}": [P, P, P, P, P, N, N, N, N, N, F] for wt in ("f32", "f16", "bf16")},
    **{f"silu_pairs_{wt}": [P, P, L] for wt in ("f32", "f16", "bf16")},
}


@needs_nvrtc
def test_every_entry_with_its_params_and_no_local_memory():
    ptx = kernels.compile_ptx(read_kernel_source(SRC), "llama_prefill")
    entries = entry_param_types(ptx)
    assert set(entries) == set(ENTRIES)
    for name, params in ENTRIES.items():
        assert entries[name] == params, name
    assert ".local" not in ptx


@needs_nvrtc
def test_ptxas_no_spills_and_static_shared_memory_under_48k():
    props = ptxas_resources(read_kernel_source(SRC), "llama_prefill")
    assert set(props) == set(ENTRIES)
    for name, (stack, st, ld, regs, rest) in props.items():
        assert (stack, st, ld) == (0, 0, 0), name
        smem = re.search(r"(\d+) bytes smem", rest)
        assert smem is None or int(smem.group(1)) <= 48 * 1024, (name, rest)
        if name.startswith("attn_prefill"):
            # 128-thread blocks (head_dim > 64): the 255-register ceiling is the only limit; stay clear of it
            assert regs <= 240, (name, regs)
