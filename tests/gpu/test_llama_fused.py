"""kernels/llama_fused.cu on the GPU: each kernel against the NumPy float64 references of the unfused kernels
it replaces (dagbuild.llama.reference composed), then the whole fused decode graph (with programmatic edges)
against the unfused graph and a float64 NumPy model.

Fresh random data per case (seeded from its parameters), outputs poisoned with NaN (int outputs with -1)
before each launch so an unwritten element fails, a NaN guard after each output so a write past its end
fails; KV caches start random so a write outside the appended slot (or from a padding row) fails.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import in_weight_type, weight_type_values

from dagbuild.kernels import load_module
from dagbuild.llama import reference as ref
from dagbuild.llama import weights as W
from dagbuild.sources import read_kernel_source

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
KERNEL_SRC = ROOT / "kernels" / "llama_fused.cu"
FUSED_SPEC = ROOT / "specs" / "llama_decode_fused.yaml"
TINY = yaml.safe_load((ROOT / "specs" / "configs" / "llama_tiny.yaml").read_text())
WTYPES = ("f32", "f16", "bf16")
TOL = {"f32": 2e-5, "f16": 1e-4, "bf16": 1e-4}  # ||out - ref|| / ||ref||, weights exact in the reference
GUARD = 67
EPS = 1e-5
i32, f32 = np.int32, np.float32


@pytest.fixture(scope="module")
def cp():
    return pytest.importorskip("cupy")


@pytest.fixture(scope="module")
def modules(cp):
    from dagbuild.executable import ModuleCache

    return ModuleCache()  # compiled modules shared by the graph tests


@pytest.fixture(scope="module")
def mod(cp):
    return load_module(read_kernel_source(KERNEL_SRC), "llama_fused")


@pytest.fixture(scope="module")
def mod_ring3(cp):
    """The build the spec gives gemv_res (O and down): 3 ring slots a warp."""
    return load_module(read_kernel_source(KERNEL_SRC), "llama_fused", ("-DFW_STAGES=3",))


def rng_for(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def weights(rng, shape, wt, scale=1.0, offset=0.0):
    """Random weights of type wt: (the array to upload, its exact value in float64)."""
    return in_weight_type(offset + scale * rng.standard_normal(shape), wt)


def activations(rng, batch, k):
    """x rows of different magnitudes (the folded RMSNorm must not care)."""
    return (rng.standard_normal((batch, k)) * rng.uniform(0.1, 10.0, (batch, 1))).astype(np.float32)


def out_buffer(cp, count, fill=np.nan, dtype=np.float32, head=None):
    host = np.full(count + GUARD, fill, dtype=dtype)
    if head is not None:
        host[:count] = np.asarray(head, dtype=dtype).reshape(-1)
    return cp.asarray(host)


def fetch(buf, count):
    host = buf.get()
    assert np.all(np.isnan(host[count:])), "kernel wrote past the end of its output"
    return host[:count].astype(np.float64)


def rel_err(out, expect) -> float:
    out, expect = np.asarray(out, np.float64).reshape(-1), np.asarray(expect, np.float64).reshape(-1)
    assert np.all(np.isfinite(out)), "output has NaN/inf (an element left unwritten?)"
    return float(np.linalg.norm(out - expect) / np.linalg.norm(expect))


def positions(rng, batch, max_seq):
    """Row 0 at the last slot, row 1 padding (-1), row 2 at slot 0, the rest random."""
    pos = rng.integers(0, max_seq, batch).astype(np.int32)
    pos[0] = max_seq - 1
    if batch > 1:
        pos[1] = -1
    if batch > 2:
        pos[2] = 0
    return pos


# batch, then the shape: the batch sizes of the brief (1, 2, 3, 5, 8, 64) spread over odd and real shapes
QKV_CASES = [  # batch, heads, kv_heads, head_dim, hidden
    (1, 32, 4, 64, 2048),
    (2, 2, 1, 16, 8),
    (3, 4, 2, 64, 256),
    (5, 3, 1, 32, 264),
    (8, 8, 8, 128, 1032),
    (64, 4, 2, 64, 256),
    (1, 32, 8, 64, 2048),
]


@pytest.mark.parametrize("wt", WTYPES)
@pytest.mark.parametrize("batch,heads,kv_heads,head_dim,hidden", QKV_CASES)
def test_qkv_rope(cp, mod, wt, batch, heads, kv_heads, head_dim, hidden):
    rng = rng_for("qkv", wt, batch, heads, kv_heads, head_dim, hidden)
    max_seq, theta = 40, 10000.0
    wq, wq64 = weights(rng, (heads * head_dim, hidden), wt)
    wk, wk64 = weights(rng, (kv_heads * head_dim, hidden), wt)
    wv, wv64 = weights(rng, (kv_heads * head_dim, hidden), wt)
    norm, norm64 = weights(rng, (hidden,), wt, 0.1, 1.0)
    x = activations(rng, batch, hidden)
    cache_shape = (batch + 1, kv_heads, max_seq, head_dim)  # cache_batch > batch: row b's slot is fixed
    kc, kc64 = in_weight_type(rng.standard_normal(cache_shape), wt)  # the caches hold wt
    vc, vc64 = in_weight_type(rng.standard_normal(cache_shape), wt)
    pos = positions(rng, batch, max_seq)
    rows = (heads + 2 * kv_heads) * head_dim
    bias = (0.5 * rng.standard_normal(rows)).astype(np.float32)  # Qwen2's Q/K/V bias, added in the epilogue
    inv_freq = ref.rope_inv_freq(head_dim, theta)
    q = out_buffer(cp, batch * heads * head_dim)
    kc_d, vc_d = cp.asarray(kc), cp.asarray(vc)
    mod.get_function(f"qkv_rope_{wt}")(
        (-(-rows // 16),), (256,),
        (cp.asarray(W.pack_qkv(wq, wk, wv)), cp.asarray(norm), cp.asarray(x), q, kc_d, vc_d, cp.asarray(pos),
         cp.asarray(bias), cp.asarray(inv_freq), i32(hidden), i32(heads), i32(kv_heads), i32(head_dim),
         i32(max_seq), i32(batch), f32(EPS)))
    h = ref.rmsnorm(x, norm64, hidden, EPS)
    q_ref, kc_ref, vc_ref = ref.rope_append(
        ref.gemv(wq64, h, heads * head_dim, hidden, batch), ref.gemv(wk64, h, kv_heads * head_dim, hidden, batch),
        ref.gemv(wv64, h, kv_heads * head_dim, hidden, batch), bias, inv_freq, kc64, vc64, pos, heads, kv_heads,
        head_dim, max_seq, cache=wt)
    assert rel_err(fetch(q, batch * heads * head_dim), q_ref) < TOL[wt]
    written = np.zeros(cache_shape, bool)
    for b, p in enumerate(pos):
        if 0 <= p < max_seq:
            written[b, :, p] = True
    kc_got, vc_got = kc_d.get(), vc_d.get()
    assert kc_got.dtype == kc.dtype and vc_got.dtype == vc.dtype
    assert np.array_equal(kc_got[~written], kc[~written]), "k_cache changed outside the appended slots"
    assert np.array_equal(vc_got[~written], vc[~written]), "v_cache changed outside the appended slots"
    # the appended rows, rounded to wt once (the reference rounds its float64 values the same way)
    assert rel_err(weight_type_values(kc_got, wt)[written], kc_ref[written]) < TOL[wt]
    assert rel_err(weight_type_values(vc_got, wt)[written], vc_ref[written]) < TOL[wt]


GATE_UP_CASES = [(1, 5632, 2048), (2, 1, 8), (3, 688, 256), (5, 37, 264), (8, 8192, 2048), (64, 100, 264)]


@pytest.mark.parametrize("wt", WTYPES)
@pytest.mark.parametrize("batch,ffn,hidden", GATE_UP_CASES)
def test_gate_up_silu(cp, mod, wt, batch, ffn, hidden):
    rng = rng_for("gate_up", wt, batch, ffn, hidden)
    gate, gate64 = weights(rng, (ffn, hidden), wt)
    up, up64 = weights(rng, (ffn, hidden), wt)
    norm, norm64 = weights(rng, (hidden,), wt, 0.1, 1.0)
    x = activations(rng, batch, hidden)
    act = out_buffer(cp, batch * ffn)
    mod.get_function(f"gate_up_silu_{wt}")(
        (-(-ffn // 8),), (256,),
        (cp.asarray(W.pack_gate_up(gate, up)), cp.asarray(norm), cp.asarray(x), act, i32(ffn), i32(hidden),
         i32(batch), f32(EPS)))
    h = ref.rmsnorm(x, norm64, hidden, EPS)
    expect = ref.silu_mul(ref.gemv(gate64, h, ffn, hidden, batch), ref.gemv(up64, h, ffn, hidden, batch), batch * ffn)
    assert rel_err(fetch(act, batch * ffn), expect) < TOL[wt]


GEMV_CASES = [(1, 2048, 2048), (1, 2048, 5632), (2, 3, 1032), (3, 37, 264), (5, 2047, 8192), (8, 1, 8),
              (64, 100, 256), (1, 32000, 2048)]


@pytest.mark.parametrize("wt", WTYPES)
@pytest.mark.parametrize("variant", ["res", "norm"])
@pytest.mark.parametrize("batch,n,k", GEMV_CASES)
def test_gemv_res_and_norm(cp, mod, wt, variant, batch, n, k):
    rng = rng_for("gemv", wt, variant, batch, n, k)
    w, w64 = weights(rng, (n, k), wt)
    x = activations(rng, batch, k)
    grid = (-(-n // 16),)
    if variant == "res":
        y0 = (rng.standard_normal((batch, n)) * 10).astype(np.float32)
        y = out_buffer(cp, batch * n, head=y0)
        mod.get_function(f"gemv_res_{wt}")(grid, (256,), (cp.asarray(w), cp.asarray(x), y, i32(n), i32(k), i32(batch)))
        expect = ref.gemv_add(w64, x, y0, n, k, batch)
    else:
        norm, norm64 = weights(rng, (k,), wt, 0.1, 1.0)
        y = out_buffer(cp, batch * n)
        mod.get_function(f"gemv_norm_{wt}")(
            grid, (256,), (cp.asarray(w), cp.asarray(norm), cp.asarray(x), y, i32(n), i32(k), i32(batch), f32(EPS)))
        expect = ref.gemv(w64, ref.rmsnorm(x, norm64, k, EPS), n, k, batch)
    assert rel_err(fetch(y, batch * n), expect) < TOL[wt]


@pytest.mark.parametrize("wt", WTYPES)
@pytest.mark.parametrize("batch,n,k", [(1, 2048, 5632), (1, 2048, 2048), (1, 100, 1032), (3, 37, 264), (2, 64, 5632)])
@pytest.mark.parametrize("blocks", [128, 7])
def test_gemv_res_with_the_spec_ring(cp, mod_ring3, wt, batch, n, k, blocks):
    """gemv_res as the spec builds and launches it: 3 ring slots a warp (-DFW_STAGES=3) in 384 bytes a thread plus
    one staged x row of shared memory (batch rows past the first read from global memory); k of 1 to 6 items a
    pair, warps with several pairs (7 blocks), and the residual add."""
    fn = mod_ring3.get_function(f"gemv_res_{wt}")
    smem = fn.max_dynamic_shared_size_bytes = 384 * 256 + 4 * k
    rng = rng_for("gemv3", wt, batch, n, k, blocks)
    w, w64 = weights(rng, (n, k), wt)
    x = activations(rng, batch, k)
    y0 = (rng.standard_normal((batch, n)) * 10).astype(np.float32)
    y = out_buffer(cp, batch * n, head=y0)
    fn((blocks,), (256,), (cp.asarray(w), cp.asarray(x), y, i32(n), i32(k), i32(batch)), shared_mem=smem)
    assert rel_err(fetch(y, batch * n), ref.gemv_add(w64, x, y0, n, k, batch)) < TOL[wt]


ATTN_CASES = [  # heads, kv_heads, head_dim, max_seq, chunk[, G: splits launched, else ceil(max_seq / chunk)]
    (4, 4, 16, 50, 16),
    (8, 2, 64, 300, 64),
    (32, 8, 128, 1024, 256),
    (8, 8, 32, 129, 100),
    (4, 1, 128, 600, 128),
    (2, 2, 64, 200, 1000),
    (6, 3, 32, 520, 300),
    (4, 2, 96, 150, 64),
    (2, 2, 8, 40, 7),
    (32, 4, 64, 512, 64),
    (4, 2, 64, 3000, 32),  # 94 splits: the combine reads its partials in 4 chunks
    (2, 1, 128, 2048, 16),  # 128 splits of head_dim 128: 10 chunks
    (1, 1, 8, 8192, 8),  # 1024 splits: more (m, l) pairs than shared memory holds, read from L2 as it goes
    # a context of at most two tiles (128 keys at head_dim 64 and 128 threads) runs as one split whatever the chunk
    (4, 2, 64, 64, 8),  # pos 63: 64 keys, one split (8 by chunk)
    (4, 2, 64, 128, 8),  # pos 127: 128 keys, two tiles in one split (16 by chunk)
    (4, 2, 64, 129, 8),  # pos 128: 129 keys, one past two tiles: 17 splits and the combine
    (8, 2, 64, 300, 16),  # pos 16 on the second launch: 17 keys in one split
    # fewer splits launched than chunks: splits of whole chunks, as few as fit (the spec launches 12)
    (8, 2, 64, 1100, 64, 9),  # 1100 keys: 9 splits of 128; pos 64: 65 keys, one split
    (4, 1, 128, 3000, 32, 5),  # 3000 keys: 5 splits of 608; pos 32: 33 keys (tiles of 32), one split
    (4, 2, 64, 700, 8, 3),  # 700 keys: 3 splits of 240; pos 8: 9 keys
    (2, 2, 32, 2050, 128, 1),  # one split launched: every key in it (tiles of 128 keys at head_dim 32)
]


def launch_attn(cp, mod, wt, q, kc, vc, pos, counters, heads, kv_heads, head_dim, max_seq, chunk, scale,
                splits=None):
    batch = len(pos)
    splits = splits or -(-max_seq // chunk)
    part_o = cp.full(batch * heads * splits * head_dim, np.nan, np.float32)
    part_ml = cp.full(batch * heads * splits * 2, np.nan, np.float32)
    out = out_buffer(cp, batch * heads * head_dim)
    mod.get_function(f"attn_decode_{wt}")(
        (batch * heads, splits), (128,),
        (cp.asarray(q), cp.asarray(kc), cp.asarray(vc), cp.asarray(pos), part_o, part_ml, counters, out,
         i32(heads), i32(kv_heads), i32(head_dim), i32(max_seq), i32(chunk), f32(scale)))
    return fetch(out, batch * heads * head_dim)


@pytest.mark.parametrize("case", ATTN_CASES, ids=["-".join(map(str, c)) for c in ATTN_CASES])
@pytest.mark.parametrize("batch,wt", [(1, "f32"), (4, "f32"), (1, "f16"), (4, "bf16")])
def test_attn_decode(cp, mod, batch, wt, case):
    heads, kv_heads, head_dim, max_seq, chunk = case[:5]
    splits = case[5] if len(case) > 5 else None
    scale = 1.0 / np.sqrt(head_dim)
    counters = cp.zeros(batch * heads + GUARD, np.int32)
    for launch in range(2):  # the second launch checks that the first left its counters at zero
        rng = rng_for("attn", batch, heads, kv_heads, head_dim, max_seq, chunk, launch)
        q = rng.standard_normal((batch, heads, head_dim)).astype(np.float32)
        kc = rng.standard_normal((batch, kv_heads, max_seq, head_dim)).astype(np.float32)
        vc = rng.standard_normal((batch, kv_heads, max_seq, head_dim)).astype(np.float32)
        pos = rng.integers(0, max_seq, batch).astype(np.int32)
        pos[0] = max_seq - 1 if launch == 0 else min(max_seq - 1, chunk)  # many splits / just past one
        if batch > 1:
            pos[1] = -1  # padding: zeros
        if batch > 2:
            pos[2] = 0
        if launch == 1:  # keys past a row's position are never read into the result (NaN there stays out)
            for r in range(batch):
                kc[r, :, max(pos[r], 0) + 1:] = np.nan
                vc[r, :, max(pos[r], 0) + 1:] = np.nan
        (kc, kc64), (vc, vc64) = in_weight_type(kc, wt), in_weight_type(vc, wt)  # the caches hold wt
        got = launch_attn(cp, mod, wt, q, kc, vc, pos, counters, heads, kv_heads, head_dim, max_seq, chunk, scale,
                          splits)
        got = got.reshape(batch, heads, head_dim)
        live = pos >= 0
        expect = ref.attention(q[live], kc64[live], vc64[live], pos[live], heads, kv_heads, head_dim, max_seq,
                               scale)
        assert rel_err(got[live], expect) < 1e-5
        assert np.all(got[~live] == 0), "a padding row's attention output must be zeros"
        assert np.all(counters.get() == 0), "attn_decode must leave its counters at zero"


@pytest.mark.parametrize("wt", WTYPES)
@pytest.mark.parametrize("vocab,hidden,batch", [(50, 100, 1), (7, 33, 17), (300, 2048, 3)])
def test_embed_pdl(cp, mod, wt, vocab, hidden, batch):
    rng = rng_for("embed", wt, vocab, hidden, batch)
    table, table64 = weights(rng, (vocab, hidden), wt)
    tokens = rng.integers(0, vocab, batch).astype(np.int32)
    tokens[0] = vocab - 1
    x = out_buffer(cp, batch * hidden)
    mod.get_function(f"embed_pdl_{wt}")((batch,), (256,), (cp.asarray(table), cp.asarray(tokens), x, i32(hidden)))
    assert np.array_equal(fetch(x, batch * hidden), ref.embed(table64, tokens, hidden).reshape(-1))


@pytest.mark.parametrize("vocab,batch", [(1, 1), (1025, 5), (32000, 2), (128256, 1)])
def test_argmax_pdl(cp, mod, vocab, batch):
    rng = rng_for("argmax", vocab, batch)
    logits = rng.standard_normal((batch, vocab)).astype(np.float32)
    if batch > 1:
        logits[1, :] = 0.5
    if batch > 3:
        logits[3, np.sort(rng.choice(vocab, size=5, replace=False))] = 50.0
    out = out_buffer(cp, batch, fill=-1, dtype=np.int32)
    mod.get_function("argmax_pdl")((batch,), (1024,), (cp.asarray(logits), out, i32(vocab)))
    host = out.get()
    assert np.all(host[batch:] == -1)
    assert host[:batch].tolist() == ref.argmax(logits, vocab).tolist()


# ----------------------------------------------------------------------------------------------------------
# The whole fused graph
# ----------------------------------------------------------------------------------------------------------


def hf_state(plan, seed):
    """A random HF-named float32 state dict of the plan's shape (matrices 0.05 normal, norms 1 + 0.1 normal)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, (buf, idx) in W.hf_key_map(plan.dims["layers"]).items():
        shape = W.weight_shape(plan, buf)
        a = rng.standard_normal(shape[1:] if idx is not None else shape)
        out[key] = (1.0 + 0.1 * a if buf in W.NORM_BUFFERS else 0.05 * a).astype(np.float32)
    return out


