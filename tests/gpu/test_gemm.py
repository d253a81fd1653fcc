"""kernels/gemm.cu on the GPU (the decode GEMM path's own GEMMs) against float64 NumPy at odd shapes: batch rows
not a multiple of 8, 16 or the 64-row tile, weight rows not a multiple of the 64-row tile, k tails (k not a
multiple of a 128-byte k-tile), k shorter than a cluster's split (splits with no k-tile), every split (cluster
size) and stage count, the three epilogues (store, residual add, SiLU*up of interleaved gate/up rows) and the
three weight types, and the forms the RMSNorms ride on (gemm_add_norm, gemm_scaled_*, rms_partials). Outputs are
poisoned with NaN and guarded past their end; the add epilogue starts from random values. A row's result must not
depend on the batch it is computed in (its sums never mix rows).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import in_weight_type

from dagbuild.kernels import load_module
from dagbuild.llama import reference as ref
from dagbuild.sources import read_kernel_source

pytestmark = pytest.mark.gpu

SRC = Path(__file__).resolve().parents[2] / "kernels" / "gemm.cu"
GUARD = 67
TOL = {"f32": 2e-5, "f16": 2e-5, "bf16": 2e-5}  # against the reference that sees the kernel's inputs


@pytest.fixture(scope="module")
def cp():
    return pytest.importorskip("cupy")


@pytest.fixture(scope="module")
def mods(cp):
    src = read_kernel_source(SRC)
    return {(s, r): load_module(src, f"gemm_k{s}", (f"-DGT_SPLIT={s}",) + ((f"-DGT_ROW={r}",) if r != 128 else ()))
            for s in (1, 2, 4, 8) for r in (128, 256)}


def rng_for(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def silu(g):
    return g / (1.0 + np.exp(-g))


def run(cp, mods, epi, wt, m, n, k, split, stages, a_host, w_host, c_init=None, row=256):
    """One launch as the spec makes it (GT_ROW ``row``: stages of 128 * row bytes); returns the output (float64,
    guard checked)."""
    fn = mods[(split, row)].get_function(f"gemm_{epi}_{wt}")
    out_n = n // 2 if epi == "silu" else n
    count = m * out_n
    if epi == "silu":
        host = np.full(count + GUARD, np.nan, np.float32)
        out_dev = cp.asarray(in_weight_type(host, wt)[0])
    else:
        host = np.full(count + GUARD, np.nan, np.float32)
        if c_init is not None:
            host[:count] = c_init.reshape(-1)
        out_dev = cp.asarray(host)
    a_dev, w_dev = cp.asarray(a_host), cp.asarray(w_host)
    smem = stages * 128 * row
    fn.max_dynamic_shared_size_bytes = smem
    grid = (-(-n // 64) * split, -(-m // 64))
    fn(grid, (256,), (a_dev, w_dev, out_dev, np.int32(m), np.int32(n), np.int32(k)), shared_mem=smem)
    return fetch(out_dev, wt, epi, m, out_n)


def fetch(out_dev, wt, epi, m, out_n):
    """The first m * out_n outputs (float64 [m, out_n]): every one written, none past them (NaN guard)."""
    got = out_dev.get()
    if wt == "bf16" and epi == "silu":
        got = ref.bf16_to_f32(got)
    got = np.asarray(got, np.float32)
    count = m * out_n
    assert np.all(np.isnan(got[count:])), "the GEMM wrote past the end of its output"
    out = got[:count].astype(np.float64).reshape(m, out_n)
    assert np.all(np.isfinite(out)), "an output element was left unwritten"
    return out


def rel_err(out, expect) -> float:
    return float(np.linalg.norm(out - expect) / np.linalg.norm(expect))


CASES = [  # m, n, k
    (1, 64, 64), (3, 130, 520), (13, 2560, 2048), (16, 200, 8), (37, 129, 1032), (64, 2048, 5632),
    (65, 96, 264), (130, 520, 136), (200, 64, 688),
]


@pytest.mark.parametrize("wt", ["f16", "bf16", "f32"])
@pytest.mark.parametrize("epi", ["store", "add", "silu"])
@pytest.mark.parametrize("split", [1, 2, 4, 8])
def test_gemm_against_numpy(cp, mods, wt, epi, split):
    for i, (m, n, k) in enumerate(CASES):
        n += n % 2 if epi == "silu" else 0  # gate/up rows come in pairs
        rng = rng_for(wt, epi, split, m, n, k)
        row = (128, 256)[i % 2]  # both stage geometries, 2..7 stages of them across the cases
        stages = 2 + (i + split) % 6
        a_host, a64 = in_weight_type(rng.standard_normal((m, k)) * rng.uniform(0.1, 4.0, (m, 1)), wt)
        w_host, w64 = in_weight_type(rng.standard_normal((n, k)) / np.sqrt(k), wt)
        prod = a64 @ w64.T
        c0 = None
        if epi == "store":
            expect = prod
        elif epi == "add":
            c0 = rng.standard_normal((m, n)).astype(np.float32)
            expect = c0.astype(np.float64) + prod
        else:
            act = silu(prod[:, 0::2]) * prod[:, 1::2]
            expect = in_weight_type(act, wt)[1]  # rounded to wt once, as the kernel stores it
        got = run(cp, mods, epi, wt, m, n, k, split, stages, a_host, w_host, c0, row)
        tol = TOL[wt] if epi != "silu" else {"f32": 2e-5, "f16": 1e-3, "bf16": 8e-3}[wt]
        err = rel_err(got, expect)
        assert err < tol, f"{wt} {epi} split {split} row {row} stages {stages} m={m} n={n} k={k}: rel err {err:.2e}"


@pytest.mark.parametrize("wt", ["f16", "f32"])
def test_a_row_does_not_depend_on_its_batch(cp, mods, wt):
    """Row r of a 200-row product equals the same row computed alone, bit for bit (tiles never mix rows)."""
    rng = rng_for("batch", wt)
    m, n, k = 200, 320, 1032
    a_host, _ = in_weight_type(rng.standard_normal((m, k)), wt)
    w_host, _ = in_weight_type(rng.standard_normal((n, k)) / np.sqrt(k), wt)
    whole = run(cp, mods, "store", wt, m, n, k, 4, 3, a_host, w_host)
    for r in (0, 63, 64, 199):
        alone = run(cp, mods, "store", wt, 1, n, k, 4, 3, np.ascontiguousarray(a_host[r:r + 1]), w_host)
        assert np.array_equal(alone[0], whole[r]), r


NORM_LOOSE = {"f32": 2e-5, "f16": 2e-3, "bf16": 1.5e-2}  # the riding norms against the exact RMSNorm product
EPS = 1e-5


RIDE_CASES = [  # m, n (the residual's width: the consumer's k), k (the residual GEMM's), n2 (the consumer's rows)
    (1, 64, 64, 64), (3, 136, 520, 130), (16, 2048, 2048, 2560), (13, 200, 8, 96), (37, 1032, 264, 129),
    (70, 520, 136, 200),
]


def guarded(cp, count: int, wt: str | None = None):
    """A NaN-filled device array of ``count`` values and GUARD more (in ``wt``; f32 when None)."""
    host = np.full(count + GUARD, np.nan, np.float32)
    return cp.asarray(in_weight_type(host, wt)[0] if wt else host)


def widened(dev, wt: str, count: int) -> np.ndarray:
    """The first ``count`` values of a wt array (float32), its guard still NaN."""
    got = dev.get()
    got = np.asarray(ref.bf16_to_f32(got) if wt == "bf16" else got, np.float32)
    assert np.all(np.isnan(got[count:])), "a kernel wrote past the end of its output"
    assert np.all(np.isfinite(got[:count])), "an output element was left unwritten"
    return got[:count]


@pytest.mark.parametrize("wt", ["f16", "bf16", "f32"])
@pytest.mark.parametrize("split", [1, 2, 4])
def test_norm_on_the_gemms_against_numpy(cp, mods, wt, split):
    """tc_norm 2: gemm_add_norm_<wt> adds the product into the residual c and writes the next RMSNorm's operand
    xn = wt(c * norm) and each row's sums of squares over 16-column parts (ssq); rms_partials_<wt> of the same
    residual writes the same xn and ssq bit for bit; gemm_scaled_{store,silu}_<wt> (every split) read them and
    scale each row by rsqrt(sum(ssq) / k + eps): tight against the reference of the kernels' own xn and ssq,
    loose against the exact RMSNorm product."""
    for i, (m, n, k, n2) in enumerate(RIDE_CASES):
        rng = rng_for("ride", wt, split, m, n, k)
        row, stages = (128, 256)[i % 2], 2 + i % 3
        parts = -(-n // 16)
        a_host, a64 = in_weight_type(rng.standard_normal((m, k)) * rng.uniform(0.1, 4.0, (m, 1)), wt)
        w_host, w64 = in_weight_type(rng.standard_normal((n, k)) / np.sqrt(k), wt)
        g_host, g64 = in_weight_type(1.0 + 0.3 * rng.standard_normal(n), wt)
        c0 = (rng.standard_normal((m, n)) * rng.uniform(0.5, 20.0, (m, 1))).astype(np.float32)
        what = f"{wt} split {split} row {row} stages {stages} m={m} n={n} k={k}"
        c_dev, xn_dev, ssq_dev = guarded(cp, m * n), guarded(cp, m * n, wt), guarded(cp, m * parts)
        c_dev[:m * n] = cp.asarray(c0.reshape(-1))
        fn = mods[(split, row)].get_function(f"gemm_add_norm_{wt}")
        smem = fn.max_dynamic_shared_size_bytes = stages * 128 * row
        fn((-(-n // 64) * split, -(-m // 64)), (256,),
           (cp.asarray(a_host), cp.asarray(w_host), c_dev, np.int32(m), np.int32(n), np.int32(k),
            cp.asarray(g_host), xn_dev, ssq_dev), shared_mem=smem)
        c = fetch(c_dev, wt, "add", m, n)
        assert rel_err(c, c0.astype(np.float64) + a64 @ w64.T) < TOL[wt], f"{what}: residual"
        xn = widened(xn_dev, wt, m * n).reshape(m, n)
        want = in_weight_type(c.astype(np.float32) * g64.astype(np.float32), wt)[1]
        assert np.array_equal(xn.astype(np.float64), want), f"{what}: xn is not wt(c * norm)"
        ssq = widened(ssq_dev, "f32", m * parts).reshape(m, parts).astype(np.float64)
        sq = np.zeros((m, parts * 16))
        sq[:, :n] = c ** 2
        assert rel_err(ssq, sq.reshape(m, parts, 16).sum(axis=2)) < 1e-6, f"{what}: ssq"
        # rms_partials of the same residual: the same operand and parts, bit for bit
        xn2_dev, ssq2_dev = guarded(cp, m * n, wt), guarded(cp, m * parts)
        mods[(1, 256)].get_function(f"rms_partials_{wt}")(
            (m,), (256,), (c_dev, cp.asarray(g_host), xn2_dev, ssq2_dev, np.int32(n)))
        assert np.array_equal(widened(xn2_dev, wt, m * n).reshape(m, n), xn), f"{what}: rms_partials xn"
        assert np.array_equal(widened(ssq2_dev, "f32", m * parts).reshape(m, parts), ssq), f"{what}: rms_partials ssq"
        # the consumers, every split
        scale = 1.0 / np.sqrt(ssq.sum(axis=1, keepdims=True) / n + EPS)
        exact_scale = 1.0 / np.sqrt(np.mean(c ** 2, axis=1, keepdims=True) + EPS)
        w2_host, w264 = in_weight_type(rng.standard_normal((n2 + n2 % 2, n)) / np.sqrt(n), wt)
        for epi in ("store", "silu"):
            nn = n2 + n2 % 2 if epi == "silu" else n2
            w2 = w2_host[:nn]
            tight, exact = scale * (xn @ w264[:nn].T), (c * exact_scale * g64) @ w264[:nn].T
            if epi == "silu":
                tight = in_weight_type(silu(tight[:, 0::2]) * tight[:, 1::2], wt)[1]
                exact = silu(exact[:, 0::2]) * exact[:, 1::2]
            out_n = nn // 2 if epi == "silu" else nn
            for split2 in (1, 2, 4, 8):
                out_dev = guarded(cp, m * out_n, wt if epi == "silu" else None)
                fn = mods[(split2, row)].get_function(f"gemm_scaled_{epi}_{wt}")
                smem = fn.max_dynamic_shared_size_bytes = stages * 128 * row + 256
                fn((-(-nn // 64) * split2, -(-m // 64)), (256,),
                   (xn_dev, cp.asarray(np.ascontiguousarray(w2)), out_dev, np.int32(m), np.int32(nn), np.int32(n),
                    ssq_dev, np.float32(EPS)), shared_mem=smem)
                out = fetch(out_dev, wt, epi, m, out_n)
                tol = 2e-5 if epi == "store" else {"f32": 2e-5, "f16": 1e-3, "bf16": 8e-3}[wt]
                where = f"{what}: scaled {epi} split {split2}"
                assert rel_err(out, tight) < tol, f"{where}: tight {rel_err(out, tight):.2e}"
                assert rel_err(out, exact) < NORM_LOOSE[wt] + tol, f"{where}: loose {rel_err(out, exact):.2e}"
