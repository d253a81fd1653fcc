"""kernels/llama.cu on the GPU, each kernel against its NumPy reference (dagbuild.llama.reference).

Fresh random data per test (seeded), outputs poisoned with NaN (int outputs with -1) before each launch so
that an unwritten element fails, and a NaN guard after each output so that a write past its end fails.
Launch shapes are the ones in kernels/llama.md.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import in_weight_type, weight_type_values

from dagbuild.kernels import load_module
from dagbuild.llama import reference as ref
from dagbuild.sources import read_kernel_source

pytestmark = pytest.mark.gpu

KERNEL_SRC = Path(__file__).parents[2] / "kernels" / "llama.cu"
WTYPES = ("f32", "f16", "bf16")
TOL = {"f32": 1e-5, "f16": 1e-4, "bf16": 1e-4}  # relative error ||out - ref|| / ||ref||
BITS = {"f32": 24, "f16": 11, "bf16": 8}  # significand bits of each type (the KV cache holds the weight type)
GUARD = 67  # NaN elements after each output buffer


@pytest.fixture(scope="module")
def cp():
    return pytest.importorskip("cupy")


@pytest.fixture(scope="module")
def mod(cp):
    return load_module(read_kernel_source(KERNEL_SRC), "llama")


def rng_for(*key) -> np.random.Generator:
    """A generator seeded from the test's parameters (fresh, reproducible data per test case)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def weights(rng, shape, wt):
    """Random weights of type wt: (the array to upload, its exact value in float64)."""
    return in_weight_type(rng.standard_normal(shape), wt)


def out_buffer(cp, count, fill=np.nan, dtype=np.float32, head=None):
    """A device buffer of count elements plus a guard, all `fill`, or `head` then the guard."""
    host = np.full(count + GUARD, fill, dtype=dtype)
    if head is not None:
        host[:count] = np.asarray(head, dtype=dtype).reshape(-1)
    return cp.asarray(host)


def fetch(buf, count):
    """(the first count elements, float64) after checking that the guard is still all NaN."""
    host = buf.get()
    assert np.all(np.isnan(host[count:])), "kernel wrote past the end of its output"
    return host[:count].astype(np.float64)


def rel_err(out, expect) -> float:
    out, expect = np.asarray(out, np.float64).reshape(-1), np.asarray(expect, np.float64).reshape(-1)
    assert np.all(np.isfinite(out)), "output has NaN/inf (an element left unwritten?)"
    return float(np.linalg.norm(out - expect) / np.linalg.norm(expect))


def ulp(a, wt) -> np.ndarray:
    """The spacing of type wt at |a| (normal numbers: 2^(e - bits) for |a| in [2^(e-1), 2^e))."""
    a = np.abs(np.asarray(a, np.float64))
    return np.ldexp(1.0, np.frexp(np.where(a > 0, a, 1.0))[1] - BITS[wt])


def assert_rounded_close(got, want, exact, wt, tol):
    """Appended cache values `got` (float64 values of type wt) against `want`, the float64 reference `exact`
    rounded to wt. f32: relative error below tol. f16/bf16: the kernel rounds its f32 result once, so each element
    is within half a wt ulp of that f32 result, which is within tol of the reference (relative to the values'
    scale: a rotated element near zero carries the f32 error of its inputs' size), and nearly every element is
    the rounded reference itself (the exceptions: f32 results that straddle a rounding boundary)."""
    if wt == "f32":
        assert rel_err(got, want) < tol
        return
    bound = ulp(exact, wt) / 2 + tol * np.max(np.abs(exact))
    assert np.all(np.abs(got - exact) <= bound), "an appended element is off its reference by more than rounding"
    assert np.mean(got != want) < 0.01, "too many appended elements off their rounded reference"


i32, f32 = np.int32, np.float32


