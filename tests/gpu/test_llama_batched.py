"""kernels/llama_batched.cu on the GPU: the MMA projections against float64 NumPy at odd shapes (batch rows not
a multiple of 8 or 16, row counts not a multiple of the 128-row tile, k tails, k shorter than a cluster's
split), attn_decode_batched and attn_qkv (the GEMM path's attention) against the reference attention, and the
fused decode pool: every batch bucket decodes each row as batch 1 does (fp32 tiny config: the same tokens at
every bucket 1..256; f16 TinyLlama shape: the same tokens up to an fp16 near-tie, logits within fp16 rounding).

The MMA kernels round activations to the weight type before the products (f16: 11-bit, bf16: 8-bit
significand), so they are checked tightly against a float64 reference that rounds x the same way, and loosely
against the exact one. Outputs are poisoned with NaN and guarded past their end; KV caches start random.

The KV caches hold the weight type (f32, f16, or bf16 bits): the tests upload them in wt, their references read the
values the caches hold, and an appended row is checked against the reference rounded to wt (ref.rope_append's
``cache``), the attention reference using those rounded keys and values.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import ROUNDOFF, in_weight_type, weight_type_values

from dagbuild.kernels import load_module
from dagbuild.llama import reference as ref
from dagbuild.llama import weights as W
from dagbuild.sources import read_kernel_source

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "kernels" / "llama_batched.cu"
FUSED_SPEC = ROOT / "specs" / "llama_decode_fused.yaml"
TINY = yaml.safe_load((ROOT / "specs" / "configs" / "llama_tiny.yaml").read_text())
TINYLLAMA = yaml.safe_load((ROOT / "specs" / "configs" / "tinyllama.yaml").read_text())
CLUSTER, SHARED = 8, 185600  # the spec's mma_cluster and mma_shared
MV_SHARED, MV_SMALL = 232448, 115712  # the spec's mv_shared_max and mv_shared
MVC_CLUSTER = 4  # the spec's mvc_cluster (MVC_CLUSTER in the kernel)
ENGINES = ("mma", "mv", "mv512", "mvc")
FP16_NEAR_TIE = 0.05  # as tests/gpu/test_llama_hf.py
GUARD = 67
EPS = 1e-5
i32, f32 = np.int32, np.float32


@pytest.fixture(scope="module")
def cp():
    return pytest.importorskip("cupy")


@pytest.fixture(scope="module")
def mod(cp):
    return load_module(read_kernel_source(SRC), "llama_batched", (f"-DMMA_CLUSTER={CLUSTER}",))


def rng_for(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def weights(rng, shape, wt, scale=1.0, offset=0.0):
    return in_weight_type(offset + scale * rng.standard_normal(shape), wt)


def activations(rng, batch, k):
    return (rng.standard_normal((batch, k)) * rng.uniform(0.1, 10.0, (batch, 1))).astype(np.float32)


def mma_inputs(x, norm32, wt):
    """(h_exact, h_as_the_kernel_sees_it): the normalised (or plain) activations in float64."""
    x64 = x.astype(np.float64)
    if norm32 is None:
        return x64, ref.round_to(x, wt)
    g = norm32.astype(np.float64) if wt == "f32" else (norm32.astype(np.float64) if wt == "f16" else
                                                       ref.bf16_to_f32(norm32).astype(np.float64))
    r = 1.0 / np.sqrt(np.mean(x64 * x64, axis=1, keepdims=True) + EPS)
    gx = (x.astype(np.float32) * g.astype(np.float32)).astype(np.float32)
    return r * x64 * g, r * ref.round_to(gx, wt)


def out_buffer(cp, count, fill=np.nan, head=None):
    host = np.full(count + GUARD, fill, dtype=np.float32)
    if head is not None:
        host[:count] = np.asarray(head, np.float32).reshape(-1)
    return cp.asarray(host)


def fetch(buf, count):
    host = buf.get()
    assert np.all(np.isnan(host[count:])), "kernel wrote past the end of its output"
    out = host[:count].astype(np.float64)
    assert np.all(np.isfinite(out)), "output has NaN/inf (an element left unwritten?)"
    return out


def same_bits(a, b) -> bool:
    """The same elements bit for bit (NaN included): what a kernel must leave alone."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


# An appended K/V element is the kernel's f32 value rounded once to wt: where that value lies within the kernel's
# f32 error of a rounding boundary it may round to the neighbour of the reference's rounding (one wt ulp, 2 u). So
# the appended rows are compared with the rounded reference within the f32 tolerance plus u (ROUNDOFF[wt], the
# unit roundoff of wt), which such neighbours, a small fraction of the elements, stay well inside.


