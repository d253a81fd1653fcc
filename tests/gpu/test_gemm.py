"""kernels/gemm.cu on the GPU (the decode GEMM path's own GEMMs) against float64 NumPy at odd shapes: batch rows
not a multiple of 8, 16 or the 64-row tile, weight rows not a multiple of the 64-row tile, k tails (k not a
multiple of a 128-byte k-tile), k shorter than a cluster's split (splits with no k-tile), every split (cluster
size) and stage count, the three epilogues (store, residual add, SiLU*up of interleaved gate/up rows) and the
three weight types. Outputs are poisoned with NaN and guarded past their end; the add epilogue starts from
random values. A row's result must not depend on the batch it is computed in (its sums never mix rows).
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


NORM_CASES = [  # m, n, k
    (1, 64, 64), (3, 130, 520), (16, 2560, 2048), (13, 200, 8), (37, 129, 1032), (64, 96, 2048), (70, 520, 136),
]
NORM_LOOSE = {"f32": 2e-5, "f16": 2e-3, "bf16": 1.5e-2}
EPS = 1e-5


def norm_smem(wt: str, m: int, row: int, stages: int) -> int:
    """gemm_norm_*'s shared memory for ``stages`` stages: per stage the W tile, the norm weights' k-tile and the
    f32 x tile of the block's rows; then one A tile and the rows' sums of squares."""
    size = 4 if wt == "f32" else 2
    arows = 64 if wt == "f32" else min(64, -(-m // 16) * 16)
    stage = 65 * row + arows * (row // size) * 4
    return stages * stage + arows * row + 256


@pytest.mark.parametrize("wt", ["f16", "bf16", "f32"])
@pytest.mark.parametrize("epi", ["store", "silu"])
@pytest.mark.parametrize("split", [1, 2, 4, 8])
def test_norm_gemm_against_numpy(cp, mods, wt, epi, split):
    """gemm_norm_<epi>_<wt>: the product of RMSNorm(x) (f32 rows x, weight norm) with w, the norm inside the GEMM:
    tight against the reference that rounds x * norm to wt as the kernel does and scales by the exact
    rsqrt(mean(x^2) + eps), loose against the exact RMSNorm product."""
    for i, (m, n, k) in enumerate(NORM_CASES):
        n += n % 2 if epi == "silu" else 0
        rng = rng_for("norm", wt, epi, split, m, n, k)
        row, stages = (128, 256)[i % 2], 2 + i % 3
        x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 30.0, (m, 1))).astype(np.float32)
        g_host, g64 = in_weight_type(1.0 + 0.3 * rng.standard_normal(k), wt)
        w_host, w64 = in_weight_type(rng.standard_normal((n, k)) / np.sqrt(k), wt)
        scale = 1.0 / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=1, keepdims=True) + EPS)
        a64 = in_weight_type(x * g64.astype(np.float32), wt)[1]  # x * norm in f32, rounded to wt
        tight, exact = scale * (a64 @ w64.T), (x * scale * g64) @ w64.T
        if epi == "silu":
            tight = in_weight_type(silu(tight[:, 0::2]) * tight[:, 1::2], wt)[1]
            exact = silu(exact[:, 0::2]) * exact[:, 1::2]
        out_n = n // 2 if epi == "silu" else n
        count = m * out_n
        host = np.full(count + GUARD, np.nan, np.float32)
        out_dev = cp.asarray(in_weight_type(host, wt)[0] if epi == "silu" else host)
        fn = mods[(split, row)].get_function(f"gemm_norm_{epi}_{wt}")
        smem = fn.max_dynamic_shared_size_bytes = norm_smem(wt, m, row, stages)
        fn((-(-n // 64) * split, -(-m // 64)), (256,),
           (cp.asarray(x), cp.asarray(g_host), cp.asarray(w_host), out_dev, np.int32(m), np.int32(n), np.int32(k),
            np.float32(EPS)), shared_mem=smem)
        out = fetch(out_dev, wt, epi, m, out_n)
        what = f"{wt} {epi} split {split} row {row} stages {stages} m={m} n={n} k={k}"
        tol = 2e-5 if epi == "store" else {"f32": 2e-5, "f16": 1e-3, "bf16": 8e-3}[wt]
        assert rel_err(out, tight) < tol, f"{what}: tight {rel_err(out, tight):.2e}"
        assert rel_err(out, exact) < NORM_LOOSE[wt] + tol, f"{what}: loose {rel_err(out, exact):.2e}"