def numpy_step(state, dims, token, p, kc, vc):
    """One decode step of one sequence in float64 from HF-named weights (the model's definition, composed
    from the reference kernels); kc/vc [layers, kv_heads, max_seq, head_dim] are updated in place."""
    d = dims
    hid, heads, kvh, hd, ffn, ms = d["hidden"], d["heads"], d["kv_heads"], d["head_dim"], d["ffn"], d["max_seq"]
    s = {k: np.asarray(v, np.float64) for k, v in state.items()}
    x = ref.embed(s["model.embed_tokens.weight"], [token], hid)
    pos = np.array([p], np.int32)
    for i in range(d["layers"]):
        L = f"model.layers.{i}."
        h = ref.rmsnorm(x, s[L + "input_layernorm.weight"], hid, EPS)
        q = ref.gemv(s[L + "self_attn.q_proj.weight"], h, heads * hd, hid, 1)
        k = ref.gemv(s[L + "self_attn.k_proj.weight"], h, kvh * hd, hid, 1)
        v = ref.gemv(s[L + "self_attn.v_proj.weight"], h, kvh * hd, hid, 1)
        q, kci, vci = ref.rope_append(q, k, v, None, ref.rope_inv_freq(hd, 10000.0), kc[i][None], vc[i][None], pos,
                                      heads, kvh, hd, ms)
        kc[i], vc[i] = kci[0], vci[0]
        a = ref.attention(q, kc[i][None], vc[i][None], pos, heads, kvh, hd, ms, hd ** -0.5)
        x = ref.gemv_add(s[L + "self_attn.o_proj.weight"], a.reshape(1, -1), x, hid, heads * hd, 1)
        h = ref.rmsnorm(x, s[L + "post_attention_layernorm.weight"], hid, EPS)
        act = ref.silu_mul(ref.gemv(s[L + "mlp.gate_proj.weight"], h, ffn, hid, 1),
                           ref.gemv(s[L + "mlp.up_proj.weight"], h, ffn, hid, 1), ffn)
        x = ref.gemv_add(s[L + "mlp.down_proj.weight"], act.reshape(1, -1), x, hid, ffn, 1)
    return ref.gemv(s["lm_head.weight"], ref.rmsnorm(x, s["model.norm.weight"], hid, EPS), d["vocab"], hid, 1)[0]