def rel_err(out, expect) -> float:
    out, expect = np.asarray(out, np.float64).reshape(-1), np.asarray(expect, np.float64).reshape(-1)
    return float(np.linalg.norm(out - expect) / np.linalg.norm(expect))


def launch(cp, mod, name, pairs, args, shared=None):
    """The spec's launch shapes. MMA engine (_mma_): clusters of CLUSTER blocks, as many as the 128-row tiles
    (up to 16). MV engine (_mv_): one block per 16-row tile, at most two per SM (shared: MV_SHARED, or what
    the test passes to force smaller passes and rings); "_mv512_": the same kernel in 512-thread blocks. MVC
    engine (_mvc_): clusters of MVC_CLUSTER blocks splitting K, one cluster per tile up to the SMs."""
    threads = 512 if "_mv512_" in name else 256
    if threads == 512 and name.endswith("_f32"):
        pytest.skip("f32 weights run the GEMV engine (at most 256 threads a block), not the MV engine")
    fn = mod.get_function(name.replace("_mv512_", "_mv_"))
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    if "_mvc_" in name:  # whole clusters, as many as the 16-row tiles (clusters stride over more)
        grid, smem = MVC_CLUSTER * min(-(-pairs // 8), sms // MVC_CLUSTER), shared or MV_SHARED
    elif "_mv" in name:
        grid, smem = min(-(-pairs // 8), 2 * sms), shared or MV_SHARED
    else:
        grid, smem = CLUSTER * min(-(-pairs // 64), 16), SHARED
    fn.max_dynamic_shared_size_bytes = smem
    fn((grid,), (threads,), args, shared_mem=smem)


# tight: against the reference that rounds x as the kernel does; loose: against the exact reference
TIGHT = {"f32": 2e-5, "f16": 2e-5, "bf16": 2e-5}
LOOSE = {"f32": 2e-5, "f16": 2e-3, "bf16": 1.5e-2}
WTYPES = ("f16", "bf16", "f32")
ROWS_CASES = [(2, 2048, 2048), (3, 130, 5632), (8, 2048, 2048),
              (13, 37, 264), (37, 2047, 520), (64, 300, 8), (72, 129, 1032), (130, 1000, 136),
              (256, 64, 2048), (9, 32000, 256)]


@pytest.mark.parametrize("wt", WTYPES)
@pytest.mark.parametrize("variant", ["res", "norm"])
@pytest.mark.parametrize("batch,n,k", ROWS_CASES)
@pytest.mark.parametrize("engine", ENGINES)
def test_gemv_res_and_norm_mma(cp, mod, engine, wt, variant, batch, n, k):
    rng = rng_for("rows", wt, variant, batch, n, k)
    w, w64 = weights(rng, (n, k), wt)
    x = activations(rng, batch, k)
    if variant == "res":
        y0 = (rng.standard_normal((batch, n)) * 10).astype(np.float32)
        y = out_buffer(cp, batch * n, head=y0)
        launch(cp, mod, f"gemv_res_{engine}_{wt}", (n + 1) // 2,
               (cp.asarray(w), cp.asarray(x), y, i32(n), i32(k), i32(batch)))
        exact, seen = mma_inputs(x, None, wt)
        got = fetch(y, batch * n).reshape(batch, n) - y0  # the residual is added in f32: compare the products
        expect_t, expect_l = seen @ w64.T, exact @ w64.T
        tight = np.linalg.norm(got - expect_t) / np.linalg.norm(expect_t)
        assert tight < 1e-4, tight  # the residual's f32 rounding dominates here
    else:
        norm, _ = weights(rng, (k,), wt, 0.1, 1.0)
        y = out_buffer(cp, batch * n)
        launch(cp, mod, f"gemv_norm_{engine}_{wt}", (n + 1) // 2,
               (cp.asarray(w), cp.asarray(norm), cp.asarray(x), y, i32(n), i32(k), i32(batch), f32(EPS)))
        exact, seen = mma_inputs(x, norm, wt)
        got = fetch(y, batch * n).reshape(batch, n)
        expect_t, expect_l = seen @ w64.T, exact @ w64.T
        assert rel_err(got, expect_t) < TIGHT[wt]
    assert rel_err(got, expect_l) < LOOSE[wt]


@pytest.mark.parametrize("wt", ("f16", "bf16"))
@pytest.mark.parametrize("batch,n,k", [(64, 520, 2048), (29, 77, 1032), (40, 2050, 8)])
def test_mv_passes_with_little_shared_memory(cp, mod, wt, batch, n, k):
    """The MV and MVC engines with two blocks' worth of shared memory (mv_shared): batches over what x fits in
    run in passes, and the ring shrinks to what is left; the sums stay those of the full launch, bit for bit."""
    rng = rng_for("mv passes", wt, batch, n, k)
    w, w64 = weights(rng, (n, k), wt)
    norm, _ = weights(rng, (k,), wt, 0.1, 1.0)
    x = activations(rng, batch, k)
    outs = []
    for engine, shared in (("mv", MV_SMALL), ("mv", MV_SHARED), ("mv512", MV_SHARED), ("mvc", MV_SMALL),
                           ("mvc", MV_SHARED)):
        y = out_buffer(cp, batch * n)
        launch(cp, mod, f"gemv_norm_{engine}_{wt}", (n + 1) // 2,
               (cp.asarray(w), cp.asarray(norm), cp.asarray(x), y, i32(n), i32(k), i32(batch), f32(EPS)), shared)
        outs.append(fetch(y, batch * n))
    assert np.array_equal(outs[0], outs[1])  # 512 threads split K 16 ways: other sums, checked below
    assert np.array_equal(outs[3], outs[4])  # MVC: K split over the cluster, passes as MV
    assert rel_err(outs[3], (mma_inputs(x, norm, wt)[1] @ w64.T).reshape(-1)) < TIGHT[wt]
    assert rel_err(outs[2], (mma_inputs(x, norm, wt)[1] @ w64.T).reshape(-1)) < TIGHT[wt]
    exact, seen = mma_inputs(x, norm, wt)
    assert rel_err(outs[0], (seen @ w64.T).reshape(-1)) < TIGHT[wt]


GATE_UP_CASES = [(8, 5632, 2048), (11, 37, 264), (33, 100, 8), (64, 688, 256), (100, 9, 1032)]


@pytest.mark.parametrize("wt", WTYPES)
@pytest.mark.parametrize("batch,ffn,hidden", GATE_UP_CASES)
@pytest.mark.parametrize("engine", ENGINES)
def test_gate_up_silu_mma(cp, mod, engine, wt, batch, ffn, hidden):
    rng = rng_for("gate_up", wt, batch, ffn, hidden)
    gate, gate64 = weights(rng, (ffn, hidden), wt)
    up, up64 = weights(rng, (ffn, hidden), wt)
    norm, _ = weights(rng, (hidden,), wt, 0.1, 1.0)
    x = activations(rng, batch, hidden)
    act = out_buffer(cp, batch * ffn)
    launch(cp, mod, f"gate_up_silu_{engine}_{wt}", ffn,
           (cp.asarray(W.pack_gate_up(gate, up)), cp.asarray(norm), cp.asarray(x), act, i32(ffn), i32(hidden),
            i32(batch), f32(EPS)))
    exact, seen = mma_inputs(x, norm, wt)
    got = fetch(act, batch * ffn)
    for h, tol in ((seen, TIGHT[wt] * 5), (exact, LOOSE[wt] * 2)):  # silu(g) * u: relative errors add up
        expect = ref.silu_mul(h @ gate64.T, h @ up64.T, batch * ffn)
        assert rel_err(got, expect) < tol


QKV_CASES = [(8, 32, 4, 64, 2048), (9, 4, 2, 64, 256), (17, 3, 1, 32, 264), (64, 8, 8, 128, 1032),
             (70, 14, 2, 64, 136)]


@pytest.mark.parametrize("wt", WTYPES)
@pytest.mark.parametrize("batch,heads,kv_heads,head_dim,hidden", QKV_CASES)
@pytest.mark.parametrize("engine", ENGINES)
def test_qkv_rope_mma(cp, mod, engine, wt, batch, heads, kv_heads, head_dim, hidden):
    rng = rng_for("qkv", wt, batch, heads, kv_heads, head_dim, hidden)
    max_seq = 40
    wq, wq64 = weights(rng, (heads * head_dim, hidden), wt)
    wk, wk64 = weights(rng, (kv_heads * head_dim, hidden), wt)
    wv, wv64 = weights(rng, (kv_heads * head_dim, hidden), wt)
    norm, _ = weights(rng, (hidden,), wt, 0.1, 1.0)
    x = activations(rng, batch, hidden)
    cache_shape = (batch + 1, kv_heads, max_seq, head_dim)
    kc, kc64 = in_weight_type(rng.standard_normal(cache_shape), wt)  # the caches hold wt
    vc, vc64 = in_weight_type(rng.standard_normal(cache_shape), wt)
    pos = rng.integers(0, max_seq, batch).astype(np.int32)
    pos[0], pos[1], pos[2] = max_seq - 1, -1, 0
    rows = (heads + 2 * kv_heads) * head_dim
    bias = (0.5 * rng.standard_normal(rows)).astype(np.float32)
    inv_freq = ref.rope_inv_freq(head_dim, 10000.0)
    q = out_buffer(cp, batch * heads * head_dim)
    kc_d, vc_d = cp.asarray(kc), cp.asarray(vc)
    launch(cp, mod, f"qkv_rope_{engine}_{wt}", rows // 2,
           (cp.asarray(W.pack_qkv(wq, wk, wv)), cp.asarray(norm), cp.asarray(x), q, kc_d, vc_d, cp.asarray(pos),
            cp.asarray(bias), cp.asarray(inv_freq), i32(hidden), i32(heads), i32(kv_heads), i32(head_dim),
            i32(max_seq), i32(batch), f32(EPS)))
    written = np.zeros(cache_shape, bool)
    for b, p in enumerate(pos):
        if 0 <= p < max_seq:
            written[b, :, p] = True
    got_q, kc_got, vc_got = fetch(q, batch * heads * head_dim), kc_d.get(), vc_d.get()
    assert same_bits(kc_got[~written], kc[~written]), "k_cache changed outside the appended slots"
    assert same_bits(vc_got[~written], vc[~written]), "v_cache changed outside the appended slots"
    kc_got, vc_got = weight_type_values(kc_got, wt), weight_type_values(vc_got, wt)
    for h, tol in zip(mma_inputs(x, norm, wt)[::-1], (TIGHT[wt] * 5, LOOSE[wt]), strict=True):
        q_ref, kc_ref, vc_ref = ref.rope_append(h @ wq64.T, h @ wk64.T, h @ wv64.T, bias, inv_freq, kc64, vc64, pos,
                                                heads, kv_heads, head_dim, max_seq, cache=wt)
        assert rel_err(got_q, q_ref) < tol
        # the appended rows, rounded once to wt (ROUNDOFF: a rounding boundary's neighbours)
        assert rel_err(kc_got[written], kc_ref[written]) < tol + ROUNDOFF[wt]
        assert rel_err(vc_got[written], vc_ref[written]) < tol + ROUNDOFF[wt]


ATTN_CASES = [  # batch, heads, kv_heads, head_dim, max_seq, chunk, splits
    (8, 32, 4, 64, 300, 32, 8),
    (5, 8, 2, 128, 600, 64, 3),
    (3, 14, 2, 64, 129, 16, 9),
    (64, 4, 4, 32, 50, 32, 1),
    (2, 16, 1, 96, 2100, 32, 40),  # 16 heads of 96 per kv head: the combine reads 3 splits per chunk
    (3, 8, 2, 64, 4096, 32, 64),  # 64 splits: 3 chunks
    (4, 6, 2, 64, 200, 16, 4),  # 3 query heads a KV head: two warps a head, warps 6 and 7 idle
]


@pytest.mark.parametrize("wt", WTYPES)
@pytest.mark.parametrize("batch,heads,kv_heads,head_dim,max_seq,chunk,splits", ATTN_CASES)
def test_attn_decode_batched(cp, mod, batch, heads, kv_heads, head_dim, max_seq, chunk, splits, wt):
    """attn_decode_batched_<wt>: caches of wt (read back as the floats they hold) against the reference attention
    over those values."""
    scale = head_dim ** -0.5
    counters = cp.zeros(batch * heads + GUARD, np.int32)
    for launch_no in range(2):  # the second launch checks that the first left its counters at zero
        rng = rng_for("attn", batch, heads, kv_heads, head_dim, max_seq, chunk, launch_no)
        q = rng.standard_normal((batch, heads, head_dim)).astype(np.float32)
        kc = rng.standard_normal((batch, kv_heads, max_seq, head_dim)).astype(np.float32)
        vc = rng.standard_normal((batch, kv_heads, max_seq, head_dim)).astype(np.float32)
        pos = rng.integers(0, max_seq, batch).astype(np.int32)
        pos[0] = max_seq - 1 if launch_no == 0 else min(max_seq - 1, chunk)
        if batch > 1:
            pos[1] = -1
        if batch > 2:
            pos[2] = 0
        if launch_no == 1:  # keys past a row's position are never read into the result (NaN there stays out)
            for r in range(batch):
                kc[r, :, max(pos[r], 0) + 1:] = np.nan
                vc[r, :, max(pos[r], 0) + 1:] = np.nan
        (kc, kc64), (vc, vc64) = in_weight_type(kc, wt), in_weight_type(vc, wt)  # the caches hold wt
        part_o = cp.full(batch * heads * splits * head_dim, np.nan, np.float32)
        part_ml = cp.full(batch * heads * splits * 2, np.nan, np.float32)
        out = out_buffer(cp, batch * heads * head_dim)
        mod.get_function(f"attn_decode_batched_{wt}")(
            (batch * kv_heads, splits), (256,),
            (cp.asarray(q), cp.asarray(kc), cp.asarray(vc), cp.asarray(pos), part_o, part_ml, counters, out,
             i32(heads), i32(kv_heads), i32(head_dim), i32(max_seq), i32(chunk), f32(scale)))
        got = fetch(out, batch * heads * head_dim).reshape(batch, heads, head_dim)
        live = pos >= 0
        expect = ref.attention(q[live], kc64[live], vc64[live], pos[live], heads, kv_heads, head_dim, max_seq,
                               scale)
        assert rel_err(got[live], expect) < 1e-5
        assert np.all(got[~live] == 0), "a padding row's attention output must be zeros"
        assert np.all(counters.get() == 0), "attn_decode_batched must leave its counters at zero"


QKV_ATTN_CASES = [  # batch, heads, kv_heads, head_dim, max_seq, chunk, splits, wt
    (8, 32, 4, 64, 300, 32, 8, "f16"),  # TinyLlama's heads
    (5, 36, 2, 128, 600, 64, 3, "bf16"),  # 18 query heads a kv head: two blocks a kv head (16 + 2 heads)
    (3, 14, 2, 64, 129, 16, 9, "f32"),
    (6, 8, 2, 32, 40, 8, 5, "f16"),  # a position past the cache, a padding row, position 0, short splits
    (5, 8, 2, 64, 50, 1, 4, "f32"),  # position 4: 4 splits of 2 keys, the last one empty (key 4 is split 2's)
    (3, 4, 2, 64, 100, 16, 3, "bf16"),  # 2 query heads a KV head: two warps a head, each half of a 64-key tile
]
QKV_ATTN_CASES += [  # the tensor-core form's passes of 128 keys: several passes a split, one split of 300 keys
    (4, 32, 4, 64, 700, 128, 2, "f16"),
    (3, 16, 2, 128, 400, 128, 1, "bf16"),
    (2, 12, 2, 80, 200, 32, 3, "f16"),  # head_dim 80: attn_qkv's arithmetic in the tensor-core entry
]
QKV_ATTN_TOL = {"f32": 1e-5, "f16": 1e-3, "bf16": 8e-3}  # the output is rounded once to wt
# attn_qkv_mma also rounds q, K, V and the softmax numerators to wt: tight against a reference that rounds q, K
# and V so (what is left is the numerators' rounding), loose against the exact one
MMA_ATTN_TIGHT = {"f16": 1.5e-3, "bf16": 1.2e-2}
MMA_ATTN_LOOSE = {"f16": 3e-3, "bf16": 2.5e-2}
MMA_ATTN_DIMS = (32, 64, 128)  # head dims with a tensor-core form


def mma_attn_shared(head_dim: int) -> int:
    """The least dynamic shared memory attn_qkv_mma takes (a smaller launch traps): K and V passes of 128 keys
    and q in wt, the new key and value in f32, and at least attn_qkv's arithmetic's (the fused spec may give
    more)."""
    return 4 * max(136 * (head_dim + 8) + 2 * head_dim, 11264)


@pytest.mark.parametrize("kernel", ["attn_qkv", "attn_qkv_mma"])
@pytest.mark.parametrize("batch,heads,kv_heads,head_dim,max_seq,chunk,splits,wt", QKV_ATTN_CASES)
def test_attn_qkv(cp, mod, batch, heads, kv_heads, head_dim, max_seq, chunk, splits, wt, kernel):
    """attn_qkv_<wt>, the GEMM path's attention, fed by the QKV GEMM's f32 output: q and the new k biased and
    roped, the new k and v appended at each row's position (nothing else in the caches changes; a position past
    the cache appends nothing and attends to every slot), attention over keys 0..pos with the new key read from
    the block itself (the cache slot at pos is NaN before the launch), the output rounded to wt. attn_qkv_mma_<wt>
    (the same on tensor cores where wt is f16/bf16 and head_dim 32, 64 or 128; else attn_qkv's arithmetic) the
    same, within the rounding of its operands. The caches hold wt: the new key and value are stored rounded to wt
    once, and this step's attention uses those rounded values (what the next step reads back from the cache)."""
    mma = kernel == "attn_qkv_mma" and wt != "f32" and head_dim in MMA_ATTN_DIMS
    scale, rows = head_dim ** -0.5, (heads + 2 * kv_heads) * head_dim
    subs = -(-(heads // kv_heads) // 16)
    nq, nkv, n = heads * head_dim, kv_heads * head_dim, batch * heads * head_dim
    inv_freq = ref.rope_inv_freq(head_dim, 10000.0)
    counters = cp.zeros(batch * heads + GUARD, np.int32)
    for launch_no in range(2):  # the second launch checks that the first left its counters at zero
        rng = rng_for("attn_qkv", batch, heads, kv_heads, head_dim, max_seq, chunk, launch_no)
        qkv = rng.standard_normal((batch, rows)).astype(f32)
        bias = (0.5 * rng.standard_normal(rows)).astype(f32)
        kc = rng.standard_normal((batch, kv_heads, max_seq, head_dim)).astype(f32)
        vc = rng.standard_normal((batch, kv_heads, max_seq, head_dim)).astype(f32)
        pos = rng.integers(0, max_seq, batch).astype(i32)
        pos[0] = max_seq - 1 if launch_no == 0 else min(max_seq - 1, chunk)
        if batch > 1:
            pos[1] = -1
        if batch > 2:
            pos[2] = 0
        if batch > 3:
            pos[3] = max_seq
        if batch > 4:
            pos[4] = 4
        for r in range(batch):  # the slot being appended and every slot past it are never read from the cache
            kc[r, :, max(pos[r], 0):] = np.nan
            vc[r, :, max(pos[r], 0):] = np.nan
        (kc, kc64), (vc, vc64) = in_weight_type(kc, wt), in_weight_type(vc, wt)  # the caches hold wt
        if wt == "f32":
            out = out_buffer(cp, n)
        else:
            out = cp.full(n + GUARD, 0xFFFF, np.uint16)  # NaN in f16 and in bf16
        kc_d, vc_d = cp.asarray(kc), cp.asarray(vc)
        part_o = cp.full(batch * heads * splits * head_dim, np.nan, np.float32)
        part_ml = cp.full(batch * heads * splits * 2, np.nan, np.float32)
        fn = mod.get_function(f"{kernel}_{wt}")
        smem = 0
        if kernel == "attn_qkv_mma":
            smem = fn.max_dynamic_shared_size_bytes = mma_attn_shared(head_dim)
        fn((batch * kv_heads * subs, splits), (256,),
           (cp.asarray(qkv), kc_d, vc_d, cp.asarray(pos), cp.asarray(bias), cp.asarray(inv_freq), part_o, part_ml,
            counters, out, i32(heads), i32(kv_heads), i32(head_dim), i32(max_seq), i32(chunk), f32(scale)),
           shared_mem=smem)
        if wt == "f32":
            got = fetch(out, n)
        else:
            host = out.get()
            assert np.all(host[n:] == 0xFFFF), "kernel wrote past the end of its output"
            got = (host[:n].view(np.float16) if wt == "f16" else ref.bf16_to_f32(host[:n])).astype(np.float64)
            assert np.all(np.isfinite(got)), "output has NaN/inf (an element left unwritten?)"
        got = got.reshape(batch, heads, head_dim)
        # the appended rows rounded to wt (cache=wt), as the kernel stores them and attends to them this step
        q_ref, kc_ref, vc_ref = ref.rope_append(qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:], bias, inv_freq,
                                                kc64, vc64, pos, heads, kv_heads, head_dim, max_seq, cache=wt)
        written = np.zeros(kc.shape, bool)
        for b, p in enumerate(pos):
            if 0 <= p < max_seq:
                written[b, :, p] = True
        kc_got, vc_got = kc_d.get(), vc_d.get()
        assert same_bits(kc_got[~written], kc[~written]), "k_cache changed outside the new slots"
        assert same_bits(vc_got[~written], vc[~written]), "v_cache changed outside the new slots"
        kc_got, vc_got = weight_type_values(kc_got, wt), weight_type_values(vc_got, wt)
        # the new key is roped in f32 (ROUNDOFF: a rounding boundary's neighbours); the value is qkv + bias in
        # f32, rounded once to wt exactly as the reference rounds it
        assert rel_err(kc_got[written], kc_ref[written]) < 1e-5 + ROUNDOFF[wt]
        assert rel_err(vc_got[written], vc_ref[written]) < 1e-6
        live = pos >= 0
        expect = ref.attention(q_ref[live], kc_ref[live], vc_ref[live], pos[live], heads, kv_heads, head_dim, max_seq,
                               scale)
        if mma:  # K and V are wt already (the rounded cache values); q is rounded to wt as well
            rounded = ref.attention(in_weight_type(q_ref[live], wt)[1], kc_ref[live], vc_ref[live], pos[live], heads,
                                    kv_heads, head_dim, max_seq, scale)
            assert rel_err(got[live], rounded) < MMA_ATTN_TIGHT[wt]
            assert rel_err(got[live], expect) < MMA_ATTN_LOOSE[wt]
        else:
            assert rel_err(got[live], expect) < QKV_ATTN_TOL[wt]
        assert np.all(got[~live] == 0), "a padding row's attention output must be zeros"
        assert np.all(counters.get() == 0), f"{kernel} must leave its counters at zero"


# ----------------------------------------------------------------------------------------------------------
# The pool: every bucket decodes each row as batch 1 does
# ----------------------------------------------------------------------------------------------------------

BUCKETS = [1, 2, 4, *range(8, 257, 8)]


def _run_rows(exe, prompts, steps):
    """Greedy tokens of rows 0..len(prompts)-1 of ``exe`` (its KV row r is sequence r), and each step's logits."""
    from dagbuild.llama.decode import LlamaDecoder

    dec = LlamaDecoder(exe)
    rows = len(prompts)
    current = [p[0] for p in prompts]
    toks: list[list[int]] = [[] for _ in range(rows)]
    logits = []
    for t in range(steps):
        nxt = dec.step(current, [t] * rows)
        logits.append(exe.buffers["logits"][:rows].get().astype(np.float64))
        for r in range(rows):
            if t + 1 < len(prompts[r]):
                current[r] = prompts[r][t + 1]
            else:
                toks[r].append(int(nxt[r]))
                current[r] = int(nxt[r])
    return toks, logits


@pytest.mark.parametrize("tc_batch, tc_norm, gemm_pad", [(0, 2, 1), (64, 0, 1), (64, 2, 1), (256, 2, 1), (0, 2, 64)],
                         ids=["cublas", "gemm-cu", "gemm-cu-riding", "gemm-cu-every-bucket", "cublas-rows-padded"])
def test_fp32_every_bucket_matches_batch_one(cp, tc_batch, tc_norm, gemm_pad):
    """Buckets 2..256 (the GEMM path from gemm_batch: cuBLAS, or kernels/gemm.cu up to tc_batch rows, with norm
    nodes (tc_norm 0) or the norms on the GEMMs around them (2), and attn_qkv_mma's f32 form; cuBLAS over rows
    rounded up to gemm_pad) against batch 1: the same tokens, logits within f32 rounding."""
    from dagbuild.llama.weights import random_weights
    from dagbuild.load import load_spec
    from dagbuild.pool import GraphPool

    dims = {**TINY, "wt": "f32", "max_seq": 16, "cache_batch": 256, "tc_batch": tc_batch, "attn_mma": 1,
            "tc_norm": tc_norm, "gemm_pad": gemm_pad}
    rng = np.random.default_rng(11)
    prompts = [list(map(int, rng.integers(0, dims["vocab"], 3))) for _ in range(256)]
    steps = 7
    with GraphPool(load_spec(FUSED_SPEC), {"batch": BUCKETS}, overrides=dims) as pool:
        random_weights(pool.get(batch=256), 5)
        one = pool.get(batch=1)
        assert one.plan.nodes[3].op.kernel == "qkv_1"  # the GEMV path's batch-1 form, not a GEMM
        reference = [_run_rows(one, [p], steps) for p in prompts]  # batch 1, one sequence at a time
        for bucket in BUCKETS[1:]:
            exe = pool.get(batch=bucket)
            toks, logits = _run_rows(exe, prompts[:bucket], steps)
            for r in range(bucket):
                assert toks[r] == reference[r][0][0], (bucket, r)
                for t in range(steps):
                    assert rel_err(logits[t][r], reference[r][1][t][0]) < 1e-5, (bucket, r, t)


def test_derived_pool_builds_cublas_buckets_fresh(cp):
    """method="derive" over GEMM-path buckets: cuBLAS records other kernels for other row counts (a child graph of
    another topology, which an executable's child-graph update refuses), so buckets with child graphs are built
    fresh and every bucket builds and runs; kernel-only buckets still derive."""
    from dagbuild.llama.weights import random_weights
    from dagbuild.load import load_spec
    from dagbuild.pool import GraphPool

    dims = {k: v for k, v in TINYLLAMA.items() if k != "wt"} | {"wt": "f16", "layers": 2, "max_seq": 32,
                                                                "cache_batch": 256, "tc_batch": 16}
    buckets = [1, 2, 4, 8, 16, 24, 40, 48, 64, 128, 256]
    with GraphPool(load_spec(FUSED_SPEC), {"batch": buckets}, overrides=dims, method="derive",
                   concurrent=False) as pool:
        random_weights(pool.get(batch=256), 3)
        for bucket in buckets:
            exe = pool.get(batch=bucket)
            child = any(n.op.kind == "child" for n in exe.plan.nodes)
            assert child == (bucket > 16), bucket  # cuBLAS above tc_batch, from gemm_batch rows
            if child:
                assert exe._own_graph, bucket
            exe.buffers["tokens_host"][:] = 1
            exe.buffers["pos_host"][:] = 0  # attention over the new key only: no cache contents read
            exe.launch(sync=True)
            logits = cp.asnumpy(exe.buffers["logits"]).reshape(bucket, -1)
            assert np.isfinite(logits).all(), bucket
            assert np.allclose(logits, logits[:1], rtol=2e-2, atol=2e-2), bucket  # every row the same input
        assert any(not pool.get(batch=b)._own_graph for b in buckets)  # the kernel-only buckets derive where they can


@pytest.mark.parametrize("mvc_batch, gemm_batch, tc_batch, attn_mma, tc_norm",
                         [(0, 16, 0, 1, 2), (0, 16, 64, 1, 2), (0, 16, 64, 0, 0), (0, 0, 0, 1, 2), (16, 0, 0, 1, 2)],
                         ids=["gemm", "gemm-cu", "gemm-cu-norm-nodes-attn-simt", "mv-mma", "mvc"])
def test_f16_tinyllama_buckets_match_batch_one_up_to_near_ties(cp, mvc_batch, gemm_batch, tc_batch, attn_mma,
                                                               tc_norm):
    """TinyLlama shape, f16 weights: rows of buckets 8, 24 and 64 (the MV engine at 8; from 16 rows the GEMM path
    (cuBLAS, or kernels/gemm.cu up to tc_batch rows), or without it the MV/MMA projections or the MVC engine;
    batched attention; on the GEMM path the attention on tensor cores and kernels/gemm.cu's norms on the GEMMs
    around them (tc_norm 2), or with attn_mma 0 attn_qkv and rmsnorm_cast nodes) against batch 1 (GEMVs):
    the same greedy tokens until an fp16 near-tie of batch 1's own logits (top two closer than FP16_NEAR_TIE),
    logits within fp16 rounding of the activations."""
    from dagbuild.llama.weights import random_weights
    from dagbuild.load import load_spec
    from dagbuild.pool import GraphPool

    dims = {k: v for k, v in TINYLLAMA.items() if k != "wt"} | {"wt": "f16", "max_seq": 32, "cache_batch": 64,
                                                                "mvc_batch": mvc_batch, "gemm_batch": gemm_batch,
                                                                "tc_batch": tc_batch, "attn_mma": attn_mma,
                                                                "tc_norm": tc_norm}
    rng = np.random.default_rng(12)
    prompts = [list(map(int, rng.integers(0, dims["vocab"], 4))) for _ in range(64)]
    steps = 12
    with GraphPool(load_spec(FUSED_SPEC), {"batch": [1, 8, 24, 64]}, overrides=dims) as pool:
        random_weights(pool.get(batch=64), 3)
        reference = [_run_rows(pool.get(batch=1), [p], steps) for p in prompts]
        ties = 0
        for bucket in (8, 24, 64):
            toks, logits = _run_rows(pool.get(batch=bucket), prompts[:bucket], steps)
            for r in range(bucket):
                ref_toks, ref_logits = reference[r]
                for t in range(steps):
                    assert rel_err(logits[t][r], ref_logits[t][0]) < 2e-2, (bucket, r, t)
                    j = t - (len(prompts[r]) - 1)
                    if j < 0:
                        continue
                    if toks[r][j] != ref_toks[0][j]:
                        row = ref_logits[t][0]
                        gap = row[ref_toks[0][j]] - row[toks[r][j]]
                        assert gap <= FP16_NEAR_TIE, f"bucket {bucket} row {r} step {t}: not a near-tie ({gap})"
                        ties += 1
                        break  # the sequences part here
                    # the same token: the steps after it compare like-for-like
        print(f"f16 TinyLlama buckets 8/24/64 (mvc_batch {mvc_batch}): {ties} rows parted at near-ties")
