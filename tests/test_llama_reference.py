"""The NumPy references of kernels/llama.cu against independent formulations (CPU only)."""

from __future__ import annotations

import numpy as np
import pytest

from dagbuild.llama import reference as ref


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_bf16_round_trip_and_rounding():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1000).astype(np.float32)
    bits = ref.f32_to_bf16(x)
    back = ref.bf16_to_f32(bits)
    # representable exactly: widening then rounding again is the identity
    assert np.array_equal(ref.f32_to_bf16(back), bits)
    # nearest: error at most half an ulp of bf16 (8 bits of mantissa)
    assert np.all(np.abs(back - x) <= np.abs(x) * 2.0**-8)
    # ties to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 -> 1 (even); 1 + 3*2^-8 -> 1 + 2^-6
    t = np.array([1 + 2.0**-8, 1 + 3 * 2.0**-8], np.float32)
    assert ref.bf16_to_f32(ref.f32_to_bf16(t)).tolist() == [1.0, 1 + 2.0**-6]


def test_embed_rmsnorm_gemv():
    rng = np.random.default_rng(1)
    table = rng.standard_normal((10, 6))
    tokens = np.array([3, 0, 9], np.int32)
    assert np.array_equal(ref.embed(table, tokens, 6), table[[3, 0, 9]])

    x = rng.standard_normal((3, 6))
    w = rng.standard_normal(6)
    y = ref.rmsnorm(x, w, 6, 1e-5)
    for b in range(3):
        rms = np.sqrt(sum(v * v for v in x[b]) / 6 + 1e-5)
        assert np.allclose(y[b], [w[i] * x[b, i] / rms for i in range(6)])

    wm = rng.standard_normal((5, 8))
    xm = rng.standard_normal((2, 8))
    yy = rng.standard_normal((2, 5))
    loop = np.array([[sum(wm[j, i] * xm[b, i] for i in range(8)) for j in range(5)] for b in range(2)])
    assert np.allclose(ref.gemv(wm, xm, 5, 8, 2), loop)
    assert np.allclose(ref.gemv_add(wm, xm, yy, 5, 8, 2), yy + loop)
    # only the first `batch` rows of x are used
    assert ref.gemv(wm, np.vstack([xm, xm]), 5, 8, 2).shape == (2, 5)


