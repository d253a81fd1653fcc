"""Prefill graphs (specs/llama_prefill.yaml through dagbuild.llama.prefill) against today's per-position
prefill through the fused decode graph and against HF transformers.

fp32 tiny config, batch 4 with 3 uneven prompts (row 3 is all padding), prompt-length buckets 16/32/64 so
that the 300-token prompt runs in 5 chunks and the others end inside chunks of other buckets."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import yaml
from conftest import SPECS

from dagbuild.data import shipped_spec
from dagbuild.executable import Executable
from dagbuild.kernels import ModuleCache
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


def _plan(wt: str = "f32", batch: int = 4):
    return llama_plan({**TINY, "wt": wt, "batch": batch, "cache_batch": batch},
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
    with Executable(_plan(), modules=modules) as exe:
        random_weights(exe, 5, std=0.1)
        prompts = _prompts(exe.plan.dims["vocab"])
        k_ref, v_ref = _per_position_cache(exe, prompts)
        with Prefiller(exe, BUCKETS) as pf:
            assert [b for _, b in pf.chunks(LENGTHS)] == [64, 64, 64, 64, 64]
            assert [b for _, b in pf.chunks((1, 45))] == [64]
            assert [b for _, b in pf.chunks((1, 20))] == [32]
            import cupy

            exe.buffers["k_cache"].fill(SENTINEL)
            exe.buffers["v_cache"].fill(SENTINEL)
            cupy.cuda.Device().synchronize()
            first, _ = pf.run(prompts)
            k, v = exe.buffers["k_cache"].get(), exe.buffers["v_cache"].get()
        for r, n in enumerate(LENGTHS):
            for got, ref, what in ((k, k_ref, "k"), (v, v_ref, "v")):
                np.testing.assert_allclose(got[:, r, :, :n], ref[:, r, :, :n], rtol=2e-5, atol=2e-6,
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