def load_with_empty_caches(exes, state, dims):
    """The HF-named state into each executable, its KV caches zeroed; returns zeroed float64 caches
    [layers, kv_heads, max_seq, head_dim] (k, v) for numpy_step."""
    for exe in exes:
        W.load_state_dict(exe, state)
        exe.buffers["k_cache"].fill(0)
        exe.buffers["v_cache"].fill(0)
    kc = np.zeros((dims["layers"], dims["kv_heads"], dims["max_seq"], dims["head_dim"]))
    return kc, np.zeros_like(kc)


def fused_executable(overrides, modules, programmatic=True):
    from dagbuild.executable import ExecOptions, Executable
    from dagbuild.llama.decode import llama_plan

    exe = Executable(llama_plan(overrides, FUSED_SPEC), ExecOptions(programmatic=programmatic), modules=modules)
    _, edges = exe.driver_graph()
    n_prog = sum(kind == "programmatic" for kind in edges.values())
    lk = overrides.get("layer_kernel", 0) if overrides.get("batch", 1) == 1 else 0
    expect = 2 if lk == 2 else (1 if lk == 1 else 5) * overrides.get("layers", 22)  # embed -> stack -> lm_head
    assert n_prog >= expect if programmatic else n_prog == 0
    return exe


@pytest.mark.parametrize("programmatic", [True, False], ids=["pdl", "plain"])
def test_fused_graph_matches_unfused_graph_and_numpy(cp, modules, programmatic):
    from dagbuild.executable import Executable
    from dagbuild.llama.decode import llama_plan

    dims = {**TINY, "wt": "f32", "batch": 3, "attn_chunk": 32}  # 70 positions: up to 3 splits to combine
    state = hf_state(llama_plan(dims, FUSED_SPEC), 7)
    with fused_executable(dims, modules, programmatic) as fused, \
            Executable(llama_plan(dims), modules=modules) as plain:
        kc, vc = load_with_empty_caches((fused, plain), state, dims)
        rng = np.random.default_rng(1)
        tokens = rng.integers(0, dims["vocab"], 70)
        for t in range(70):
            toks = np.array([tokens[t], tokens[(t + 5) % 70], 3], np.int32)
            pos = np.array([t, -1, t // 2], np.int32)  # row 1 padding; row 2 revisits positions
            got = {}
            for name, exe in (("fused", fused), ("plain", plain)):
                exe.buffers["tokens_host"][:] = toks
                exe.buffers["pos_host"][:] = pos
                exe.launch(sync=True)
                got[name] = (exe.buffers["logits"].get().astype(np.float64), exe.buffers["next_host"].copy())
            for r in (0, 2):
                assert rel_err(got["fused"][0][r], got["plain"][0][r]) < 1e-5, (t, r)
            assert got["fused"][1][[0, 2]].tolist() == got["plain"][1][[0, 2]].tolist()
            expect = numpy_step(state, dims, int(toks[0]), t, kc, vc)  # the float64 model, row 0
            assert rel_err(got["fused"][0][0], expect) < 1e-4, t


@pytest.mark.parametrize("threads,qkv_grid", [(256, 0), (128, 0), (64, 0), (256, 132), (256, 80)])
def test_fused_tinyllama_shape_random_weights_match_unfused(cp, modules, threads, qkv_grid):
    """TinyLlama shape, f16: random_weights(seed) gives the fused (packed) and unfused graphs the same model;
    greedy tokens and logits agree over 24 steps, with programmatic edges; also with GEMV blocks of 128 and 64
    threads for the QKV, O and down projections (gemv_qkv_threads, gemv_res_threads: more, smaller blocks), and
    with the QKV GEMV on 132 or 80 blocks (gemv_qkv_grid: warps with two row pairs)."""
    from dagbuild.executable import Executable
    from dagbuild.llama.decode import LlamaDecoder, llama_plan

    dims = {"wt": "f16", "batch": 1, "max_seq": 128}
    blocks = {"gemv_qkv_threads": threads, "gemv_res_threads": threads, "gemv_qkv_grid": qkv_grid}
    with fused_executable(dims | blocks, modules) as fused, Executable(llama_plan(dims), modules=modules) as plain:
        logits = {}
        for name, exe in (("fused", fused), ("plain", plain)):
            W.random_weights(exe, 3)
            dec = LlamaDecoder(exe)
            seen = []
            gen = dec.generate([[1, 500, 7000, 31999]], 24,
                               on_step=lambda done, total, e=exe, s=seen: s.append(e.buffers["logits"].get()))
            logits[name] = (gen.tokens[0], np.array(seen, np.float64))
        assert logits["fused"][0] == logits["plain"][0]
        assert rel_err(logits["fused"][1], logits["plain"][1]) < 2e-3


# ----------------------------------------------------------------------------------------------------------
# The persistent layer kernel (kernels/llama_layer.cu at batch 1): one a layer (layer_kernel: 1) or one for the
# whole stack (layer_kernel: 2, its ring running on across the layers)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lk", [1, 2], ids=["layer", "stack"])
@pytest.mark.parametrize("wt,sms,chunk,heads", [("f32", 132, 32, 4), ("f32", 11, 16, 16), ("f16", 132, 64, 4),
                                                 ("bf16", 40, 8, 4)],
                         ids=["f32-132", "f32-11blocks", "f16-132", "bf16-40"])
def test_layer_kernel_matches_five_node_layers_and_numpy(cp, modules, wt, sms, chunk, heads, lk):
    """One node per layer or one for the stack: logits and tokens as the five-node fused graph's over 70
    positions (attention split by `chunk`, up to 9 splits at 40 blocks; with 11 blocks for 16 heads a block runs
    two attention units and up to 126 weight rows a phase), f32 also against the float64 model; KV caches equal
    after the run."""
    from dagbuild.llama.decode import llama_plan

    dims = {**TINY, "wt": wt, "batch": 1, "attn_chunk": chunk, "attn_decode_chunk": chunk, "sms": sms, "max_seq": 96,
            "heads": heads}
    state = hf_state(llama_plan(dims, FUSED_SPEC), 11)
    with fused_executable({**dims, "layer_kernel": lk}, modules) as layer, \
            fused_executable({**dims, "layer_kernel": 0}, modules) as five:
        kernel_nodes = sum(n.id.startswith(("layer.", "layers.")) for n in layer.plan.nodes)
        assert kernel_nodes == (dims["layers"] if lk == 1 else 1)
        kc, vc = load_with_empty_caches((layer, five), state, dims)
        tokens = np.random.default_rng(2).integers(0, dims["vocab"], 70)
        tol = 1e-5 if wt == "f32" else 2e-3
        for t in range(70):
            got = {}
            for name, exe in (("layer", layer), ("five", five)):
                exe.buffers["tokens_host"][:] = tokens[t]
                exe.buffers["pos_host"][:] = t
                exe.launch(sync=True)
                got[name] = (exe.buffers["logits"].get().astype(np.float64)[0], int(exe.buffers["next_host"][0]))
            assert rel_err(got["layer"][0], got["five"][0]) < tol, t
            if wt == "f32":
                assert got["layer"][1] == got["five"][1], t
                expect = numpy_step(state, dims, int(tokens[t]), t, kc, vc)
                assert rel_err(got["layer"][0], expect) < 1e-4, t
        for buf in ("k_cache", "v_cache"):
            got_cache = weight_type_values(layer.buffers[buf].get(), wt)
            assert rel_err(got_cache, weight_type_values(five.buffers[buf].get(), wt)) < tol, buf


@pytest.mark.parametrize("lk", [1, 2], ids=["layer", "stack"])
def test_layer_kernel_padding_row_and_tinyllama_tokens(cp, modules, lk):
    """TinyLlama shape, f16, random weights: greedy tokens as the five-node graph's over 24 steps; a padding
    position (-1) writes no KV entry."""
    from dagbuild.llama.decode import LlamaDecoder

    dims = {"wt": "f16", "batch": 1, "max_seq": 128}
    with fused_executable({**dims, "layer_kernel": lk}, modules) as layer, \
            fused_executable({**dims, "layer_kernel": 0}, modules) as five:
        out = {}
        for name, exe in (("layer", layer), ("five", five)):
            W.random_weights(exe, 3)
            seen = []
            keep = lambda done, total, e=exe, s=seen: s.append(e.buffers["logits"].get())  # noqa: E731
            gen = LlamaDecoder(exe).generate([[1, 500, 7000, 31999]], 24, on_step=keep)
            out[name] = (gen.tokens[0], np.array(seen, np.float64))
        assert out["layer"][0] == out["five"][0]
        assert rel_err(out["layer"][1], out["five"][1]) < 2e-3
        before = layer.buffers["k_cache"].get()
        layer.buffers["tokens_host"][:] = 5
        layer.buffers["pos_host"][:] = -1
        layer.launch(sync=True)
        assert np.array_equal(layer.buffers["k_cache"].get(), before)
        assert np.all(np.isfinite(layer.buffers["logits"].get()))


def test_layer_kernel_grid_the_device_cannot_hold_is_refused(cp, modules):
    """`resident: true`: a layer-kernel grid larger than the device holds at once (the driver's occupancy x SMs)
    is refused at build time naming the node, instead of spinning until the kernel traps."""
    from dagbuild.errors import SpecError
    from dagbuild.executable import Executable
    from dagbuild.llama.decode import llama_plan

    dims = {**TINY, "wt": "f16", "batch": 1, "layer_kernel": 1, "sms": 4096}
    with pytest.raises(SpecError) as err:
        Executable(llama_plan(dims, FUSED_SPEC), modules=modules)
    assert set(err.value.codes) == {"launch_config"} and "node 'layer.0': its 4096 blocks" in str(err.value)
    # the whole stack at one block a SM: twice the SMs is refused too
    with pytest.raises(SpecError) as err:
        Executable(llama_plan({**dims, "layer_kernel": 2, "sms": 264}, FUSED_SPEC), modules=modules)
    assert "node 'layers.0': its 264 blocks" in str(err.value)