def _hf_rope(x, p, head_dim, theta):
    """HF apply_rotary_pos_emb for one position: x * cos + rotate_half(x) * sin, with HF's inv_freq."""
    inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    freqs = np.float32(p) * inv_freq.astype(np.float32)
    emb = np.concatenate([freqs, freqs]).astype(np.float64)
    cos, sin = np.cos(emb), np.sin(emb)

    def rotate_half(t):
        return np.concatenate([-t[..., head_dim // 2 :], t[..., : head_dim // 2]], axis=-1)

    return x * cos + rotate_half(x) * sin


def test_rope_bias_is_added_before_the_rotation():
    rng = np.random.default_rng(4)
    heads, kvh, hd, ms = 2, 1, 8, 6
    q, k, v = (rng.standard_normal((1, n, hd)) for n in (heads, kvh, kvh))
    bias = rng.standard_normal((heads + 2 * kvh) * hd)
    kc = np.zeros((1, kvh, ms, hd))
    inv = ref.rope_inv_freq(hd, 1e4)
    pos = np.array([3])
    qo, kco, vco = ref.rope_append(q, k, v, bias, inv, kc, kc, pos, heads, kvh, hd, ms)
    q2, kc2, vc2 = ref.rope_append(q + bias[:heads * hd].reshape(1, heads, hd), k + bias[heads * hd:(heads + kvh) * hd],
                                   v + bias[(heads + kvh) * hd:], None, inv, kc, kc, pos, heads, kvh, hd, ms)
    assert np.allclose(qo, q2, atol=1e-12) and np.allclose(kco, kc2, atol=1e-12) and np.allclose(vco, vc2)
    assert np.allclose(vco[0, :, 3], v[0] + bias[(heads + kvh) * hd:])


@pytest.mark.parametrize("head_dim,theta", [(64, 10000.0), (128, 500000.0), (16, 10000.0)])
def test_rope_append_matches_hf_rotate_half(head_dim, theta):
    rng = np.random.default_rng(2)
    batch, heads, kv_heads, max_seq = 3, 4, 2, 40
    q = rng.standard_normal((batch, heads, head_dim))
    k = rng.standard_normal((batch, kv_heads, head_dim))
    v = rng.standard_normal((batch, kv_heads, head_dim))
    kc = rng.standard_normal((batch + 1, kv_heads, max_seq, head_dim))
    vc = rng.standard_normal((batch + 1, kv_heads, max_seq, head_dim))
    pos = np.array([0, 17, 39], np.int32)
    inv = ref.rope_inv_freq(head_dim, theta)
    qo, kco, vco = ref.rope_append(q, k, v, None, inv, kc, vc, pos, heads, kv_heads, head_dim, max_seq)
    for b, p in enumerate(pos):
        assert np.allclose(qo[b], _hf_rope(q[b], p, head_dim, theta), rtol=0, atol=1e-12)
        assert np.allclose(kco[b, :, p], _hf_rope(k[b], p, head_dim, theta), rtol=0, atol=1e-12)
        assert np.array_equal(vco[b, :, p], v[b])
    # position 0 is the identity; nothing else in the caches moves; the inputs are untouched
    assert np.allclose(qo[0], q[0])
    mask = np.ones(kc.shape, bool)
    for b, p in enumerate(pos):
        mask[b, :, p] = False
    assert np.array_equal(kco[mask], kc[mask]) and np.array_equal(vco[mask], vc[mask])
    # rotation keeps each pair's norm
    assert np.allclose(np.linalg.norm(qo, axis=-1), np.linalg.norm(q, axis=-1))


def test_rope_out_of_range_position_leaves_cache():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 1, 8))
    k = rng.standard_normal((1, 1, 8))
    kc = rng.standard_normal((1, 1, 4, 8))
    _, kco, vco = ref.rope_append(q, k, k, None, ref.rope_inv_freq(8, 1e4), kc, kc, np.array([4]), 1, 1, 8, 4)
    assert np.array_equal(kco, kc) and np.array_equal(vco, kc)


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,max_seq,chunk",
    [(4, 4, 16, 50, 16), (8, 2, 32, 64, 64), (6, 3, 8, 33, 10), (2, 1, 16, 7, 100)],
)
def test_attention_partial_combine_equals_softmax_attention(heads, kv_heads, head_dim, max_seq, chunk):
    rng = np.random.default_rng(4)
    batch = 3
    q = rng.standard_normal((batch, heads, head_dim))
    kc = rng.standard_normal((batch, kv_heads, max_seq, head_dim))
    vc = rng.standard_normal((batch, kv_heads, max_seq, head_dim))
    pos = np.array([0, max_seq // 2, max_seq - 1], np.int32)
    scale = 1.0 / np.sqrt(head_dim)
    part_o, part_ml = ref.attn_partial(q, kc, vc, pos, heads, kv_heads, head_dim, max_seq, chunk, scale)
    splits = -(-max_seq // chunk)
    assert part_o.shape == (batch, heads, splits, head_dim) and part_ml.shape == (batch, heads, splits, 2)
    out = ref.attn_combine(part_o, part_ml, heads, head_dim, splits)

    # independent: expand the kv heads (repeat_kv) and take a masked softmax over the whole cache
    group = heads // kv_heads
    kf, vf = np.repeat(kc, group, axis=1), np.repeat(vc, group, axis=1)
    scores = scale * np.einsum("bhd,bhsd->bhs", q, kf)
    future = np.arange(max_seq)[None, None, :] > pos[:, None, None]
    scores = np.where(future, -np.inf, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expect = np.einsum("bhs,bhsd->bhd", probs, vf)

    assert _rel(out, expect) < 1e-12
    assert _rel(ref.attention(q, kc, vc, pos, heads, kv_heads, head_dim, max_seq, scale), expect) < 1e-12
    # splits past the sequence: (-inf, 0, 0)
    for b in range(batch):
        for s in range(splits):
            if s * chunk > pos[b]:
                assert np.all(part_ml[b, :, s, 0] == -np.inf) and np.all(part_ml[b, :, s, 1] == 0)
                assert np.all(part_o[b, :, s] == 0)


def test_attn_combine_skips_empty_splits_and_is_shift_invariant():
    rng = np.random.default_rng(5)
    o = rng.standard_normal((1, 1, 3, 4))
    ml = np.array([[[[0.5, 2.0], [-np.inf, 0.0], [1.5, 3.0]]]])
    out = ref.attn_combine(o, ml, 1, 4, 3)
    w0, w2 = np.exp(0.5 - 1.5), 1.0
    expect = (w0 * o[0, 0, 0] + w2 * o[0, 0, 2]) / (w0 * 2.0 + w2 * 3.0)
    assert np.allclose(out[0, 0], expect)


def test_silu_mul():
    g = np.array([-100.0, -1.0, 0.0, 2.0, 50.0])
    u = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    sig = 1.0 / (1.0 + np.exp(-g))
    assert np.allclose(ref.silu_mul(g, u, 5), g * sig * u)
    assert ref.silu_mul(g, u, 3).shape == (3,)


def test_argmax_ties_take_lowest_index():
    logits = np.array([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0], [-np.inf] * 4, [0.0, 1.0, 2.0, 7.0]])
    out = ref.argmax(logits, 4)
    assert out.dtype == np.int32 and out.tolist() == [1, 0, 0, 3]
