"""The model families without a GPU: HF configs (shipped ones, transformers' own config classes) → plan,
refusals naming field and value, RoPE tables against HF's formulas, biases and tied heads in the state-dict
plan, sharded checkpoints' files, the memory check, ``info --hf-config``, and text in and out."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import SPECS

from dagbuild.cli import main
from dagbuild.errors import DagbuildError
from dagbuild.llama import weights as W
from dagbuild.llama.config import from_hf, read_hf_config
from dagbuild.llama.decode import llama_plan
from dagbuild.llama.footprint import check_fits, footprint
from dagbuild.llama.rope import Rope

HF = SPECS / "configs" / "hf"
FAMILIES = sorted(p.stem for p in HF.glob("*.json"))
SPECS_BOTH = [SPECS / "llama_decode.yaml", SPECS / "llama_decode_fused.yaml"]


def config(name: str) -> dict:
    return json.loads((HF / f"{name}.json").read_text())


# ---- configs → plans --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS_BOTH, ids=lambda p: p.stem)
@pytest.mark.parametrize("name", FAMILIES)
def test_info_hf_config_for_every_shipped_family(spec, name, capsys):
    assert main(["info", str(spec), "--hf-config", str(HF / f"{name}.json")]) == 0
    out = capsys.readouterr().out
    m = from_hf(config(name))
    assert f"hidden={m.dims['hidden']}" in out and f"head_dim={m.dims['head_dim']}" in out
    assert "weight bytes:" in out and "KV-cache bytes:" in out and m.architecture in out
    assert f"attn_scale={m.dims['head_dim'] ** -0.5:g}" in out


def test_info_bytes_are_the_plans(tmp_path, capsys):
    """Llama-3.2-1B at max_seq 1024: tied, so the weights hold one 128256 x 2048 table, not two."""
    assert main(["info", str(SPECS_BOTH[0]), "--hf-config", str(HF / "llama-3.2-1b.json"), "--set",
                 "max_seq=1024"]) == 0
    out = capsys.readouterr().out
    c = config("llama-3.2-1b")
    h, f, v, L, kv, hd = (c[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers",
                                          "num_key_value_heads", "head_dim"))
    q = c["num_attention_heads"] * hd
    per_layer = 2 * h + (q + 2 * kv * hd) * h + q * h + 3 * f * h
    weights = 2 * (v * h + L * per_layer + h) + 4 * (L * (q + 2 * kv * hd) + hd // 2)
    assert f"({weights} B)" in out
    assert f"({2 * L * kv * 1024 * hd * 2} B)" in out  # K and V in the model's bf16


def test_info_hf_config_accepts_the_directory(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(config("qwen2-0.5b")))
    assert main(["info", str(SPECS_BOTH[1]), "--hf-config", str(tmp_path)]) == 0
    assert "Q/K/V biases" in capsys.readouterr().out


@pytest.mark.parametrize("name, change, field", [
    ("mistral-7b-v0.1", {}, "sliding_window = 4096"),  # with --set max_seq=8192 below
    ("llama-3.2-1b", {"model_type": "mixtral"}, "model_type = 'mixtral'"),
    ("llama-3.2-1b", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type = 'yarn'"),
    ("llama-2-7b", {"head_dim": 256}, "head_dim = 256"),
    ("qwen2-0.5b", {"use_sliding_window": True, "sliding_window": 4096}, "sliding_window = 4096"),
    ("smollm2-360m", {"hidden_act": "gelu_pytorch_tanh"}, "hidden_act = 'gelu_pytorch_tanh'"),
    ("llama-2-7b", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
])
def test_info_hf_config_refusals_exit_1_naming_the_field(tmp_path, capsys, name, change, field):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**config(name), **change}))
    assert main(["info", str(SPECS_BOTH[0]), "--hf-config", str(path), "--set", "max_seq=8192"]) == 1
    captured = capsys.readouterr()
    assert field in captured.err and "spec" not in captured.out  # refused before any summary


def test_info_hf_config_missing_file_exits_1(tmp_path, capsys):
    assert main(["info", str(SPECS_BOTH[0]), "--hf-config", str(tmp_path)]) == 1
    assert "no config.json" in capsys.readouterr().err


def test_transformers_own_config_classes():
    """LlamaConfig / MistralConfig / Qwen2Config objects and their to_dict (whatever transformers is here: 5.x
    writes rope_parameters) read as the same model."""
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=32003, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    cases = [
        (transformers.LlamaConfig(**kw, head_dim=128, rope_theta=500000.0, tie_word_embeddings=True,
                                  rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
         "llama", "llama3", 500000.0, False, True),
        (transformers.MistralConfig(**kw, sliding_window=None), "mistral", "default", 10000.0, False, False),
        (transformers.Qwen2Config(**kw, rope_theta=1e6, rms_norm_eps=1e-6), "qwen2", "default", 1e6, True, False),
    ]
    for cfg, mt, rope_type, theta, bias, tied in cases:
        for c in (cfg, cfg.to_dict()):
            m = from_hf(c)
            assert (m.model_type, m.rope.rope_type, m.rope.theta, m.qkv_bias, m.tied) == (mt, rope_type, theta,
                                                                                        bias, tied)
            assert m.dims["vocab"] == 32003 and m.dims["head_dim"] == (128 if mt == "llama" else 128)
        assert from_hf(cfg).rms_eps == cfg.rms_norm_eps


def test_generation_config_eos_ids_win(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config("llama-3.2-1b")))
    assert read_hf_config(tmp_path).eos_ids == (128001,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    assert read_hf_config(tmp_path).eos_ids == (128001, 128008, 128009)


def test_check_plan_refuses_a_mismatched_const_and_dim():
    from dagbuild.llama.config import check_plan

    m = from_hf(config("qwen2-0.5b"))
    p = llama_plan(m.overrides())
    check_plan(m, p.dims, p.consts)
    p2 = llama_plan({**m.overrides(), "rms_eps": 1e-5})
    with pytest.raises(DagbuildError, match=r"rms_norm_eps = 1e-06 \(const 'rms_eps'\)"):
        check_plan(m, p2.dims, p2.consts)
    with pytest.raises(DagbuildError, match="num_hidden_layers = 24"):
        check_plan(m, {**p.dims, "layers": 2}, p.consts)


# ---- RoPE tables ------------------------------------------------------------------------------------------


def _hf_llama3_f64(theta, hd, factor, low, high, old):
    """HF's llama3 rule written plainly in float64 (the oracle: dagbuild's table is its float32 rounding)."""
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    wl = 2 * math.pi / inv
    out = np.where(wl > old / low, inv / factor, inv)
    smooth = (old / wl - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = (wl >= old / high) & (wl <= old / low)
    return np.where(medium, smoothed, out)


def test_llama3_table_matches_hfs_rule():
    p = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    got = Rope("llama3", 500000.0, p).inv_freq(64)
    want = _hf_llama3_f64(500000.0, 64, 32.0, 1.0, 4.0, 8192)
    assert got.dtype == np.float32 and got.shape == (32,)
    assert np.allclose(got, want, rtol=2e-6, atol=0)
    # the three regimes are all present at head_dim 64: unscaled, divided by the factor, and smoothed
    base = Rope("default", 500000.0).inv_freq(64)
    assert (got == base).any() and np.isclose(got, base / 32, rtol=1e-6).any()
    assert ((got < base) & ~np.isclose(got, base / 32, rtol=1e-6)).any()


def test_default_linear_dynamic_tables():
    base = Rope("default", 10000.0).inv_freq(128)
    assert np.allclose(base, 1.0 / 10000.0 ** (np.arange(0, 128, 2) / 128), rtol=1e-6)
    assert np.allclose(Rope("linear", 10000.0, {"factor": 4.0}).inv_freq(128), base / 4, rtol=1e-6)
    dyn = Rope("dynamic", 10000.0, {"factor": 2.0}, max_position=2048)
    assert np.array_equal(dyn.inv_freq(128), base)
    dyn.check_max_seq(2048)
    with pytest.raises(DagbuildError, match="max_seq = 2049"):
        dyn.check_max_seq(2049)


def test_rope_table_is_the_reference_default():
    from dagbuild.llama import reference as ref

    assert np.array_equal(Rope().inv_freq(64), ref.rope_inv_freq(64, 10000.0))


# ---- state dicts: biases, tied heads, shards -----------------------------------------------------------------


def shapes(plan, biases=False, tied=False):
    out = {}
    for key, (role, idx) in W.hf_key_map(plan.dims["layers"], biases).items():
        shape = W.weight_shape(plan, role)
        out[key] = shape[1:] if idx is not None else shape
    if tied:
        del out["lm_head.weight"]
    return out


@pytest.mark.parametrize("spec", SPECS_BOTH, ids=lambda p: p.stem)
def test_qwen2_biases_fill_qkv_bias_rows(spec):
    m = from_hf({**config("qwen2-0.5b"), "num_hidden_layers": 2, "vocab_size": 1000})
    p = llama_plan({**m.overrides(), "max_seq": 64}, spec)
    got = W.plan_state_dict(p, shapes(p, biases=True))
    roles = {(b, i) for _, b, i in got if b in W.BIAS_ROLES}
    assert roles == {(b, i) for b in W.BIAS_ROLES for i in range(2)}
    missing = r"layers\.1\.self_attn\.v_proj\.bias: missing .*'qkv_bias\[1\] \(bv rows\)'"
    with pytest.raises(W.WeightsError, match=missing):
        W.plan_state_dict(p, {k: v for k, v in shapes(p, biases=True).items()
                              if k != "model.layers.1.self_attn.v_proj.bias"})
    # bias views are the rows of the packed buffer, in wqkv order
    q, kv = 14 * 64, 2 * 64
    bufs = {"qkv_bias": np.arange(2 * (q + 2 * kv)).reshape(2, -1)}
    assert W.weight_view(bufs, p.dims, "bk", 1)[0] == (q + 2 * kv) + q
    assert W.weight_view(bufs, p.dims, "bv", 0).shape == (kv,)


def test_shared_head_assigns_nothing_to_the_lm_head():
    p = llama_plan({"hidden": 256, "heads": 4, "kv_heads": 2, "head_dim": 64, "ffn": 688, "vocab": 1000,
                    "layers": 2, "max_seq": 64})
    both = W.plan_state_dict(p, shapes(p))
    assert any(b == "lm_head" for _, b, _ in both)
    tied = W.plan_state_dict(p, shapes(p, tied=True), shared_head=True)
    assert not any(b == "lm_head" for _, b, _ in tied) and len(tied) == len(both) - 1
    untied_copy = W.plan_state_dict(p, shapes(p, tied=True))
    assert ("model.embed_tokens.weight", "lm_head", None) in untied_copy


def test_checkpoint_files_follow_the_index(tmp_path):
    for n in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "consolidated.safetensors"):
        (tmp_path / n).write_bytes(b"")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert [f.name for f in W.checkpoint_files(tmp_path)] == ["model-00001-of-00002.safetensors",
                                                              "model-00002-of-00002.safetensors"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(W.WeightsError, match="not a file name"):
        W.checkpoint_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(W.WeightsError, match="names shard 'gone.safetensors'"):
        W.checkpoint_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    assert len(W.checkpoint_files(tmp_path)) == 3
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert [f.name for f in W.checkpoint_files(tmp_path)] == ["model.safetensors"]


# ---- memory ------------------------------------------------------------------------------------------------


def test_memory_check_names_what_is_needed():
    m = from_hf(config("llama-2-7b"))
    p = llama_plan({**m.overrides(), "max_seq": 4096})
    fp = footprint(p)
    assert fp.weights == sum(p.buffers[b].nbytes for b in W.weight_buffer_names(p)) + \
        p.buffers["qkv_bias"].nbytes + p.buffers["rope_inv_freq"].nbytes
    assert fp.kv_cache == 2 * 32 * 32 * 4096 * 128 * 2  # 2 GiB of f16 K and V per sequence
    with pytest.raises(DagbuildError, match=r"needs 15\.\d GiB .*weights 12\.6 GiB, KV cache 2\.0 GiB at max_seq "
                                            r"4096 .*only 14\.0 GiB is free"):
        check_fits(fp, 14 << 30, p.dims, "graph 'llama_decode'")
    check_fits(fp, 40 << 30, p.dims)
    tied = footprint(llama_plan(from_hf(config("llama-3.2-1b")).overrides()), tied=True)
    untied = footprint(llama_plan(from_hf(config("llama-3.2-1b")).overrides()))
    assert untied.weights - tied.weights == 128256 * 2048 * 2


# ---- text ---------------------------------------------------------------------------------------------------


def tiny_tokenizer(folder, chat: bool = False):
    """A byte-level BPE trained here on a few sentences, saved as tokenizer.json (+ a chat template)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Once upon a time there was a tiny graph.", "héllo wörld ✓ 你好"] * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": {"content": "</s>"}}
    if chat:
        cfg["chat_template"] = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                                "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tok


def test_text_round_trip_and_streaming(tmp_path):
    tiny_tokenizer(tmp_path)
    from dagbuild.llama.text import Stream, Text

    t = Text(tmp_path)
    s = "Once upon a time, héllo wörld ✓ 你好"
    ids = t.encode(s)
    assert t.decode(ids) == s
    stream = Stream(t)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == s and all("\ufffd" not in p for p in pieces)


def test_chat_template(tmp_path):
    pytest.importorskip("jinja2")
    tiny_tokenizer(tmp_path, chat=True)
    from dagbuild.llama.text import Text

    t = Text(tmp_path)
    assert t.render_chat([{"role": "user", "content": "hi"}]) == "<s>[user] hi[assistant]"
    assert t.encode("hi", chat=True)[0] == t.tokenizer.token_to_id("<s>")


def test_text_errors(tmp_path):
    from dagbuild.llama.text import Text

    with pytest.raises(DagbuildError, match="no tokenizer.json"):
        Text(tmp_path)
    tiny_tokenizer(tmp_path)
    with pytest.raises(DagbuildError, match="no chat template"):
        Text(tmp_path).render_chat([{"role": "user", "content": "x"}])
