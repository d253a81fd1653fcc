"""An HF ``config.json`` → what the Llama decode graph needs: dims, weight type, consts, RoPE table, flags.

Served architectures: ``LlamaForCausalLM`` (Llama 2, 3, 3.1, 3.2, TinyLlama, SmolLM2), ``MistralForCausalLM``
(its sliding window only where the graph is no longer than the window: then it never masks anything), and
``Qwen2ForCausalLM`` (Q/K/V biases; the same window rule). Everything else the graph cannot compute exactly
is refused here, before any GPU work, naming the field and its value: other architectures and MoE, attention
or MLP biases Llama-style (``attention_bias`` adds an O bias too), a rope type other than default / linear /
dynamic / llama3, partial rotary embeddings, activations other than SiLU, quantized checkpoints, and head
dims the kernels do not serve. Pure: reads mappings (a parsed ``config.json``) or HF config objects alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DagbuildError
from .rope import SERVED, Rope

#: model_type → the HF architecture class served for it.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
#: Families that are not served, and why (the refusal says so).
REFUSED_TYPES = {"mixtral": "a mixture-of-experts model", "qwen2_moe": "a mixture-of-experts model",
                 "qwen3_moe": "a mixture-of-experts model", "deepseek_v2": "a mixture-of-experts model",
                 "deepseek_v3": "a mixture-of-experts model", "gemma": "a Gemma (GeLU MLP, scaled embeddings)",
                 "gemma2": "a Gemma 2 (soft-capping, sliding window)", "qwen3": "a Qwen3 (Q/K norms)",
                 "phi3": "a Phi-3 (fused projections, longrope)"}
#: dagbuild dim → the HF config field it comes from.
HF_DIM_FIELDS = {"hidden": "hidden_size", "heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
                 "head_dim": "head_dim", "ffn": "intermediate_size", "vocab": "vocab_size",
                 "layers": "num_hidden_layers"}
#: Defaults the HF config classes use when a config.json omits a field.
HF_DEFAULT_RMS_EPS = 1e-6
HF_DEFAULT_THETA = 10000.0
_DTYPES = {"float32": "f32", "float": "f32", "float16": "f16", "half": "f16", "bfloat16": "bf16"}
_EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


def served_head_dim(head_dim: int) -> bool:
    """What the decode kernels serve (the specs' check says the same): a multiple of 32 up to 128."""
    return head_dim % 32 == 0 and 32 <= head_dim <= 128


@dataclass(frozen=True)
class ModelConfig:
    """What an HF config means for the decode graph."""

    model_type: str
    architecture: str
    dims: dict[str, int]  # hidden, heads, kv_heads, head_dim, ffn, vocab, layers
    wt: str
    rms_eps: float
    rope: Rope
    qkv_bias: bool
    tied: bool
    max_position: int | None
    sliding_window: int | None  # the window when one applies, else None
    eos_ids: tuple[int, ...] = ()
    bos_id: int | None = None

    @property
    def attn_scale(self) -> float:
        """The softmax scale HF's attention uses: head_dim ** -0.5."""
        return float(self.dims["head_dim"]) ** -0.5

    @property
    def consts(self) -> dict[str, float]:
        return {"rms_eps": self.rms_eps, "attn_scale": self.attn_scale}

    def overrides(self) -> dict[str, Any]:
        """Plan overrides (dims, wt, consts) for the decode specs."""
        return {**self.dims, "wt": self.wt, **self.consts}

    def inv_freq(self) -> np.ndarray:
        """The ``rope_inv_freq`` table ([head_dim / 2] f32)."""
        return self.rope.inv_freq(self.dims["head_dim"])

    def check_max_seq(self, max_seq: int, where: str = "HF config") -> None:
        """Refuse a graph length at which the model would not be computed exactly (a sliding window that
        would mask keys, dynamic RoPE past its original context)."""
        if self.sliding_window is not None and max_seq > self.sliding_window:
            raise DagbuildError(
                f"{where} field sliding_window = {self.sliding_window}: the decode graph has no sliding-window "
                f"attention, so it serves this model only while no sequence is longer than the window, but the "
                f"graph is built for max_seq = {max_seq}; build it with --set max_seq={self.sliding_window}")
        self.rope.check_max_seq(max_seq, where)


def field(config: Any, name: str, default: Any = None) -> Any:
    """A config field from a mapping or an HF config object (None → ``default``)."""
    if isinstance(config, Mapping):
        v = config.get(name, default)
    else:
        try:
            v = getattr(config, name, default)
        except Exception:  # a deprecated property that raises
            v = default
    return default if v is None else v


def _rope_dicts(config: Any, where: str) -> list[Mapping]:
    """The rope parameter dicts: ``rope_scaling`` (transformers 4) and ``rope_parameters`` (5, possibly one
    dict per layer type)."""
    out: list[Mapping] = []
    for name in ("rope_scaling", "rope_parameters"):
        d = field(config, name)
        if d is None or d is False or d == 0:
            continue
        if not isinstance(d, Mapping):
            raise DagbuildError(f"{where} field {name} = {d!r}: expected a dict or null")
        if d and all(isinstance(v, Mapping) for v in d.values()):
            out.extend(d.values())
        else:
            out.append(d)
    return out


def _rope(config: Any, max_position: int | None, where: str) -> Rope:
    theta = field(config, "rope_theta")
    found: list[tuple[str, dict]] = []
    for d in _rope_dicts(config, where):
        rope_type = d.get("rope_type", d.get("type")) or "default"
        if rope_type not in SERVED:
            raise DagbuildError(f"{where} field rope_scaling.rope_type = {rope_type!r}: not served (served: "
                                f"{', '.join(SERVED)}; the graph reads a fixed inverse-frequency table and has no "
                                "attention scaling)")
        prf = d.get("partial_rotary_factor")
        if prf is not None and float(prf) != 1.0:
            raise DagbuildError(f"{where} field partial_rotary_factor = {prf}: the graph ropes whole heads")
        if d.get("rope_theta") is not None:
            theta = d["rope_theta"]
        params = {k: v for k, v in d.items() if k not in ("rope_type", "type", "rope_theta")}
        found.append((rope_type, params))
    prf = field(config, "partial_rotary_factor")
    if prf is not None and float(prf) != 1.0:
        raise DagbuildError(f"{where} field partial_rotary_factor = {prf}: the graph ropes whole heads")
    kinds = {(t, json.dumps(p, sort_keys=True, default=str)) for t, p in found}
    if len(kinds) > 1:
        raise DagbuildError(f"{where} field rope_parameters: layers use different rope settings "
                            f"({', '.join(sorted(t for t, _ in kinds))}); the graph has one table")
    theta = HF_DEFAULT_THETA if theta is None else theta
    if isinstance(theta, bool) or not isinstance(theta, int | float) or not math.isfinite(theta) or theta <= 0:
        raise DagbuildError(f"{where} field rope_theta = {theta!r}: expected a positive number")
    rope_type, params = found[0] if found else ("default", {})
    rope = Rope(rope_type, float(theta), params, max_position)
    return rope


def _positive_int(config: Any, name: str, where: str, dim: str | None = None) -> int:
    v = field(config, name)
    if v is None:
        raise DagbuildError(f"{where} has no {name}" + (f" (needed for dim {dim!r})" if dim else ""))
    if isinstance(v, bool) or not isinstance(v, int | float) or int(v) != v or int(v) < 1:
        raise DagbuildError(f"{where} field {name} = {v!r}: expected a positive integer")
    return int(v)


def _wt(config: Any, where: str) -> str:
    for name in ("dtype", "torch_dtype"):  # transformers 5 renamed torch_dtype
        v = field(config, name)
        if v is None:
            continue
        s = str(v).removeprefix("torch.")
        if s == "auto":
            continue
        if s not in _DTYPES:
            raise DagbuildError(f"{where} field {name} = {s!r}: the decode graph takes float32, float16 or "
                                "bfloat16 weights (wt = f32 | f16 | bf16)")
        return _DTYPES[s]
    return "f16"


def _ids(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    vs = v if isinstance(v, list | tuple) else [v]
    return tuple(int(x) for x in vs if isinstance(x, int) and not isinstance(x, bool))


def _window(config: Any, model_type: str, where: str) -> int | None:
    """The sliding window that applies to some layer, or None."""
    sw = field(config, "sliding_window")
    if model_type == "qwen2":
        types = field(config, "layer_types")
        if types is not None:
            on = any(t == "sliding_attention" for t in types)
        else:
            on = bool(field(config, "use_sliding_window", False))
        if not on:
            return None
    if sw is None:
        return None
    if isinstance(sw, bool) or not isinstance(sw, int) or sw < 1:
        raise DagbuildError(f"{where} field sliding_window = {sw!r}: expected a positive integer or null")
    return sw


def from_hf(config: Any, generation: Mapping | None = None, where: str = "HF config") -> ModelConfig:
    """Read an HF config (a ``config.json`` mapping or a transformers config object); ``generation`` is the
    checkpoint's ``generation_config.json`` (its EOS ids win). Raises DagbuildError naming the field and value
    for anything the graph does not serve."""
    model_type = field(config, "model_type") or "llama"
    if model_type in REFUSED_TYPES:
        raise DagbuildError(f"{where} field model_type = {model_type!r}: {REFUSED_TYPES[model_type]} is not served "
                            f"(served: {', '.join(ARCHITECTURES.values())})")
    if model_type not in ARCHITECTURES:
        raise DagbuildError(f"{where} field model_type = {model_type!r}: not served (served: "
                            + ", ".join(f"{k} ({v})" for k, v in ARCHITECTURES.items()) + ")")
    archs = field(config, "architectures")
    if archs:
        if not isinstance(archs, list | tuple) or any(a != ARCHITECTURES[model_type] for a in archs):
            raise DagbuildError(f"{where} field architectures = {archs!r}: dagbuild serves "
                                f"{ARCHITECTURES[model_type]!r} for model_type {model_type!r}")
    for name in _EXPERT_FIELDS:
        v = field(config, name)
        if v not in (None, 0, 1):
            raise DagbuildError(f"{where} field {name} = {v!r}: mixture-of-experts models are not served")
    q = field(config, "quantization_config")
    if q:
        method = q.get("quant_method", "?") if isinstance(q, Mapping) else q
        raise DagbuildError(f"{where} field quantization_config (quant_method {method!r}): quantized checkpoints "
                            "are not served (the graph reads f32, f16 or bf16 weights)")
    dims = {dim: _positive_int(config, name, where, dim) for dim, name in HF_DIM_FIELDS.items()
            if dim not in ("kv_heads", "head_dim")}
    kv = field(config, "num_key_value_heads", dims["heads"])
    if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or dims["heads"] % kv:
        raise DagbuildError(f"{where} field num_key_value_heads = {kv!r}: must divide num_attention_heads = "
                            f"{dims['heads']}")
    dims["kv_heads"] = kv
    head_dim = field(config, "head_dim")
    if head_dim is None:
        if dims["hidden"] % dims["heads"]:
            raise DagbuildError(f"{where} has no head_dim and hidden_size = {dims['hidden']} is not a multiple of "
                                f"num_attention_heads = {dims['heads']}")
        head_dim = dims["hidden"] // dims["heads"]
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or not served_head_dim(head_dim):
        raise DagbuildError(f"{where} field head_dim = {head_dim!r}: the decode kernels serve head_dim 32, 64, 96 "
                            "or 128 (a multiple of 32, at most 128: one head per warp's float4 lanes)")
    dims["head_dim"] = head_dim
    act = field(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise DagbuildError(f"{where} field hidden_act = {act!r}: the decode graph's MLP is SiLU-gated (silu)")
    if field(config, "mlp_bias", False):
        raise DagbuildError(f"{where} field mlp_bias = True: the decode graph's MLP has no biases")
    if model_type != "qwen2" and field(config, "attention_bias", False):
        raise DagbuildError(f"{where} field attention_bias = True: that adds an o_proj bias, which the decode graph "
                            "does not have (Qwen2's Q/K/V-only biases are served)")
    eps = field(config, "rms_norm_eps", HF_DEFAULT_RMS_EPS)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not math.isfinite(eps) or eps <= 0:
        raise DagbuildError(f"{where} field rms_norm_eps = {eps!r}: expected a positive number")
    max_pos = field(config, "max_position_embeddings")
    max_pos = int(max_pos) if isinstance(max_pos, int) and not isinstance(max_pos, bool) else None
    rope = _rope(config, max_pos, where)
    rope.inv_freq(head_dim)  # checks the type's parameters now, not at load time
    gen = generation or {}
    eos = _ids(gen.get("eos_token_id")) or _ids(field(config, "eos_token_id"))
    bos = gen.get("bos_token_id", field(config, "bos_token_id"))
    return ModelConfig(model_type, ARCHITECTURES[model_type], dims, _wt(config, where), float(eps), rope,
                       qkv_bias=model_type == "qwen2", tied=bool(field(config, "tie_word_embeddings", False)),
                       max_position=max_pos, sliding_window=_window(config, model_type, where), eos_ids=eos,
                       bos_id=bos if isinstance(bos, int) and not isinstance(bos, bool) else None)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DagbuildError(f"{path}: cannot read {what} ({e})") from None
    if not isinstance(data, dict):
        raise DagbuildError(f"{path}: {what} is not a JSON object")
    return data


def read_hf_config(path: str | Path) -> ModelConfig:
    """:func:`from_hf` of a ``config.json`` (or the directory holding one, with its ``generation_config.json``
    when there is one)."""
    path = Path(path)
    cfg = path / "config.json" if path.is_dir() else path
    if not cfg.is_file():
        raise DagbuildError(f"{str(path)!r}: no config.json" + (" in that directory" if path.is_dir() else ""))
    gen_path = cfg.parent / "generation_config.json"
    gen = _read_json(gen_path, "generation_config.json") if gen_path.is_file() else None
    return from_hf(_read_json(cfg, "config.json"), gen, where=str(cfg))


def check_plan(model: ModelConfig, dims: Mapping[str, int], consts: Mapping[str, float] | None,
               where: str = "the checkpoint") -> None:
    """The plan was built for this model: every dim and const equal (``consts`` None: dims only), max_seq
    within what the model allows."""
    for dim, name in HF_DIM_FIELDS.items():
        if dim not in dims:
            raise DagbuildError(f"the graph has no dim {dim!r}: not a Llama decode graph")
        if model.dims[dim] != dims[dim]:
            raise DagbuildError(f"{where}: config.json has {name} = {model.dims[dim]} (dim {dim!r}), but the graph "
                                f"was built with {dim} = {dims[dim]}; build it with --set {dim}={model.dims[dim]}")
    for name, want in model.consts.items() if consts is not None else ():
        if name not in consts:
            raise DagbuildError(f"the graph has no const {name!r}: its {name} cannot follow the checkpoint")
        if not math.isclose(consts[name], want, rel_tol=1e-6):
            field_name = "rms_norm_eps" if name == "rms_eps" else "head_dim ** -0.5"
            raise DagbuildError(f"{where}: {field_name} = {want:g} (const {name!r}), but the graph was built with "
                                f"{name} = {consts[name]:g}; build it with --set {name}={want!r}")
    if "max_seq" in dims:
        model.check_max_seq(int(dims["max_seq"]), where)
