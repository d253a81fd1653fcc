"""The sampling kernel on the CPU: it compiles through NVRTC with the declared signature, and its Python
reference (dagbuild.llama.sampling) keeps the algorithm's promises: Random123's Philox vectors, top-k and
top-p sets, greedy ties, the draw's dependence on seed and position only."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import KERNELS
from helpers import needs_nvrtc

from dagbuild.errors import DagbuildError
from dagbuild.llama import sampling as smp

# Random123's known-answer vectors for Philox4x32-10
KAT = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
       ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
       ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]

SAMPLE_PARAMS = ["const f32* logits", "i32* tokens", "i32* pos", "i32* ctl", "const f32* cfg", "const i32* prompt",
                 "i32* ring", "i32* state", "i32 vocab", "i32 max_seq", "i32 batch", "i32 ring_rows"]


@pytest.mark.parametrize("ctr, key, out", KAT)
def test_philox_known_answers(ctr, key, out):
    assert smp.philox4x32_10(ctr, key) == out


def test_draw_depends_on_seed_and_position_only():
    assert smp.draw(7, 10) == smp.draw(7, 10)
    assert len({smp.draw(7, p) for p in range(100)}) == 100
    assert smp.draw(7, 3) != smp.draw(8, 3) and smp.draw(1 << 32, 3) != smp.draw(0, 3)


def test_order_keys_preserve_order():
    v = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, np.inf], np.float32)
    k = smp.order_keys(v)
    assert all(int(a) <= int(b) for a, b in zip(k, k[1:], strict=False))
    assert k[3] < k[4]  # -0 below +0, as a total order


def _logits(seed: int, n: int = 500) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32) * 3


def test_greedy_is_the_lowest_index_of_the_max():
    lg = np.array([1.0, 5.0, 2.0, 5.0], np.float32)
    assert smp.sample_reference(lg, smp.Sampling(), 0) == 1
    assert smp.sample_reference(lg, smp.Sampling(temperature=1.0, top_k=1), 0) == 1


@pytest.mark.parametrize("k", [1, 2, 5, 40])
def test_top_k_stays_in_the_top_k(k):
    lg = _logits(k)
    top = set(np.argsort(-lg)[:k].tolist())
    for seed in range(200):
        assert smp.sample_reference(lg, smp.Sampling(temperature=2.0, top_k=k, seed=seed), 0) in top


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_top_p_stays_in_the_nucleus(p):
    lg = _logits(int(p * 10))
    order = np.argsort(-lg)
    probs = np.exp(lg[order].astype(np.float64) - lg.max())
    probs /= probs.sum()
    nucleus = set(order[:int(np.searchsorted(np.cumsum(probs), p - 1e-6)) + 1].tolist())
    picks = {smp.sample_reference(lg, smp.Sampling(temperature=1.0, top_p=p, seed=s), 3) for s in range(300)}
    assert picks <= nucleus and (len(picks) > 1 or len(nucleus) == 1)


def test_tiny_temperature_is_greedy():
    lg = _logits(5)
    for seed in range(50):
        assert smp.sample_reference(lg, smp.Sampling(temperature=1e-4, seed=seed), seed) == int(np.argmax(lg))


def test_sampling_follows_the_softmax():
    lg = np.array([0.0, 1.0, 2.0, -1.0], np.float32)
    n = 4000
    counts = np.bincount([smp.sample_reference(lg, smp.Sampling(temperature=1.0, seed=s), 0) for s in range(n)],
                         minlength=4)
    p = np.exp(lg.astype(np.float64)) / np.exp(lg.astype(np.float64)).sum()
    assert np.all(np.abs(counts / n - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-3)


@pytest.mark.parametrize("bad", [dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(seed=-1),
                                 dict(temperature=float("nan"))])
def test_bad_settings_are_refused(bad):
    with pytest.raises(DagbuildError):
        smp.Sampling(**bad)


@needs_nvrtc
def test_sampling_kernel_compiles_with_its_signature():
    from dagbuild import kernels
    from dagbuild.sources import read_kernel_source

    source = read_kernel_source(KERNELS / "sampling.cu")
    ptx = kernels.compile_ptx(source, "sampling", arch="sm_90")
    from dagbuild.bind import parse_param

    params = [parse_param(t, {}) for t in SAMPLE_PARAMS]
    assert kernels.check_signature("sample", "sample_step", [(p.name, p.kind) for p in params], ptx) == []
    assert kernels.ptx_entry_params(ptx, "philox_outputs") == [".u64", ".u64", ".u32", ".u32", ".u32"]
