"""K decode steps per launch on the GPU (dagbuild.llama.loop): the tokens of single-step launches, greedy
and sampled, for K = 1, 4, 16 and a K that does not divide the token count, through the WHILE node and the
unrolled fallback (forced); rows stopping at their EOS id or budget stop exactly there and leave the other
rows' KV cache untouched; the sampling kernel alone: Philox vectors, top-k, top-p, temperature -> 0, its
Python reference and the softmax it samples from. Tiny config, f32 weights (seconds each)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from dagbuild.errors import DagbuildError
from dagbuild.executable import ExecOptions, Executable
from dagbuild.kernels import load_module
from dagbuild.llama import sampling as smp
from dagbuild.llama import weights as W
from dagbuild.llama.decode import LlamaDecoder, llama_plan
from dagbuild.llama.loop import LoopDecoder, looped_plan
from dagbuild.load import parse_spec
from dagbuild.plan import plan
from dagbuild.sources import read_kernel_source

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "specs"
TINY = yaml.safe_load((SPECS / "configs" / "llama_tiny.yaml").read_text())
SPEC_FILES = ["llama_decode.yaml", "llama_decode_fused.yaml"]
PROMPTS = [[1, 15, 29, 590, 33], [7, 99], [300]]
NEW = 21  # tokens per row: K = 4 and 16 do not divide it (nor the prompt + tokens step counts)


def base_plan(spec_file: str, batch: int):
    return llama_plan({**TINY, "batch": batch, "wt": "f32"}, SPECS / spec_file)


def looped(spec_file: str, batch: int, k: int, mode: str = "auto") -> Executable:
    exe = Executable(looped_plan(base_plan(spec_file, batch), k), ExecOptions(loops=mode))
    W.random_weights(exe, 0)
    return exe


@pytest.fixture(scope="module", params=SPEC_FILES)
def greedy_reference(request):
    """Greedy tokens of one launch per token through the base decode spec (its own argmax kernel)."""
    with Executable(base_plan(request.param, 3)) as exe:
        W.random_weights(exe, 0)
        gen = LlamaDecoder(exe).generate(PROMPTS, NEW)
        return request.param, gen.tokens


@pytest.mark.parametrize("k, mode", [(1, "auto"), (4, "auto"), (16, "auto"), (7, "auto"), (4, "unroll"),
                                     (16, "unroll")])
def test_greedy_equals_single_step_launches(greedy_reference, k, mode):
    spec_file, ref = greedy_reference
    with looped(spec_file, 3, k, mode) as exe:
        assert exe.loop_mode == ("conditional" if mode == "auto" else "unroll")
        gen = LoopDecoder(exe).generate(PROMPTS, NEW)
    assert gen.tokens == ref
    assert max(gen.launch_steps) <= k and gen.steps == max(len(p) for p in PROMPTS) + NEW - 1


@pytest.mark.parametrize("mode", ["auto", "unroll"])
@pytest.mark.parametrize("wt", ["f32", "f16"])
def test_gemm_path_in_the_loop_body(mode, wt):
    """The fused spec's GEMM path (here from batch 2) in the WHILE node's body, and unrolled: the tokens of
    single-step launches of the same plan. f16 runs attn_qkv_mma's tensor-core form, whose first K/V pass is
    copied before its grid-dependency wait: the rows it reads were appended by the previous iteration."""
    base = llama_plan({**TINY, "batch": 3, "wt": wt, "gemm_batch": 2}, SPECS / "llama_decode_fused.yaml")
    assert "qkv_gemm.0" in base.node_by_id
    with Executable(base) as exe:
        W.random_weights(exe, 0)
        ref = LlamaDecoder(exe).generate(PROMPTS, NEW).tokens
    with Executable(looped_plan(base, 4), ExecOptions(loops=mode)) as exe:
        assert exe.loop_mode == ("conditional" if mode == "auto" else "unroll")
        W.random_weights(exe, 0)
        gen = LoopDecoder(exe).generate(PROMPTS, NEW)
    assert gen.tokens == ref


SAMPLED = [smp.Sampling(temperature=0.9, top_k=40, top_p=0.9, seed=11),
           smp.Sampling(temperature=1.3, seed=2**40 + 5),
           smp.Sampling(temperature=0.7, top_p=0.5, seed=3)]


@pytest.fixture(scope="module", params=SPEC_FILES)
def sampled_reference(request):
    """Sampled tokens at one step per launch (K = 1), checked token by token against the Python reference
    on the logits each launch saw."""
    with looped(request.param, 3, 1) as exe:
        dec = LoopDecoder(exe)
        dec.start(PROMPTS, NEW, SAMPLED)
        mismatches, checked = 0, 0
        while dec.running():
            pos = exe.buffers["pos_host"][:3].copy()
            before = [len(t) for t in dec._out]
            dec.launch()
            logits = exe.buffers["logits"].get()
            for r in range(3):
                if len(dec._out[r]) > before[r]:
                    checked += 1
                    want = smp.sample_reference(logits[r], SAMPLED[r], int(pos[r]))
                    mismatches += want != dec._out[r][-1]
        assert checked == 3 * NEW and mismatches <= 1, f"{mismatches} of {checked} tokens differ from the reference"
        return request.param, [list(t) for t in dec._out]


@pytest.mark.parametrize("k, mode", [(4, "auto"), (16, "auto"), (7, "auto"), (16, "unroll")])
def test_sampled_equals_single_step_launches(sampled_reference, k, mode):
    spec_file, ref = sampled_reference
    with looped(spec_file, 3, k, mode) as exe:
        gen = LoopDecoder(exe).generate(PROMPTS, NEW, SAMPLED)
    assert gen.tokens == ref
    assert len({tuple(t) for t in ref}) == 3  # the rows differ (different seeds and settings)


@pytest.mark.parametrize("mode", ["auto", "unroll"])
@pytest.mark.parametrize("spec_file", SPEC_FILES)
def test_rows_stop_at_eos_and_budget_and_leave_other_rows_alone(spec_file, mode):
    prompts = [[5, 6, 7], [5, 6, 7], [5, 6, 7]]
    with looped(spec_file, 3, 4, mode) as exe:
        dec = LoopDecoder(exe)
        full = dec.generate(prompts, NEW).tokens
        k_ref, v_ref = exe.buffers["k_cache"].get(), exe.buffers["v_cache"].get()
        toks = full[1]
        stop = next((i for i in range(2, NEW) if toks[i] not in toks[:i]), None)
        if stop is None:
            pytest.skip("row 1 repeats one token: no EOS id to stop it at a chosen step")
        gen = dec.generate(prompts, [NEW, NEW, 6], eos=[-1, toks[stop], -1])
        k, v = exe.buffers["k_cache"].get(), exe.buffers["v_cache"].get()
    assert gen.tokens[0] == full[0]
    assert gen.tokens[1] == toks[:stop + 1]  # the EOS token is kept, nothing after it
    assert gen.tokens[2] == full[2][:6]
    # row 0's cache is bit for bit the one of the run without stops; stopped rows wrote nothing later
    np.testing.assert_array_equal(k[:, 0], k_ref[:, 0])
    np.testing.assert_array_equal(v[:, 0], v_ref[:, 0])
    last1 = len(prompts[1]) - 1 + stop  # position of the input that produced the EOS
    last2 = len(prompts[2]) - 1 + 5
    assert not k[:, 1, :, last1 + 1:].any() and not v[:, 1, :, last1 + 1:].any()
    assert not k[:, 2, :, last2 + 1:].any()
    np.testing.assert_array_equal(k[:, 1, :, :last1 + 1], k_ref[:, 1, :, :last1 + 1])


def test_launches_after_all_rows_stopped_do_nothing():
    with looped("llama_decode.yaml", 2, 8) as exe:
        dec = LoopDecoder(exe)
        gen = dec.generate([[3, 4], [9]], 3)
        assert gen.tokens[0] and not dec.running()
        ring = exe.buffers["ring_host"].copy()
        assert dec.launch() == 1 and (exe.buffers["ring_host"][0] == -1).all()
        assert (exe.buffers["ring_host"][1:] == ring[1:]).all()


def test_bad_generate_arguments():
    with looped("llama_decode.yaml", 2, 4) as exe:
        dec = LoopDecoder(exe)
        for bad in (dict(prompts=[[1]] * 3), dict(prompts=[[]]), dict(prompts=[[10**6]]),
                    dict(prompts=[[1]], max_new_tokens=0)):
            args = {"prompts": [[1]], "max_new_tokens": 2, **bad}
            with pytest.raises(DagbuildError):
                dec.generate(**args)


# ---- the sampling kernel alone ---------------------------------------------------------------------------

V = 512
ROWS = 64


@pytest.fixture(scope="module")
def sampler():
    """A graph of the sampling kernel alone: ROWS rows of V logits, one step, every row at a position."""
    text = f"""