# ----------------------------------------------------------------------------------------------------------
# embed, rmsnorm
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wt", WTYPES)
@pytest.mark.parametrize("vocab,hidden,batch", [(50, 100, 1), (1000, 4096, 3), (7, 33, 17), (300, 256, 64)])
def test_embed(cp, mod, wt, vocab, hidden, batch):
    rng = rng_for("embed", wt, vocab, hidden, batch)
    table, table64 = weights(rng, (vocab, hidden), wt)
    tokens = rng.integers(0, vocab, batch).astype(np.int32)
    tokens[0] = vocab - 1
    x = out_buffer(cp, batch * hidden)
    mod.get_function(f"embed_{wt}")((batch,), (256,), (cp.asarray(table), cp.asarray(tokens), x, i32(hidden)))
    got = fetch(x, batch * hidden)
    assert np.array_equal(got, ref.embed(table64, tokens, hidden).reshape(-1))  # conversion is exact


@pytest.mark.parametrize("wt", WTYPES)
@pytest.mark.parametrize("hidden,batch,eps", [(64, 1, 1e-5), (100, 3, 1e-6), (4096, 17, 1e-5), (8192, 2, 1e-6)])
def test_rmsnorm(cp, mod, wt, hidden, batch, eps):
    rng = rng_for("rmsnorm", wt, hidden, batch)
    x = (rng.standard_normal((batch, hidden)) * rng.uniform(0.1, 10.0, (batch, 1))).astype(np.float32)
    w, w64 = weights(rng, (hidden,), wt)
    y = out_buffer(cp, batch * hidden)
    mod.get_function(f"rmsnorm_{wt}")((batch,), (256,), (cp.asarray(x), cp.asarray(w), y, i32(hidden), f32(eps)))
    assert rel_err(fetch(y, batch * hidden), ref.rmsnorm(x, w64, hidden, eps)) < TOL[wt]


# ----------------------------------------------------------------------------------------------------------
# gemv, gemv_add
# ----------------------------------------------------------------------------------------------------------

GEMV_ROWS_PER_BLOCK = {"gemv": 4, "gemvw": 16}  # grid = ceil_div(n, rows), block = 256


