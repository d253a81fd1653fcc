"""dagbuild.llama.weights without a GPU: HF config checks, the key map, state-dict planning, conversions
and the safetensors reader."""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest
import yaml
from conftest import SPECS

from dagbuild.errors import DagbuildError
from dagbuild.llama import reference as ref
from dagbuild.llama import weights as W
from dagbuild.llama.decode import llama_plan

TINYLLAMA = {  # TinyLlama-1.1B's config.json, as published
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5632,
    "max_position_embeddings": 2048, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 22,
    "num_key_value_heads": 4, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.35.0",
    "use_cache": True, "vocab_size": 32000,
}
TINY = yaml.safe_load((SPECS / "configs" / "llama_tiny.yaml").read_text())


def tiny_plan(**over):
    return llama_plan({**TINY, **over})


def shapes_for(plan, drop=(), extra=None, tied=False):
    """The HF state-dict key -> shape a matching LlamaForCausalLM would have."""
    out = {}
    for key, (buf, idx) in W.hf_key_map(plan.dims["layers"]).items():
        shape = plan.buffers[buf].shape
        out[key] = shape[1:] if idx is not None else shape
    if tied:
        del out["lm_head.weight"]
    for k in drop:
        del out[k]
    out.update(extra or {})
    return out


# ---------------------------------------------------------------------------------------------------------
# dims_from_hf_config
# ---------------------------------------------------------------------------------------------------------


def test_tinyllama_config_gives_the_spec_defaults():
    dims = W.dims_from_hf_config(TINYLLAMA)
    assert dims == {"hidden": 2048, "heads": 32, "kv_heads": 4, "head_dim": 64, "ffn": 5632, "vocab": 32000,
                    "layers": 22, "wt": "bf16"}
    spec_defaults = llama_plan({"wt": "bf16"}).dims
    assert all(spec_defaults[k] == v for k, v in dims.items() if k != "wt")


def test_tiny_config_round_trips_through_hf_kwargs():
    kw = W.hf_config_kwargs({**TINY})
    dims = W.dims_from_hf_config({**kw, "torch_dtype": "float32"})
    assert dims == {**{k: TINY[k] for k in W.HF_DIM_FIELDS}, "wt": "f32"}


@pytest.mark.parametrize("value, wt", [("float32", "f32"), ("float16", "f16"), ("bfloat16", "bf16"),
                                       ("torch.float16", "f16"), (None, "f16"), ("auto", "f16")])
def test_wt_from_torch_dtype(value, wt):
    assert W.dims_from_hf_config({**TINYLLAMA, "torch_dtype": value})["wt"] == wt


def test_wt_from_transformers5_dtype_field():
    cfg = {k: v for k, v in TINYLLAMA.items() if k != "torch_dtype"}
    assert W.dims_from_hf_config({**cfg, "dtype": "float32"})["wt"] == "f32"


def test_optional_fields_default_like_llamaconfig():
    cfg = {k: v for k, v in TINYLLAMA.items()
           if k not in ("num_key_value_heads", "hidden_act", "attention_bias", "rope_theta", "rope_scaling")}
    dims = W.dims_from_hf_config(cfg)
    assert dims["kv_heads"] == 32 and dims["head_dim"] == 64


def test_config_object_with_attributes():
    class Cfg:
        pass

    c = Cfg()
    for k, v in TINYLLAMA.items():
        setattr(c, k, v)
    c.head_dim = None  # transformers < 4.45 LlamaConfig objects carry None
    c.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}  # transformers 5
    assert W.dims_from_hf_config(c)["head_dim"] == 64