dagbuild: 1
name: sampler
dims: {{batch: {ROWS}, vocab: {V}, max_seq: 4}}
kernels:
  sample:
    source: ../kernels/sampling.cu
    entry: sample_step
    params: [const f32* logits, i32* tokens, i32* pos, i32* ctl, const f32* cfg, const i32* prompt, i32* ring,
             i32* state, i32 vocab, i32 max_seq, i32 batch, i32 ring_rows]
buffers:
  logits: {{dtype: f32, shape: [batch, vocab]}}
  tokens: {{dtype: i32, shape: [batch]}}
  pos: {{dtype: i32, shape: [batch]}}
  ctl: {{dtype: i32, shape: [batch, 8]}}
  cfg: {{dtype: f32, shape: [batch, 2]}}
  prompt: {{dtype: i32, shape: [batch, max_seq]}}
  ring: {{dtype: i32, shape: [1, batch]}}
  state: {{dtype: i32, shape: [4]}}
nodes:
  - {{id: zero, memset: {{dst: state, value: 0}}}}
  - {{id: sample, kernel: sample, grid: [batch], block: [1024],
     args: {{logits: logits, tokens: tokens, pos: pos, ctl: ctl, cfg: cfg, prompt: prompt, ring: ring,
            state: state, vocab: vocab, max_seq: max_seq, batch: batch, ring_rows: 1}}}}
