"""NumPy references (the test oracle) for the kernels in ``kernels/llama.cu``.

Each function takes the kernel's arguments in the kernel's order, minus the buffers the kernel only writes
(``embed``'s ``x``, ``gemv``'s ``y``, ...), and returns the outputs as new float64 arrays (int32 for
``argmax``); buffers the kernel updates in place (``gemv_add``'s ``y``, ``rope_append``'s ``q`` and caches)
are taken as inputs and returned updated, the inputs themselves untouched. Arrays may be flat or shaped:
they are reshaped with the integer arguments, as the kernel indexes them. The batch size, which the kernels
take from the grid, is taken from the arrays. The math is plain float64, written from the model's
definition (HF ``LlamaForCausalLM``), not from the CUDA code.

Weights come as float arrays (float32, float16, or bfloat16 already widened with :func:`bf16_to_f32`).
"""

from __future__ import annotations

import numpy as np

from .. import dtypes

__all__ = [
    "argmax",
    "attention",
    "attn_combine",
    "attn_partial",
    "bf16_to_f32",
    "embed",
    "f32_to_bf16",
    "gemv",
    "gemv_add",
    "rmsnorm",
    "rope_append",
    "rope_inv_freq",
    "round_to",
    "silu_mul",
]


def _f64(a) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------------------
# bfloat16 helpers (NumPy has no bfloat16: bf16 data is carried as its uint16 bit patterns)
# ---------------------------------------------------------------------------------------------------------


def f32_to_bf16(a) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest, ties to even); returns the uint16 bit patterns."""
    return dtypes.bf16_bits(np, a)


def bf16_to_f32(bits) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32, exactly."""
    return dtypes.bf16_to_f32(np, bits)


def round_to(a, wt: str) -> np.ndarray:
    """``a`` as a buffer of weight type ``wt`` (f32 | f16 | bf16) holds it, in float64: through float32, then
    rounded to nearest even, as the kernels store into the KV cache (which holds the model's weight type)."""
    x = np.asarray(a, np.float64).astype(np.float32)
    if wt == "f32":
        return x.astype(np.float64)
    if wt == "f16":
        return x.astype(np.float16).astype(np.float64)
    if wt == "bf16":
        return bf16_to_f32(f32_to_bf16(x)).astype(np.float64)
    raise ValueError(f"round_to: unknown weight type {wt!r} (f32, f16 or bf16)")


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------


def embed(table, tokens, hidden: int) -> np.ndarray:
    """x[b, :] = table[tokens[b], :]; returns x [batch, hidden]."""
    t = _f64(table).reshape(-1, hidden)
    return t[np.asarray(tokens, dtype=np.int64).reshape(-1)]


def rmsnorm(x, weight, hidden: int, eps: float) -> np.ndarray:
    """HF LlamaRMSNorm: y = weight * (x / sqrt(mean(x^2) + eps)); returns y [batch, hidden]."""
    xs = _f64(x).reshape(-1, hidden)
    var = np.mean(xs * xs, axis=-1, keepdims=True)
    return _f64(weight).reshape(hidden) * (xs / np.sqrt(var + eps))


def gemv(w, x, n: int, k: int, batch: int) -> np.ndarray:
    """y[b, j] = sum_i w[j, i] x[b, i] (nn.Linear, no bias); returns y [batch, n]."""
    return _f64(x).reshape(-1, k)[:batch] @ _f64(w).reshape(n, k).T


def gemv_add(w, x, y, n: int, k: int, batch: int) -> np.ndarray:
    """Residual variant: returns y + gemv(w, x) as [batch, n]."""
    return _f64(y).reshape(-1, n)[:batch] + gemv(w, x, n, k, batch)


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """HF default-rope inverse frequencies, computed in float32 as HF does:
    ``1.0 / (theta ** (arange(0, head_dim, 2).float() / head_dim))``."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)


def _rope_cos_sin(p: int, inv_freq) -> tuple[np.ndarray, np.ndarray]:
    # HF: freqs = inv_freq (f32) * position (f32), one f32 product; the cos/sin are then taken of that f32
    # value (here in float64, so only the kernel's cosf/sinf rounding differs).
    freq = (np.float32(p) * np.asarray(inv_freq, dtype=np.float32)).astype(np.float64)
    return np.cos(freq), np.sin(freq)


def rope_append(
    q, k, v, bias, inv_freq, k_cache, v_cache, pos, heads: int, kv_heads: int, head_dim: int, max_seq: int,
    cache: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q/K/V bias, then rotary embedding at p = pos[b] on q and k; roped k and v appended to the caches at
    slot p.

    ``bias`` is [bq; bk; bv] ((heads + 2*kv_heads) * head_dim; None for zeros), ``inv_freq`` the [head_dim/2]
    inverse frequencies (:func:`rope_inv_freq` for HF's default rope). Pairs (i, i + head_dim/2) rotate by
    angle p * inv_freq[i] (HF ``rotate_half`` layout). Returns (q [batch, heads, head_dim], k_cache, v_cache
    [cache_batch, kv_heads, max_seq, head_dim]) as updated copies. A row whose pos is outside [0, max_seq)
    leaves the caches alone (q is still rotated). ``cache`` (f32 | f16 | bf16): the caches' element type, the
    appended rows rounded to it (:func:`round_to`), as a cache in the model's dtype holds them (HF's).
    """
    pos = np.asarray(pos, dtype=np.int64).reshape(-1)
    batch = pos.shape[0]
    half = head_dim // 2
    nq, nkv = heads * head_dim, kv_heads * head_dim
    bias = np.zeros(nq + 2 * nkv) if bias is None else _f64(bias).reshape(-1)
    qo = _f64(q).reshape(-1, heads, head_dim)[:batch] + bias[:nq].reshape(heads, head_dim)
    ks = _f64(k).reshape(-1, kv_heads, head_dim)[:batch] + bias[nq:nq + nkv].reshape(kv_heads, head_dim)
    vs = _f64(v).reshape(-1, kv_heads, head_dim)[:batch] + bias[nq + nkv:].reshape(kv_heads, head_dim)
    kc = _f64(k_cache).reshape(-1, kv_heads, max_seq, head_dim).copy()
    vc = _f64(v_cache).reshape(-1, kv_heads, max_seq, head_dim).copy()

    def rot(x, c, s):
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)

    for b in range(batch):
        p = int(pos[b])
        c, s = _rope_cos_sin(p, inv_freq)
        qo[b] = rot(qo[b], c, s)
        if 0 <= p < max_seq:
            kc[b, :, p, :] = rot(ks[b], c, s)
            vc[b, :, p, :] = vs[b]
            if cache is not None:
                kc[b, :, p, :] = round_to(kc[b, :, p, :], cache)
                vc[b, :, p, :] = round_to(vc[b, :, p, :], cache)
    return qo, kc, vc