def run_gemv(cp, mod, wt, add, n, k, batch, seed_key, variant="gemv"):
    rng = rng_for("gemv", wt, add, n, k, batch, seed_key)
    w, w64 = weights(rng, (n, k), wt)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    if add:
        y0 = rng.standard_normal((batch, n)).astype(np.float32) * 10
        y = out_buffer(cp, batch * n, head=y0)
        expect = ref.gemv_add(w64, x, y0, n, k, batch)
    else:
        y = out_buffer(cp, batch * n)
        expect = ref.gemv(w64, x, n, k, batch)
    name = f"{variant}_add_{wt}" if add else f"{variant}_{wt}"
    grid = (-(-n // GEMV_ROWS_PER_BLOCK[variant]),)
    mod.get_function(name)(grid, (256,), (cp.asarray(w), cp.asarray(x), y, i32(n), i32(k), i32(batch)))
    return rel_err(fetch(y, batch * n), expect)


@pytest.mark.parametrize("variant", ["gemv", "gemvw"])
@pytest.mark.parametrize("wt", WTYPES)
@pytest.mark.parametrize("add", [False, True], ids=["gemv", "gemv_add"])
@pytest.mark.parametrize("n,k", [(1, 8), (100, 64), (257, 1032), (300, 4104)])
@pytest.mark.parametrize("batch", [1, 3, 8, 17, 64])
def test_gemv(cp, mod, wt, add, n, k, batch, variant):
    assert run_gemv(cp, mod, wt, add, n, k, batch, 0, variant) < TOL[wt]


@pytest.mark.parametrize("variant", ["gemv", "gemvw"])
@pytest.mark.parametrize("wt", WTYPES)
@pytest.mark.parametrize("add", [False, True], ids=["gemv", "gemv_add"])
@pytest.mark.parametrize("n,k,batch", [(100, 256, 512), (4099, 512, 2), (37, 2048, 5), (13, 8, 6)])
def test_gemv_more_shapes(cp, mod, wt, add, n, k, batch, variant):
    assert run_gemv(cp, mod, wt, add, n, k, batch, 1, variant) < TOL[wt]


# ----------------------------------------------------------------------------------------------------------
# rope_append
# ----------------------------------------------------------------------------------------------------------


def run_rope(cp, mod, wt, batch, heads, kv_heads, head_dim, max_seq, theta, pos, with_bias=False):
    """rope_append_<wt> against ref.rope_append. Returns (q's relative error, the appended k's values, the
    reference's appended k rounded to wt, unrounded); checks that v is appended exactly (one f32 add, rounded
    once) and that nothing else in the caches changed."""
    rng = rng_for("rope", batch, heads, kv_heads, head_dim, max_seq, theta)
    q = rng.standard_normal((batch, heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((batch, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, kv_heads, head_dim)).astype(np.float32)
    nb = (heads + 2 * kv_heads) * head_dim
    bias = (rng.standard_normal(nb) if with_bias else np.zeros(nb)).astype(np.float32)
    inv_freq = ref.rope_inv_freq(head_dim, theta)
    cache_shape = (batch + 1, kv_heads, max_seq, head_dim)  # cache_batch > batch: row b's slot is fixed
    kc, kc64 = in_weight_type(rng.standard_normal(cache_shape), wt)  # the caches hold the weight type
    vc, vc64 = in_weight_type(rng.standard_normal(cache_shape), wt)
    pos = np.asarray(pos, np.int32)
    q_d, k_d, kc_d, vc_d = cp.asarray(q), cp.asarray(k), cp.asarray(kc), cp.asarray(vc)
    mod.get_function(f"rope_append_{wt}")(
        (batch,),
        (128,),
        (
            q_d,
            k_d,
            cp.asarray(v),
            cp.asarray(bias),
            cp.asarray(inv_freq),
            kc_d,
            vc_d,
            cp.asarray(pos),
            i32(heads),
            i32(kv_heads),
            i32(head_dim),
            i32(max_seq),
        ),
    )
    q_ref, kc_ref, vc_ref = ref.rope_append(q, k, v, bias, inv_freq, kc64, vc64, pos, heads, kv_heads, head_dim,
                                            max_seq)
    assert np.array_equal(k_d.get(), k), "k is an input: it must not change"
    kc_got, vc_got = kc_d.get(), vc_d.get()
    written = np.zeros(cache_shape, bool)
    for b, p in enumerate(pos):
        if 0 <= p < max_seq:
            written[b, :, p] = True
    assert np.array_equal(kc_got[~written], kc[~written]), "k_cache changed outside the appended slots"
    # v (+ its bias: one f32 add) is copied exactly, then rounded once to wt (the other slots are unchanged)
    assert np.array_equal(vc_got, in_weight_type(vc_ref, wt)[0]), "v must be copied exactly (rounded once)"
    k_ref = kc_ref[written]
    return rel_err(q_d.get(), q_ref), weight_type_values(kc_got[written], wt), in_weight_type(k_ref, wt)[1], k_ref


@pytest.mark.parametrize("wt", WTYPES)
@pytest.mark.parametrize(
    "batch,heads,kv_heads,head_dim,theta,with_bias",
    [(1, 4, 4, 64, 10000.0, False), (3, 8, 2, 128, 500000.0, True), (17, 32, 8, 128, 500000.0, False),
     (5, 6, 3, 16, 10000.0, True), (2, 4, 1, 96, 1e6, True)],
)
def test_rope_append(cp, mod, wt, batch, heads, kv_heads, head_dim, theta, with_bias):
    max_seq = 256
    rng = rng_for("rope-pos", batch, heads)
    pos = rng.integers(0, max_seq, batch)
    pos[0] = max_seq - 1
    if batch > 1:
        pos[1] = 0
    eq, k_got, k_want, k_ref = run_rope(cp, mod, wt, batch, heads, kv_heads, head_dim, max_seq, theta, pos,
                                        with_bias)
    assert eq < 1e-5
    assert_rounded_close(k_got, k_want, k_ref, wt, 1e-5)


@pytest.mark.parametrize("wt", WTYPES)
def test_rope_append_long_positions(cp, mod, wt):
    # At p ~ 8000 the f32 angle p * inv_freq is sensitive to its last ulp, so the bound is looser than the
    # rotation's accuracy (inv_freq now comes from the host, as HF's does). The appended k is that f32 result
    # rounded once to wt: within 2^-BITS (relative) of it, so the bound grows by that much.
    max_seq = 8192
    eq, k_got, _, k_ref = run_rope(cp, mod, wt, 3, 4, 2, 128, max_seq, 500000.0, [8191, 4097, 7000])
    assert eq < 1e-3 and rel_err(k_got, k_ref) < 1e-3 + 2.0 ** -BITS[wt]


# ----------------------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------------------

ATTN_CASES = [
    # heads, kv_heads, head_dim, max_seq, chunk
    (4, 4, 16, 50, 16),
    (8, 2, 64, 300, 64),
    (32, 8, 128, 1024, 256),
    (8, 8, 32, 129, 100),
    (4, 1, 128, 600, 128),
    (2, 2, 64, 200, 1000),
    (6, 3, 32, 520, 300),
    (4, 2, 96, 150, 64),  # head_dim not a power of two (multiple of 4)
    (2, 2, 8, 40, 7),  # tiny head_dim, odd chunk
]


def attn_inputs(rng, batch, heads, kv_heads, head_dim, max_seq, wt):
    """q, the caches of type wt (the arrays to upload and their float64 values: what the references read) and
    pos."""
    q = rng.standard_normal((batch, heads, head_dim)).astype(np.float32)
    kc, kc64 = in_weight_type(rng.standard_normal((batch, kv_heads, max_seq, head_dim)), wt)
    vc, vc64 = in_weight_type(rng.standard_normal((batch, kv_heads, max_seq, head_dim)), wt)
    pos = rng.integers(0, max_seq, batch).astype(np.int32)
    pos[0] = max_seq - 1
    if batch > 1:
        pos[1] = 0
    return q, (kc, kc64), (vc, vc64), pos


def launch_attn_partial(cp, mod, wt, q, kc, vc, pos, heads, kv_heads, head_dim, max_seq, chunk, scale):
    batch = len(pos)
    splits = -(-max_seq // chunk)
    n_o, n_ml = batch * heads * splits * head_dim, batch * heads * splits * 2
    part_o, part_ml = out_buffer(cp, n_o), out_buffer(cp, n_ml)
    mod.get_function(f"attn_partial_{wt}")(
        (batch * heads, splits),
        (128,),
        (
            cp.asarray(q),
            cp.asarray(kc),
            cp.asarray(vc),
            cp.asarray(pos),
            part_o,
            part_ml,
            i32(heads),
            i32(kv_heads),
            i32(head_dim),
            i32(max_seq),
            i32(chunk),
            f32(scale),
        ),
    )
    return part_o, part_ml, n_o, n_ml, splits


def launch_attn_combine(cp, mod, part_o, part_ml, batch, heads, head_dim, splits):
    out = out_buffer(cp, batch * heads * head_dim)
    mod.get_function("attn_combine")(
        (batch * heads,), (128,), (part_o, part_ml, out, i32(heads), i32(head_dim), i32(splits))
    )
    return fetch(out, batch * heads * head_dim)


@pytest.mark.parametrize("heads,kv_heads,head_dim,max_seq,chunk", ATTN_CASES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("wt", WTYPES)
def test_attn_partial(cp, mod, wt, batch, heads, kv_heads, head_dim, max_seq, chunk):
    """attn_partial_<wt> (+ attn_combine) over caches of type wt, against the references on the caches' values:
    the kernel widens them exactly and computes in f32, so the f32 tolerance holds for every type."""
    rng = rng_for("attn", batch, heads, kv_heads, head_dim, max_seq, chunk)
    q, (kc_up, kc), (vc_up, vc), pos = attn_inputs(rng, batch, heads, kv_heads, head_dim, max_seq, wt)
    scale = 1.0 / np.sqrt(head_dim)
    part_o, part_ml, n_o, n_ml, splits = launch_attn_partial(
        cp, mod, wt, q, kc_up, vc_up, pos, heads, kv_heads, head_dim, max_seq, chunk, scale
    )
    o = fetch(part_o, n_o).reshape(batch, heads, splits, head_dim)
    ml = fetch(part_ml, n_ml).reshape(batch, heads, splits, 2)
    o_ref, ml_ref = ref.attn_partial(q, kc, vc, pos, heads, kv_heads, head_dim, max_seq, chunk, scale)

    empty = ml_ref[..., 1] == 0
    assert np.all(ml[..., 0][empty] == -np.inf) and np.all(ml[..., 1][empty] == 0)
    assert np.all(o[empty] == 0)
    live = ~empty
    assert rel_err(ml[..., 0][live], ml_ref[..., 0][live]) < 1e-5
    assert rel_err(ml[..., 1][live], ml_ref[..., 1][live]) < 1e-5
    assert rel_err(o[live], o_ref[live]) < 1e-5

    out = launch_attn_combine(cp, mod, part_o, part_ml, batch, heads, head_dim, splits)
    expect = ref.attention(q, kc, vc, pos, heads, kv_heads, head_dim, max_seq, scale)
    assert rel_err(out, expect) < 1e-5


@pytest.mark.parametrize("batch,heads,head_dim,splits", [(1, 4, 64, 1), (3, 8, 128, 7), (2, 5, 16, 33)])
def test_attn_combine(cp, mod, batch, heads, head_dim, splits):
    rng = rng_for("combine", batch, heads, head_dim, splits)
    part_o = rng.standard_normal((batch, heads, splits, head_dim)).astype(np.float32) * 5
    m = rng.normal(0.0, 3.0, (batch, heads, splits))
    lsum = rng.uniform(0.5, 50.0, (batch, heads, splits))
    if splits > 1:  # empty splits, never the first (a row always has key 0)
        dead = rng.random((batch, heads, splits)) < 0.3
        dead[..., 0] = False
        m[dead], lsum[dead] = -np.inf, 0.0
        part_o[dead] = 0.0
    part_ml = np.stack([m, lsum], axis=-1).astype(np.float32)
    out = launch_attn_combine(cp, mod, cp.asarray(part_o), cp.asarray(part_ml), batch, heads, head_dim, splits)
    assert rel_err(out, ref.attn_combine(part_o, part_ml, heads, head_dim, splits)) < 1e-5


# ----------------------------------------------------------------------------------------------------------
# silu_mul, argmax
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 1023, 1024, 1025, 4 * 14336 + 5])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_silu_mul(cp, mod, n, offset):
    rng = rng_for("silu", n, offset)
    gate = (rng.standard_normal(n + offset) * 4).astype(np.float32)
    up = rng.standard_normal(n + offset).astype(np.float32)
    out = out_buffer(cp, n + offset)
    gate_d, up_d = cp.asarray(gate), cp.asarray(up)
    mod.get_function("silu_mul")((-(-n // 1024),), (256,), (gate_d[offset:], up_d[offset:], out[offset:], i32(n)))
    host = fetch(out, n + offset)
    assert np.all(np.isnan(host[:offset]))
    assert rel_err(host[offset:], ref.silu_mul(gate[offset:], up[offset:], n)) < 1e-5


@pytest.mark.parametrize("vocab", [1, 7, 1000, 1025, 32000, 128256])
@pytest.mark.parametrize("batch", [1, 5])
def test_argmax(cp, mod, vocab, batch):
    rng = rng_for("argmax", vocab, batch)
    logits = rng.standard_normal((batch, vocab)).astype(np.float32)
    if batch > 1:
        logits[1, :] = 0.5  # all tied -> 0
        logits[2, -1] = 100.0  # the last index
    if batch > 3:
        ties = np.sort(rng.choice(vocab, size=min(vocab, 5), replace=False))
        logits[3, ties] = 50.0  # several tied maxima, spread over threads -> the lowest
        logits[4, :] = -np.inf  # all -inf -> 0
    out = out_buffer(cp, batch, fill=-1, dtype=np.int32)
    mod.get_function("argmax")((batch,), (1024,), (cp.asarray(logits), out, i32(vocab)))
    host = out.get()
    assert np.all(host[batch:] == -1), "kernel wrote past the end of its output"
    assert host[:batch].tolist() == ref.argmax(logits, vocab).tolist()
