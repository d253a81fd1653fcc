"""Prefill graphs (specs/llama_prefill.yaml through dagbuild.llama.prefill) against today's per-position
prefill through the fused decode graph and against HF transformers.

fp32 tiny config, batch 4 with 3 uneven prompts (row 3 is all padding), prompt-length buckets 16/32/64 so
that the 300-token prompt runs in 5 chunks and the others end inside chunks of other buckets; the KV-cache
check runs with Q/K/V biases and non-default consts (they must reach prefill as they reach decode). Families
through HF's own classes (Qwen2 biases + head_dim 128 + GQA, Llama 3 head_dim 128 with a tied head), and the
kernels alone for head_dim 32/64/96/128 against the float64 references."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import yaml
from conftest import SPECS
from helpers import ROUNDOFF, in_weight_type, weight_type_values

from dagbuild.data import shipped_spec
from dagbuild.executable import Executable
from dagbuild.kernels import ModuleCache, load_module
from dagbuild.llama.decode import LlamaDecoder, llama_plan
from dagbuild.llama.prefill import Prefiller
from dagbuild.llama.weights import load_state_dict, random_weights

pytestmark = pytest.mark.gpu

TINY = {**yaml.safe_load((SPECS / "configs" / "llama_tiny.yaml").read_text()), "max_seq": 512}
LENGTHS = (1, 45, 300)
BUCKETS = (16, 32, 64)
NEW = 12
SENTINEL = 7.0


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(11)
    return [rng.integers(0, vocab, n).tolist() for n in LENGTHS]


def _plan(wt: str = "f32", batch: int = 4, **consts: float):
    return llama_plan({**TINY, "wt": wt, "batch": batch, "cache_batch": batch, **consts},
                      spec_path=shipped_spec("llama_decode_fused.yaml"))


@pytest.fixture(scope="module")
def modules():
    return ModuleCache()


def _per_position_cache(exe, prompts):
    """The KV cache after feeding the prompts one position at a time through the decode graph."""
    dec = LlamaDecoder(exe)
    dec.reset()
    for t in range(max(len(p) for p in prompts)):
        pos = [t if t < len(p) else -1 for p in prompts]
        dec.step([p[t] if t < len(p) else 0 for p in prompts], pos)
    return exe.buffers["k_cache"].get(), exe.buffers["v_cache"].get()


def test_prefill_kv_cache_matches_per_position_and_padding_writes_nothing(modules):
    """Both paths read the same rope_inv_freq table and qkv_bias (random here) and the plan's consts (not the
    spec defaults), so the caches agree to the GEMM-vs-GEMV rounding of O(1) values."""
    import cupy

    with Executable(_plan(rms_eps=1e-6, attn_scale=0.1), modules=modules) as exe:
        random_weights(exe, 5, std=0.1)
        bias = exe.buffers["qkv_bias"]
        bias[...] = cupy.random.RandomState(3).standard_normal(bias.shape, dtype=cupy.float32) * cupy.float32(0.3)
        cupy.cuda.Device().synchronize()
        prompts = _prompts(exe.plan.dims["vocab"])
        k_ref, v_ref = _per_position_cache(exe, prompts)
        with Prefiller(exe, BUCKETS) as pf:
            assert [b for _, b in pf.chunks(LENGTHS)] == [64, 64, 64, 64, 64]
            assert [b for _, b in pf.chunks((1, 45))] == [64]
            assert [b for _, b in pf.chunks((1, 20))] == [32]
            assert pf.pool.get(seq=64).plan.consts == {"rms_eps": 1e-6, "attn_scale": 0.1}
            exe.buffers["k_cache"].fill(SENTINEL)
            exe.buffers["v_cache"].fill(SENTINEL)
            cupy.cuda.Device().synchronize()
            first, _ = pf.run(prompts)
            k, v = exe.buffers["k_cache"].get(), exe.buffers["v_cache"].get()
        for r, n in enumerate(LENGTHS):
            for got, ref, what in ((k, k_ref, "k"), (v, v_ref, "v")):
                # atol: 2.0e-5 seen on the H200 where a 0.01 result cancels O(1) terms (GEMM vs GEMV order)
                np.testing.assert_allclose(got[:, r, :, :n], ref[:, r, :, :n], rtol=2e-5, atol=5e-5,
                                           err_msg=f"{what} cache of row {r} (prompt of {n})")
                assert (got[:, r, :, n:] == SENTINEL).all(), f"padding wrote {what} cache of row {r} past {n}"
        assert (k[:, 3] == SENTINEL).all() and (v[:, 3] == SENTINEL).all(), "an all-padding row wrote KV"
        # the first tokens are the decode graph's after each prompt's last position
        dec = LlamaDecoder(exe)
        gen = dec.generate(prompts, 1)
        assert first == [t[0] for t in gen.tokens]


def test_prefill_then_decode_matches_positions_and_hf(modules):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    from dagbuild.llama.weights import random_hf_model

    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    model = random_hf_model(TINY, dtype="f32", seed=1234, std=0.1, attn_implementation="eager")
    try:
        prompts = _prompts(TINY["vocab"])
        with Executable(_plan(), modules=modules) as exe:
            load_state_dict(exe, model.state_dict())
            dec = LlamaDecoder(exe)
            positions = dec.generate(prompts, NEW).tokens
            with Prefiller(exe, BUCKETS) as pf:
                gen = dec.generate(prompts, NEW, prefill=pf)
            assert gen.tokens == positions, f"prefill graphs {gen.tokens} vs per-position {positions}"
            assert gen.ttft_ms > 0 and len(gen.decode_ms) == NEW - 1
        with torch.inference_mode():
            for r, p in enumerate(prompts):
                ids = torch.tensor([p], dtype=torch.long, device="cuda")
                hf = []
                for _ in range(NEW):
                    t = int(torch.argmax(model(input_ids=ids, use_cache=False).logits[0, -1]))
                    hf.append(t)
                    ids = torch.cat([ids, ids.new_tensor([[t]])], dim=1)
                assert gen.tokens[r] == hf, f"row {r}: ours {gen.tokens[r]}, HF {hf}"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
        del model
        gc.collect()
        torch.cuda.empty_cache()


def test_prefill_f16_first_tokens_follow_positions(modules):
    """f16 weights: the GEMMs take f16 activations (HF's own precision), per-position decode keeps them f32;
    the first tokens agree (random weights, std 0.1: decisive logits) and the caches agree to f16 rounding."""
    with Executable(_plan("f16", batch=2), modules=modules) as exe:
        random_weights(exe, 9, std=0.1)
        prompts = _prompts(exe.plan.dims["vocab"])[1:]
        k_ref, _ = _per_position_cache(exe, prompts)
        ref_first = [t[0] for t in LlamaDecoder(exe).generate(prompts, 1).tokens]
        with Prefiller(exe, BUCKETS) as pf:
            LlamaDecoder(exe).reset()
            first, _ = pf.run(prompts)
            k = exe.buffers["k_cache"].get()
        for r, p in enumerate(prompts):
            a, b = k[:, r, :, :len(p)], k_ref[:, r, :, :len(p)]
            assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-2, f"row {r}"
        assert first == ref_first


def test_prefiller_refuses_the_unfused_spec_and_long_prompts(modules):
    from dagbuild.errors import BuildError, DagbuildError

    plan = llama_plan({**TINY, "wt": "f32"})
    with Executable(plan, modules=modules) as exe:
        with pytest.raises(BuildError, match="fused"):
            Prefiller(exe)
    with Executable(_plan(batch=1), modules=modules) as exe, Prefiller(exe, (16,)) as pf:
        with pytest.raises(DagbuildError, match="max_seq"):
            pf.run([[1] * 513])
        with pytest.raises(DagbuildError, match="token ids"):
            pf.run([[TINY["vocab"]]])
        with pytest.raises(DagbuildError, match="batch"):
            pf.run([[1], [2]])


# ---------------------------------------------------------------------------------------------------------
# Families through HF's own classes: Q/K/V biases, head_dim 128, GQA, consts from the config
# ---------------------------------------------------------------------------------------------------------

FAMILY_LENGTHS = (3, 40, 70)  # buckets 16/32: chunks (0, 32), (32, 32), (64, 16)
FAMILY_BUCKETS = (16, 32)
FAMILY_NEW = 10
FAMILY_MAX_SEQ = 128


def _family_config(transformers, name: str):
    base = dict(vocab_size=1000, intermediate_size=1024, num_hidden_layers=2, max_position_embeddings=512)
    if name == "qwen2_bias_hd128_gqa2":  # head_dim 128 = hidden / heads; biases; eps 1e-6
        return transformers.Qwen2Config(**base, hidden_size=512, num_attention_heads=4, num_key_value_heads=2,
                                        rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False)
    if name == "llama3_hd128_gqa4_tied":  # head_dim 128 != hidden / heads; llama3 RoPE; tied; odd vocab
        return transformers.LlamaConfig(**{**base, "vocab_size": 1003}, hidden_size=256, num_attention_heads=4,
                                        num_key_value_heads=1, head_dim=128, rms_norm_eps=1e-5,
                                        rope_theta=500000.0, tie_word_embeddings=True,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 64})
    raise KeyError(name)


@pytest.mark.parametrize("family", ["qwen2_bias_hd128_gqa2", "llama3_hd128_gqa4_tied"])
def test_prefill_families_match_hf_and_positions(modules, family):
    """fp32, batch 3 with uneven prompts in chunks of two buckets: prefill-then-decode tokens equal HF's
    full-sequence greedy tokens and the per-position path's."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    from dagbuild.llama.config import from_hf
    from dagbuild.llama.weights import random_hf_model, shares_head, tied_bound

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    model = random_hf_model(config=_family_config(transformers, family), dtype="f32", seed=77, std=0.1,
                            attn_implementation="eager")
    try:
        m = from_hf(model.config)
        assert m.dims["head_dim"] == 128 and m.dims["heads"] > m.dims["kv_heads"]
        rng = np.random.default_rng(5)
        prompts = [rng.integers(0, m.dims["vocab"], n).tolist() for n in FAMILY_LENGTHS]
        plan = llama_plan({**m.overrides(), "wt": "f32", "batch": 3, "max_seq": FAMILY_MAX_SEQ},
                          shipped_spec("llama_decode_fused.yaml"))
        with Executable(plan, modules=modules, bound=tied_bound(plan) if m.tied else None) as exe:
            assert shares_head(exe) == m.tied
            load_state_dict(exe, model.state_dict(), model.config)
            if m.qkv_bias:
                assert float(abs(exe.buffers["qkv_bias"]).max()) > 0
            dec = LlamaDecoder(exe)
            positions = dec.generate(prompts, FAMILY_NEW).tokens
            with Prefiller(exe, FAMILY_BUCKETS) as pf:
                assert [b for _, b in pf.chunks(FAMILY_LENGTHS)] == [32, 32, 16]
                assert pf.pool.get(seq=16).plan.consts == pytest.approx(m.consts, rel=1e-7)
                gen = dec.generate(prompts, FAMILY_NEW, prefill=pf)
        with torch.inference_mode():
            for r, p in enumerate(prompts):
                ids = torch.tensor([p], dtype=torch.long, device="cuda")
                hf = []
                for _ in range(FAMILY_NEW):
                    t = int(torch.argmax(model(input_ids=ids, use_cache=False).logits[0, -1]))
                    hf.append(t)
                    ids = torch.cat([ids, ids.new_tensor([[t]])], dim=1)
                assert gen.tokens[r] == hf, f"{family} row {r}: prefill graphs {gen.tokens[r]}, HF {hf}"
        assert gen.tokens == positions, f"prefill graphs {gen.tokens} vs per-position {positions}"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved[0]
        torch.set_float32_matmul_precision(saved[1])
        del model
        gc.collect()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# kernels/llama_prefill.cu alone, against dagbuild.llama.reference (float64)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefill_module():
    pytest.importorskip("cupy")
    from dagbuild.sources import read_kernel_source

    src = read_kernel_source(shipped_spec("llama_prefill.yaml").parent.parent / "kernels" / "llama_prefill.cu")
    mod = load_module(src, "llama_prefill")
    mod.get_function("rope_kv_prefill_f32")  # compile once for the module's tests
    return mod


@pytest.mark.parametrize("wt", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128])
@pytest.mark.parametrize("seq,prefix", [(1, 0), (37, 0), (64, 100), (130, 7)])
def test_rope_and_attention_kernels_match_reference(prefill_module, wt, head_dim, seq, prefix):
    """Two rows (row 1 padded past half its positions): bias + RoPE + KV write, then causal attention over
    the prefix (random cache content) and the chunk, against the decode references applied per query; the
    block is 64 * ceil_div(head_dim, 64) threads, as the spec launches it. The KV cache and the attention
    output are of the weight type wt: the appended k and v are rounded once (v exactly: one f32 add, then
    rounded; k to one ulp of the rounded reference, where the kernel's f32 result and the reference straddle a
    rounding boundary), and the attention reference reads the kernel's own cache values (what the kernel read)
    and allows the output's rounding."""
    import cupy as cp

    from dagbuild.llama import reference as ref

    mod = prefill_module
    heads, kv, d, max_seq, batch = 4, 2, head_dim, 256, 2
    scale = float(d) ** -0.5
    rng = np.random.default_rng(seq * 1000 + prefix + d)
    width = (heads + 2 * kv) * d
    qkv = rng.standard_normal((batch * seq, width)).astype(np.float32)
    bias = (0.5 * rng.standard_normal(width)).astype(np.float32)
    kc, kc64 = in_weight_type(rng.standard_normal((batch, kv, max_seq, d)), wt)
    vc, vc64 = in_weight_type(rng.standard_normal((batch, kv, max_seq, d)), wt)
    pos = np.full((batch, seq), -1, np.int32)
    pos[0] = prefix + np.arange(seq)
    pos[1, : (seq + 1) // 2] = prefix + np.arange((seq + 1) // 2)
    inv = ref.rope_inv_freq(d, 10000.0)
    g_qkv, g_kc, g_vc, g_pos = cp.asarray(qkv), cp.asarray(kc), cp.asarray(vc), cp.asarray(pos)
    i32 = np.int32
    mod.get_function(f"rope_kv_prefill_{wt}")((batch * seq,), (128,), (g_qkv, g_kc, g_vc, g_pos, cp.asarray(bias),
                                                                       cp.asarray(inv), i32(heads), i32(kv), i32(d),
                                                                       i32(max_seq), i32(seq)))
    nan = in_weight_type(np.full((batch * seq, heads * d), np.nan), wt)[0]  # bf16: NaN bits
    out = cp.asarray(nan)
    mod.get_function(f"attn_prefill_{wt}")(((seq + 63) // 64, heads, batch), (64 * -(-d // 64),),
                                           (g_qkv, g_kc, g_vc, g_pos, out, i32(heads), i32(kv), i32(d), i32(max_seq),
                                            i32(seq), np.float32(scale)))
    got_q, got_k, got_v, got = g_qkv.get(), g_kc.get(), g_vc.get(), weight_type_values(out.get(), wt)
    # reference: bias, RoPE and append per position, in order, each appended row rounded to wt
    rk, rv = kc64.copy(), vc64.copy()
    rq = qkv.astype(np.float64).copy()
    for b in range(batch):
        for t in range(seq):
            p = int(pos[b, t])
            if p < 0:
                continue
            r = b * seq + t
            row = qkv[r]
            qo, kk, vv = ref.rope_append(row[: heads * d], row[heads * d: (heads + kv) * d], row[(heads + kv) * d:],
                                         bias, inv, rk[b:b + 1], rv[b:b + 1], [p], heads, kv, d, max_seq)
            rq[r, : heads * d] = qo.reshape(-1)
            rk[b], rv[b] = in_weight_type(kk[0], wt)[1], in_weight_type(vv[0], wt)[1]
    k64, v64 = weight_type_values(got_k, wt), weight_type_values(got_v, wt)
    # one ulp of wt (2 ROUNDOFF relative) where the kernel's f32 k and the reference round apart
    np.testing.assert_allclose(k64, rk, rtol=1e-5 + 2 * ROUNDOFF[wt], atol=1e-5)
    np.testing.assert_array_equal(got_v, in_weight_type(rv, wt)[0])  # v + bias: one f32 add, rounded once
    valid = (pos.reshape(-1) >= 0)
    np.testing.assert_allclose(got_q[valid, : heads * d], rq[valid, : heads * d], rtol=1e-5, atol=1e-5)
    for b in range(batch):
        for t in range(seq):
            r = b * seq + t
            if pos[b, t] < 0:
                assert (got[r] == 0).all(), f"padded query ({b}, {t}) wrote non-zeros"
                continue
            want = ref.attention(rq[r, : heads * d], k64[b:b + 1], v64[b:b + 1], [int(pos[b, t])], heads, kv, d,
                                 max_seq, scale)
            np.testing.assert_allclose(got[r], want.reshape(-1), rtol=2e-5 + ROUNDOFF[wt], atol=2e-5,
                                       err_msg=f"query ({b}, {t}) at position {pos[b, t]}, head_dim {d}, {wt}")