def attn_partial(
    q, k_cache, v_cache, pos, heads: int, kv_heads: int, head_dim: int, max_seq: int, chunk: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Flash-decoding partials over splits of ``chunk`` keys, splits = ceil_div(max_seq, chunk).

    For row b (keys 0..pos[b]), head h (kv head h // (heads // kv_heads)) and split s covering keys
    [s*chunk, min((s+1)*chunk, pos[b]+1)): m = max score, l = sum exp(score - m), o = sum exp(score - m) v,
    scores = scale * q.k. Empty splits give (m, l, o) = (-inf, 0, 0). Returns
    (part_o [batch, heads, splits, head_dim], part_ml [batch, heads, splits, 2]).
    """
    pos = np.asarray(pos, dtype=np.int64).reshape(-1)
    batch = pos.shape[0]
    splits = _ceil_div(max_seq, chunk)
    group = heads // kv_heads
    qs = _f64(q).reshape(-1, heads, head_dim)[:batch]
    kc = _f64(k_cache).reshape(-1, kv_heads, max_seq, head_dim)
    vc = _f64(v_cache).reshape(-1, kv_heads, max_seq, head_dim)
    part_o = np.zeros((batch, heads, splits, head_dim))
    part_ml = np.zeros((batch, heads, splits, 2))
    part_ml[..., 0] = -np.inf
    for b in range(batch):
        length = min(int(pos[b]) + 1, max_seq)
        for h in range(heads):
            kh = h // group
            for s in range(splits):
                lo, hi = s * chunk, min((s + 1) * chunk, length)
                if lo >= hi:
                    continue
                scores = scale * (kc[b, kh, lo:hi] @ qs[b, h])
                m = scores.max()
                e = np.exp(scores - m)
                part_o[b, h, s] = e @ vc[b, kh, lo:hi]
                part_ml[b, h, s] = (m, e.sum())
    return part_o, part_ml


def attn_combine(part_o, part_ml, heads: int, head_dim: int, splits: int) -> np.ndarray:
    """Merge split partials: out = sum_s exp(m_s - M) o_s / sum_s exp(m_s - M) l_s over splits with l > 0;
    returns out [batch, heads, head_dim]."""
    po = _f64(part_o).reshape(-1, heads, splits, head_dim)
    ml = _f64(part_ml).reshape(-1, heads, splits, 2)
    m, lsum = ml[..., 0], ml[..., 1]
    live = lsum > 0
    big_m = np.where(live, m, -np.inf).max(axis=-1, keepdims=True)
    wgt = np.where(live, np.exp(np.where(live, m, 0.0) - np.where(np.isfinite(big_m), big_m, 0.0)), 0.0)
    num = np.einsum("bhs,bhsd->bhd", wgt, po)
    den = np.einsum("bhs,bhs->bh", wgt, lsum)[..., None]
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def attention(
    q, k_cache, v_cache, pos, heads: int, kv_heads: int, head_dim: int, max_seq: int, scale: float
) -> np.ndarray:
    """Plain softmax decode attention (what attn_partial + attn_combine compute); out [batch, heads, d]."""
    pos = np.asarray(pos, dtype=np.int64).reshape(-1)
    batch = pos.shape[0]
    group = heads // kv_heads
    qs = _f64(q).reshape(-1, heads, head_dim)[:batch]
    kc = _f64(k_cache).reshape(-1, kv_heads, max_seq, head_dim)
    vc = _f64(v_cache).reshape(-1, kv_heads, max_seq, head_dim)
    out = np.zeros((batch, heads, head_dim))
    for b in range(batch):
        length = min(int(pos[b]) + 1, max_seq)
        for h in range(heads):
            scores = scale * (kc[b, h // group, :length] @ qs[b, h])
            p = np.exp(scores - scores.max())
            out[b, h] = (p / p.sum()) @ vc[b, h // group, :length]
    return out


def silu_mul(gate, up, n: int) -> np.ndarray:
    """out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + exp(-gate[i])) * up[i] for i < n; returns out [n]."""
    g = _f64(gate).reshape(-1)[:n]
    with np.errstate(over="ignore"):
        return g / (1.0 + np.exp(-g)) * _f64(up).reshape(-1)[:n]


def argmax(logits, vocab: int) -> np.ndarray:
    """out[b] = index of the max of logits[b, :vocab], lowest index on ties; returns int32 [batch]."""
    return np.argmax(np.asarray(logits).reshape(-1, vocab), axis=-1).astype(np.int32)