@pytest.mark.parametrize("change, field", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}, "rope_type = 'yarn'"),
    ({"rope_scaling": {"rope_type": "longrope"}}, "rope_type = 'longrope'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),  # llama3 without its params
    ({"rope_scaling": {"type": "linear"}}, "rope_scaling.factor"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor = 0.5"),
    ({"head_dim": 256}, "head_dim = 256"),
    ({"head_dim": 80}, "head_dim = 80"),
    ({"hidden_size": 8192}, "head_dim = 256"),  # 8192 / 32 heads
    ({"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
    ({"attention_bias": True}, "attention_bias = True"),
    ({"mlp_bias": True}, "mlp_bias = True"),
    ({"torch_dtype": "float64"}, "torch_dtype = 'float64'"),
    ({"model_type": "mixtral"}, "model_type = 'mixtral'"),
    ({"model_type": "gpt2"}, "model_type = 'gpt2'"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ({"num_local_experts": 8}, "num_local_experts = 8"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
    ({"num_key_value_heads": 5}, "num_key_value_heads = 5"),
    ({"vocab_size": None}, "vocab_size"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps = -1.0"),
])
def test_rejections_name_the_field(change, field):
    with pytest.raises(DagbuildError, match=re.escape(field)):
        W.dims_from_hf_config({**TINYLLAMA, **change})


@pytest.mark.parametrize("change", [
    {"rms_norm_eps": 1e-6}, {"rope_theta": 500000.0}, {"rope_scaling": {"type": "linear", "factor": 2.0}},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}, {"head_dim": 128},
    {"hidden_size": 4096}, {"model_type": "mistral", "architectures": ["MistralForCausalLM"]},
    {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
])
def test_configs_the_old_spec_refused_are_served(change):
    W.dims_from_hf_config({**TINYLLAMA, **change})


def test_missing_rms_norm_eps_is_llamaconfigs_default():
    from dagbuild.llama.config import from_hf

    cfg = {k: v for k, v in TINYLLAMA.items() if k != "rms_norm_eps"}
    assert from_hf(cfg).rms_eps == 1e-6


def test_tied_embeddings_are_fine():
    assert W.dims_from_hf_config({**TINYLLAMA, "tie_word_embeddings": True})["vocab"] == 32000


def test_check_config_dims_names_the_dim():
    plan = tiny_plan()
    with pytest.raises(DagbuildError, match=r"hidden_size = 2048 \(dim 'hidden'\).*hidden = 256"):
        W.check_config_dims(TINYLLAMA, plan.dims)
    ok = W.check_config_dims({**W.hf_config_kwargs(plan.dims), "torch_dtype": "float16"}, plan.dims)
    assert ok["layers"] == 4


# ---------------------------------------------------------------------------------------------------------
# hf_key_map, plan_state_dict
# ---------------------------------------------------------------------------------------------------------


def test_key_map_covers_every_weight_buffer_slice_once():
    layers = 3
    km = W.hf_key_map(layers)
    assert len(km) == 1 + 9 * layers + 2
    slots = list(km.values())
    assert len(set(slots)) == len(slots)
    for buf in W.WEIGHT_BUFFERS:
        if buf in W.LAYERED_BUFFERS:
            assert sorted(i for b, i in slots if b == buf) == list(range(layers))
        else:
            assert (buf, None) in slots
    assert km["model.layers.2.self_attn.k_proj.weight"] == ("wk", 2)
    assert km["model.layers.0.post_attention_layernorm.weight"] == ("mlp_norm", 0)
    assert km["model.norm.weight"] == ("final_norm", None)
    assert km["lm_head.weight"] == ("lm_head", None)
    assert set(W.NORM_BUFFERS) <= set(W.WEIGHT_BUFFERS) and set(W.LAYERED_BUFFERS) <= set(W.WEIGHT_BUFFERS)


def test_plan_state_dict_full_model():
    plan = tiny_plan()
    assignments = W.plan_state_dict(plan, shapes_for(plan))
    assert len(assignments) == 1 + 9 * 4 + 2
    assert ("model.layers.3.mlp.down_proj.weight", "w_down", 3) in assignments
    slots = [(b, i) for _, b, i in assignments]
    assert len(set(slots)) == len(slots)


def test_plan_state_dict_ignores_rotary_buffers_and_accepts_pairs():
    plan = tiny_plan()
    extra = {"model.rotary_emb.inv_freq": (32,), "model.layers.0.self_attn.rotary_emb.inv_freq": (32,)}
    a = W.plan_state_dict(plan, list(shapes_for(plan, extra=extra).items()))
    assert not any("rotary" in k for k, _, _ in a)


def test_plan_state_dict_tied_lm_head():
    plan = tiny_plan()
    a = W.plan_state_dict(plan, shapes_for(plan, tied=True))
    assert ("model.embed_tokens.weight", "lm_head", None) in a
    assert ("model.embed_tokens.weight", "embed_tokens", None) in a


def test_plan_state_dict_missing_names_key_and_buffer():
    plan = tiny_plan()
    with pytest.raises(W.WeightsError, match=r"model\.layers\.2\.mlp\.up_proj\.weight: missing.*'w_up\[2\]'") as e:
        W.plan_state_dict(plan, shapes_for(plan, drop=["model.layers.2.mlp.up_proj.weight"]))
    assert len(e.value.problems) == 1


def test_plan_state_dict_missing_final_norm():
    plan = tiny_plan()
    with pytest.raises(W.WeightsError, match=r"model\.norm\.weight.*'final_norm'"):
        W.plan_state_dict(plan, shapes_for(plan, drop=["model.norm.weight"]))


def test_plan_state_dict_unexpected():
    plan = tiny_plan()
    with pytest.raises(W.WeightsError, match=r"model\.layers\.0\.self_attn\.q_proj\.bias: unexpected"):
        W.plan_state_dict(plan, shapes_for(plan, extra={"model.layers.0.self_attn.q_proj.bias": (256,)}),
                          biases=False)
    with pytest.raises(W.WeightsError, match=r"layer 4 is past the graph's layers = 4"):
        W.plan_state_dict(plan, shapes_for(plan, extra={"model.layers.4.mlp.up_proj.weight": (688, 256)}))


def test_plan_state_dict_shape_mismatch_names_key_and_buffer():
    plan = tiny_plan()
    bad = {"model.layers.1.self_attn.k_proj.weight": (256, 256)}
    with pytest.raises(W.WeightsError, match=r"k_proj\.weight: shape \[256, 256\].*'wk\[1\]' of shape \[128, 256\]"):
        W.plan_state_dict(plan, shapes_for(plan, extra=bad))
    with pytest.raises(W.WeightsError, match=r"lm_head\.weight: shape \[1000, 256\].*'lm_head'"):
        W.plan_state_dict(plan, shapes_for(plan, extra={"lm_head.weight": (1000, 256)}))


def test_plan_state_dict_reports_every_problem_and_duplicates():
    plan = tiny_plan()
    items = list(shapes_for(plan, drop=["model.norm.weight"], extra={"junk": (1,)}).items())
    items.append(("model.embed_tokens.weight", (1024, 256)))
    with pytest.raises(W.WeightsError) as e:
        W.plan_state_dict(plan, items)
    text = "\n".join(e.value.problems)
    assert "given twice" in text and "junk: unexpected" in text and "model.norm.weight: missing" in text
    assert len(e.value.problems) == 3


def test_plan_state_dict_rejects_a_non_llama_plan():
    from dagbuild.load import load_spec
    from dagbuild.plan import plan as make_plan

    other = make_plan(load_spec(SPECS / "chain.yaml"))
    with pytest.raises(W.WeightsError, match="not a Llama decode graph"):
        W.plan_state_dict(other, {})


# ---------------------------------------------------------------------------------------------------------
# conversion (the same code runs on the device with xp = cupy)
# ---------------------------------------------------------------------------------------------------------


def test_convert_to_bf16_matches_the_reference_rounding():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(4096).astype(np.float32)
    x[:4] = [1 + 2.0**-8, 1 + 3 * 2.0**-8, -0.0, np.inf]  # ties to even, signed zero, inf
    out = W.convert(np, x, "f32", "bf16")
    assert out.dtype == np.uint16
    assert np.array_equal(out, ref.f32_to_bf16(x))
    assert np.array_equal(W.convert(np, x.astype(np.float64), "f64", "bf16"), ref.f32_to_bf16(x))
    assert np.array_equal(W.convert(np, x.astype(np.float16), "f16", "bf16"),
                          ref.f32_to_bf16(x.astype(np.float16).astype(np.float32)))
    nan = W.convert(np, np.array([np.nan, -np.nan], np.float32), "f32", "bf16")
    assert np.all(np.isnan(ref.bf16_to_f32(nan)))


def test_convert_from_bf16_bits():
    rng = np.random.default_rng(1)
    bits = ref.f32_to_bf16(rng.standard_normal(1000).astype(np.float32))
    wide = ref.bf16_to_f32(bits)
    assert np.array_equal(W.convert(np, bits, "bf16", "bf16"), bits)
    assert np.array_equal(W.convert(np, bits, "bf16", "f32"), wide)
    assert np.array_equal(W.convert(np, bits, "bf16", "f16"), wide.astype(np.float16))
    assert W.convert(np, bits.view(np.int16), "bf16", "bf16").dtype == np.uint16  # torch hands int16


def test_convert_between_floats():
    x = np.linspace(-3, 3, 101, dtype=np.float64)
    assert W.convert(np, x, "f64", "f32").dtype == np.float32
    assert np.array_equal(W.convert(np, x, "f64", "f16"), x.astype(np.float16))
    with pytest.raises(DagbuildError):
        W.convert(np, x, "f64", "i32")


# ---------------------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------------------


def write_safetensors(path, tensors, align=True):
    """A minimal writer (dtype name, array) for the reader's tests; `align` pads the header like upstream."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (dt, arr) in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    if align:
        text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


@pytest.mark.parametrize("align", [True, False])
def test_read_safetensors(tmp_path, align):
    rng = np.random.default_rng(2)
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    f16 = rng.standard_normal((7,)).astype(np.float16)
    bf = ref.f32_to_bf16(rng.standard_normal((2, 3)).astype(np.float32))
    odd = np.arange(3, dtype=np.uint8)  # puts the next tensor at an odd offset
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"a": ("F32", f32), "odd": ("U8", odd), "b": ("BF16", bf), "c": ("F16", f16)},
                      align=align)
    got = W.read_safetensors(path)
    assert set(got) == {"a", "odd", "b", "c"}
    assert np.array_equal(got["a"], f32) and got["a"].dtype == np.float32
    assert isinstance(got["b"], W.RawBF16) and got["b"].shape == (2, 3) and np.array_equal(got["b"].bits, bf)
    assert np.array_equal(got["c"], f16)


def test_read_safetensors_rejects_garbage(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"\xff" * 16)
    with pytest.raises(W.WeightsError, match="not a safetensors file"):
        W.read_safetensors(p)
    write_safetensors(p, {"a": ("F32", np.zeros(4, np.float32))})
    data = bytearray(p.read_bytes())
    p.write_bytes(bytes(data[:-4]))  # truncated data
    with pytest.raises(W.WeightsError, match="data_offsets"):
        W.read_safetensors(p)


def test_read_safetensors_matches_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(3)
    tensors = {"model.embed_tokens.weight": rng.standard_normal((16, 8)).astype(np.float16),
               "model.norm.weight": rng.standard_normal(8).astype(np.float32),
               "x": np.arange(5, dtype=np.int64)}
    p = tmp_path / "model.safetensors"
    st.save_file(tensors, str(p))
    got = W.read_safetensors(p)
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and np.array_equal(got[k], v)


def test_load_checkpoint_checks_config_before_touching_the_device(tmp_path):
    class FakeExe:
        plan = tiny_plan()

    (tmp_path / "config.json").write_text(json.dumps(TINYLLAMA))
    with pytest.raises(DagbuildError, match="hidden_size = 2048"):
        W.load_checkpoint(FakeExe(), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**W.hf_config_kwargs(FakeExe.plan.dims),
                                                      "rms_norm_eps": 1e-6}))
    with pytest.raises(DagbuildError, match=r"rms_norm_eps = 1e-06 \(const 'rms_eps'\).*--set rms_eps=1e-06"):
        W.load_checkpoint(FakeExe(), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**W.hf_config_kwargs(FakeExe.plan.dims),
                                                      "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(DagbuildError, match="rope_type = 'yarn'"):
        W.load_checkpoint(FakeExe(), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(W.hf_config_kwargs(FakeExe.plan.dims)))
    with pytest.raises(DagbuildError, match="no \\*.safetensors"):
        W.load_checkpoint(FakeExe(), tmp_path)
    with pytest.raises(DagbuildError, match="no config.json"):
        W.load_checkpoint(FakeExe(), tmp_path / "..")
    with pytest.raises(DagbuildError, match="does not exist"):
        W.load_checkpoint(FakeExe(), tmp_path / "nope")


def test_load_checkpoint_validates_tensors_before_touching_the_device(tmp_path):
    class FakeExe:
        plan = tiny_plan()

    (tmp_path / "config.json").write_text(json.dumps(W.hf_config_kwargs(FakeExe.plan.dims)))
    write_safetensors(tmp_path / "model.safetensors",
                      {"model.norm.weight": ("F32", np.ones(256, np.float32)),
                       "model.layers.0.mlp.up_proj.weight": ("BF16", np.zeros((688, 255), np.uint16))})
    with pytest.raises(W.WeightsError) as e:
        W.load_checkpoint(FakeExe(), tmp_path)
    text = str(e.value)
    assert "model.layers.0.mlp.up_proj.weight: shape [688, 255]" in text and "'w_up[0]'" in text
    assert "model.embed_tokens.weight: missing" in text


def test_real_llamaconfig_objects_and_their_json():
    """Whatever transformers is installed (configs need no torch): its LlamaConfig for hf_config_kwargs maps
    back to the same dims, as object and as config.json dict, and its rope settings are read."""
    transformers = pytest.importorskip("transformers")
    kw = W.hf_config_kwargs(TINY)
    cfg = transformers.LlamaConfig(**kw)
    want = {k: TINY[k] for k in W.HF_DIM_FIELDS}
    assert {k: v for k, v in W.dims_from_hf_config(cfg).items() if k != "wt"} == want
    assert {k: v for k, v in W.dims_from_hf_config(cfg.to_dict()).items() if k != "wt"} == want
    with pytest.raises(DagbuildError, match="rope_type = 'yarn'"):
        W.dims_from_hf_config(transformers.LlamaConfig(**{**kw, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(DagbuildError, match="mlp_bias"):
        W.dims_from_hf_config(transformers.LlamaConfig(**{**kw, "mlp_bias": True}))