"""
    with Executable(plan(parse_spec(text, base_dir=SPECS))) as exe:
        yield exe


def run_sampler(exe, logits: np.ndarray, s: smp.Sampling, seeds: np.ndarray, position: int = 2) -> np.ndarray:
    b = exe.buffers
    b["logits"].set(np.broadcast_to(logits, (ROWS, V)).astype(np.float32))
    b["pos"].set(np.full(ROWS, position, np.int32))
    ctl = np.zeros((ROWS, 8), np.int64)
    ctl[:, 0], ctl[:, 1], ctl[:, 3] = -1, 1000, s.top_k
    ctl[:, 4], ctl[:, 5] = seeds & 0xFFFFFFFF, seeds >> 32
    b["ctl"].set(ctl.astype(np.uint32).view(np.int32))
    b["cfg"].set(np.tile(np.array([s.temperature, s.top_p], np.float32), (ROWS, 1)))
    exe.launch(sync=True)
    return b["ring"].get()[0]


def _logits(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(V) * 3).astype(np.float32)


def test_philox_kernel_matches_random123():
    import cupy

    mod = load_module(read_kernel_source(ROOT / "kernels" / "sampling.cu"), "sampling")
    fn = mod.get_function("philox_outputs")
    rng = np.random.default_rng(0)
    ctr = rng.integers(0, 2**32, size=(300, 4), dtype=np.uint64).astype(np.uint32)
    ctr[0], ctr[1] = 0, 0xFFFFFFFF
    for key in ((0, 0), (0xFFFFFFFF, 0xFFFFFFFF), (0xA4093822, 0x299F31D0)):
        out = cupy.zeros((300, 4), cupy.uint32)
        fn((2,), (256,), (cupy.asarray(ctr), out, np.uint32(key[0]), np.uint32(key[1]), np.int32(300)))
        got = out.get()
        for i in range(300):
            assert tuple(int(x) for x in got[i]) == smp.philox4x32_10(tuple(int(c) for c in ctr[i]), key)


def test_greedy_and_tiny_temperature_pick_the_argmax(sampler):
    seeds = np.arange(ROWS, dtype=np.int64)
    for t in range(5):
        lg = _logits(t)
        assert (run_sampler(sampler, lg, smp.Sampling(), seeds) == np.argmax(lg)).all()
        assert (run_sampler(sampler, lg, smp.Sampling(temperature=1e-6, seed=1), seeds) == np.argmax(lg)).all()
        assert (run_sampler(sampler, lg, smp.Sampling(temperature=2.0, top_k=1), seeds) == np.argmax(lg)).all()


@pytest.mark.parametrize("k", [2, 10, 100])
def test_top_k_never_leaves_the_top_k(sampler, k):
    lg = _logits(k)
    top = set(np.argsort(-lg)[:k].tolist())
    picks = set()
    for rep in range(8):
        seeds = np.arange(ROWS, dtype=np.int64) + rep * ROWS
        picks |= set(run_sampler(sampler, lg, smp.Sampling(temperature=3.0, top_k=k), seeds).tolist())
    assert picks <= top and len(picks) >= min(k, 2)


@pytest.mark.parametrize("p", [0.3, 0.8, 0.95])
def test_top_p_never_leaves_the_nucleus(sampler, p):
    lg = _logits(int(p * 100))
    order = np.argsort(-lg)
    probs = np.exp(lg[order].astype(np.float64) - lg.max())
    probs /= probs.sum()
    nucleus = set(order[:int(np.searchsorted(np.cumsum(probs), p - 1e-6)) + 1].tolist())
    picks = set()
    for rep in range(8):
        seeds = np.arange(ROWS, dtype=np.int64) + rep * ROWS
        picks |= set(run_sampler(sampler, lg, smp.Sampling(temperature=1.0, top_p=p), seeds).tolist())
    assert picks <= nucleus


def test_kernel_equals_reference_and_follows_the_softmax(sampler):
    lg = np.zeros(V, np.float32)
    lg[:6] = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5]
    lg[6:] = -30.0
    s = smp.Sampling(temperature=1.0)
    picks, mismatches = [], 0
    for rep in range(40):
        seeds = np.arange(ROWS, dtype=np.int64) * 7919 + rep * (2**33 + 1)
        got = run_sampler(sampler, lg, s, seeds, position=rep)
        for r in range(ROWS):
            mismatches += int(got[r]) != smp.sample_reference(lg, smp.Sampling(1.0, seed=int(seeds[r])), rep)
        picks += got.tolist()
    assert mismatches <= 2
    n = len(picks)
    counts = np.bincount(picks, minlength=V)[:6]
    p = np.exp(lg[:6].astype(np.float64)) / np.exp(lg.astype(np.float64)).sum()
    assert np.all(np.abs(counts / n - p) < 5 * np.sqrt(p * (1 - p) / n))


def test_same_seed_and_position_same_token_reproducibly(sampler):
    lg = _logits(99)
    s = smp.Sampling(temperature=1.5, top_p=0.97)
    seeds = np.full(ROWS, 1234, np.int64)
    a = run_sampler(sampler, lg, s, seeds, position=5)
    assert len(set(a.tolist())) == 1  # every row: the same seed and position
    assert (run_sampler(sampler, lg, s, seeds, position=5) == a).all()
    assert len(set(run_sampler(sampler, lg, s, np.arange(ROWS, dtype=np.int64), position=5).tolist())) > 1
