"""Weights for the Llama decode graph: HF checkpoints, HF state dicts, random weights.

Every weight buffer of ``specs/llama_decode.yaml`` is filled from the HF ``LlamaForCausalLM`` tensor of the
same role (:func:`hf_key_map`). Per-layer tensors go to one slice of a stacked buffer (``wq[l]``). A plan may
instead hold some roles packed (``specs/llama_decode_fused.yaml``: :data:`PACKED_BUFFERS`): ``wqkv[l]`` is
``wq[l]``, ``wk[l]``, ``wv[l]`` with their rows concatenated, ``w_gate_up[l]`` is ``w_gate[l]`` and ``w_up[l]``
with their rows interleaved (row 2j gate, row 2j+1 up); loading and random weights still speak HF roles and
write each role's rows into the packed buffer (:func:`weight_view`, :func:`pack_qkv`, :func:`pack_gate_up`). Values are
converted on the GPU to the buffer's type (``wt``: f32, f16, or bf16 held as raw uint16 bits, rounded to
nearest even). What can be checked without a GPU is pure: :func:`dims_from_hf_config` (the config against
the constants the spec bakes in), :func:`plan_state_dict` (which tensor fills which buffer slice; missing,
unexpected and mis-shaped tensors) and :func:`read_safetensors` (the file format, memory-mapped, bf16 kept
as its bits so neither torch nor the ``safetensors`` package is needed).

All device work runs on CuPy's current stream and ends with a device-wide synchronize, so the graph, which
launches on its own non-blocking stream, always sees the finished weights.
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .. import dtypes
from ..errors import DagbuildError
from .config import HF_DIM_FIELDS, ModelConfig, check_plan, from_hf, read_hf_config
from .rope import Rope

__all__ = [
    "HF_DIM_FIELDS",
    "LAYERED_BUFFERS",
    "NORM_BUFFERS",
    "PACKED_BUFFERS",
    "WEIGHT_BUFFERS",
    "RawBF16",
    "WeightsError",
    "check_config_dims",
    "checkpoint_folder",
    "convert",
    "dims_from_hf_config",
    "hf_config_kwargs",
    "hf_key_map",
    "load_checkpoint",
    "load_state_dict",
    "pack_gate_up",
    "pack_qkv",
    "plan_state_dict",
    "random_hf_model",
    "random_weights",
    "read_safetensors",
    "unpack_gate_up",
    "unpack_qkv",
    "weight_buffer_names",
    "weight_dtype",
    "weight_shape",
    "weight_view",
]

#: Every weight buffer of the decode spec, in a fixed order (random_weights draws them in this order).
WEIGHT_BUFFERS = ("embed_tokens", "attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down",
                  "final_norm", "lm_head")
#: Buffers stacked over layers: [layers, ...], one slice per HF layer tensor.
LAYERED_BUFFERS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")
#: RMSNorm weights (random_weights draws them around 1, not around 0).
NORM_BUFFERS = ("attn_norm", "mlp_norm", "final_norm")
#: Packed weight buffers (specs/llama_decode_fused.yaml) -> the HF-role buffers they hold, in row order.
#: wqkv[l] = [wq[l]; wk[l]; wv[l]] (rows concatenated); w_gate_up[l] rows interleaved: 2j = w_gate[l][j],
#: 2j+1 = w_up[l][j].
PACKED_BUFFERS = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}
#: the weight matrices a decode step streams (the GEMV traffic that bandwidth figures are measured against)
MATRIX_BUFFERS = frozenset({"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head", *PACKED_BUFFERS})
_PACKED_IN = {role: packed for packed, roles in PACKED_BUFFERS.items() for role in roles}

#: The decode specs' default consts and RoPE (the random-weights demo model's).
SPEC_RMS_EPS = 1e-5
SPEC_ROPE_THETA = 10000.0
#: Optional buffers the loader writes besides the weights: the Q/K/V biases (roles bq, bk, bv packed as
#: [bq; bk; bv] per layer, zeros for models without them) and the RoPE table (from the config).
BIAS_BUFFER = "qkv_bias"
BIAS_ROLES = ("bq", "bk", "bv")
ROPE_BUFFER = "rope_inv_freq"

_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo",
    "post_attention_layernorm.weight": "mlp_norm",
    "mlp.gate_proj.weight": "w_gate",
    "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
}
_EMBED_KEY = "model.embed_tokens.weight"
_LM_HEAD_KEY = "lm_head.weight"
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
_BIAS_TENSORS = {"self_attn.q_proj.bias": "bq", "self_attn.k_proj.bias": "bk", "self_attn.v_proj.bias": "bv"}


class WeightsError(DagbuildError):
    """Weights do not fit the graph. ``problems`` lists each one (each names the HF key and the buffer)."""

    def __init__(self, problems: list[str] | str, header: str = ""):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        shown = self.problems[:12]
        more = len(self.problems) - len(shown)
        body = "\n".join(f"  - {p}" for p in shown) + (f"\n  ... and {more} more" if more > 0 else "")
        if len(self.problems) == 1 and not header:
            super().__init__(self.problems[0])
        else:
            super().__init__(f"{header or 'weights do not fit the graph'}:\n{body}")


class RawBF16(NamedTuple):
    """bfloat16 data carried as its uint16 bit patterns (NumPy has no bfloat16)."""

    bits: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.bits.shape)


# ---------------------------------------------------------------------------------------------------------
# HF config (the rules live in .config; these keep the dims-only view)
# ---------------------------------------------------------------------------------------------------------


def dims_from_hf_config(config: Any) -> dict[str, Any]:
    """Spec overrides (hidden, heads, kv_heads, head_dim, ffn, vocab, layers, wt) for an HF config (a config
    object or the dict of a ``config.json``); raises DagbuildError naming the field for one the graph does
    not serve (:func:`dagbuild.llama.config.from_hf`). Its consts and RoPE table: ``from_hf(config)``."""
    m = from_hf(config)
    return {**m.dims, "wt": m.wt}


def check_config_dims(config: Any, dims: Mapping[str, int], where: str = "the checkpoint") -> dict[str, Any]:
    """:func:`dims_from_hf_config`, then every dim compared with a graph's ``dims`` (and its max_seq with the
    model's sliding window / dynamic RoPE); returns the config's dims."""
    m = from_hf(config)
    check_plan(m, dims, None, where)
    return {**m.dims, "wt": m.wt}


def hf_config_kwargs(dims: Mapping[str, Any], consts: Mapping[str, float] | None = None) -> dict[str, Any]:
    """``LlamaConfig(**kwargs)`` for a model of the graph's shape with the default rope (theta 10000) and the
    graph's rms_eps (1e-5 unless ``consts`` says otherwise)."""
    return {
        "vocab_size": int(dims["vocab"]), "hidden_size": int(dims["hidden"]),
        "intermediate_size": int(dims["ffn"]), "num_hidden_layers": int(dims["layers"]),
        "num_attention_heads": int(dims["heads"]), "num_key_value_heads": int(dims["kv_heads"]),
        "head_dim": int(dims["head_dim"]), "max_position_embeddings": int(dims.get("max_seq", 2048)),
        "rms_norm_eps": float((consts or {}).get("rms_eps", SPEC_RMS_EPS)), "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    }


# ---------------------------------------------------------------------------------------------------------
# Packed weights (pure: NumPy or CuPy arrays alike)
# ---------------------------------------------------------------------------------------------------------


def pack_qkv(wq: Any, wk: Any, wv: Any, xp: Any = np) -> Any:
    """wqkv = the rows of wq, then wk, then wv: [..., (heads + 2*kv_heads) * head_dim, hidden]."""
    return xp.concatenate([wq, wk, wv], axis=-2)


def unpack_qkv(wqkv: Any, heads: int, kv_heads: int, head_dim: int) -> tuple[Any, Any, Any]:
    """(wq, wk, wv) as views of a packed wqkv."""
    q, kv = heads * head_dim, kv_heads * head_dim
    if wqkv.shape[-2] != q + 2 * kv:
        raise WeightsError(f"wqkv has {wqkv.shape[-2]} rows; heads = {heads}, kv_heads = {kv_heads}, head_dim = "
                           f"{head_dim} need {q + 2 * kv}")
    return wqkv[..., :q, :], wqkv[..., q:q + kv, :], wqkv[..., q + kv:, :]


def pack_gate_up(gate: Any, up: Any, xp: Any = np) -> Any:
    """w_gate_up = gate and up rows interleaved (row 2j = gate[j], row 2j+1 = up[j]): [..., 2*ffn, hidden]."""
    if gate.shape != up.shape:
        raise WeightsError(f"gate {list(gate.shape)} and up {list(up.shape)} differ in shape")
    return xp.stack([gate, up], axis=-2).reshape(*gate.shape[:-2], 2 * gate.shape[-2], gate.shape[-1])


def unpack_gate_up(w: Any) -> tuple[Any, Any]:
    """(gate, up) as (strided) views of a packed w_gate_up."""
    if w.shape[-2] % 2:
        raise WeightsError(f"w_gate_up has an odd row count {w.shape[-2]}")
    return w[..., 0::2, :], w[..., 1::2, :]


def _role_shapes(dims: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Per-layer shapes of the roles that can be packed, from the dims."""
    hidden, hd = int(dims["hidden"]), int(dims["head_dim"])
    q, kv = int(dims["heads"]) * hd, int(dims["kv_heads"]) * hd
    return {"wq": (q, hidden), "wk": (kv, hidden), "wv": (kv, hidden), "w_gate": (int(dims["ffn"]), hidden),
            "w_up": (int(dims["ffn"]), hidden), "bq": (q,), "bk": (kv,), "bv": (kv,)}


def _holder(plan: Any, role: str) -> str | None:
    """The buffer of ``plan`` that holds HF role ``role`` (itself, or its packed buffer), or None."""
    if role in plan.buffers:
        return role
    if role in BIAS_ROLES:
        return BIAS_BUFFER if BIAS_BUFFER in plan.buffers else None
    packed = _PACKED_IN.get(role)
    return packed if packed is not None and packed in plan.buffers else None


def _check_weight_buffers(plan: Any) -> None:
    """Raise WeightsError unless every HF role has a buffer (its own or a packed one of the right shape)."""
    name = getattr(plan, "name", "?")
    dims = plan.dims
    missing = [b for b in WEIGHT_BUFFERS if _holder(plan, b) is None]
    missing += [f"dim {d!r}" for d in ("layers",) if d not in dims]
    if missing:
        raise WeightsError(f"graph {name!r} is not a Llama decode graph: it has no {missing[0]!r}")
    for packed, roles in PACKED_BUFFERS.items():
        if packed not in plan.buffers:
            continue
        absent = [d for d in ("hidden", "heads", "kv_heads", "head_dim", "ffn") if d not in dims]
        if absent:
            raise WeightsError(f"graph {name!r}: packed buffer {packed!r} needs dim {absent[0]!r}")
        shapes = _role_shapes(dims)
        want = (int(dims["layers"]), sum(shapes[r][0] for r in roles), int(dims["hidden"]))
        got = tuple(int(s) for s in plan.buffers[packed].shape)
        if got != want:
            raise WeightsError(f"graph {name!r}: packed buffer {packed!r} has shape {list(got)}, but "
                               f"{' + '.join(roles)} need {list(want)}")


def matrix_bytes(op: Any) -> int:
    """Bytes of weight matrices a plan node's kernel reads (0 for other nodes): its share of a step's floor."""
    return sum(a.view.nbytes for a in getattr(op, "args", ()) if a.view is not None and a.view.buffer in MATRIX_BUFFERS)


def weight_buffer_names(plan: Any) -> list[str]:
    """The plan's buffers that hold weights (packed ones in place of the roles they hold), in
    WEIGHT_BUFFERS order."""
    out: list[str] = []
    for role in WEIGHT_BUFFERS:
        b = _holder(plan, role)
        if b is not None and b not in out:
            out.append(b)
    return out


def weight_shape(plan: Any, role: str) -> tuple[int, ...]:
    """The shape HF role ``role`` has in ``plan`` (the whole stacked buffer for layered roles), whether it
    has a buffer of its own or is packed."""
    if role in plan.buffers:
        return tuple(int(s) for s in plan.buffers[role].shape)
    holder = _holder(plan, role)
    if holder is None:
        raise WeightsError(f"graph {getattr(plan, 'name', '?')!r} has no buffer for {role!r}")
    return (int(plan.dims["layers"]), *_role_shapes(plan.dims)[role])


def weight_dtype(plan: Any, role: str) -> str:
    """The element type of the buffer that holds HF role ``role``."""
    holder = _holder(plan, role)
    if holder is None:
        raise WeightsError(f"graph {getattr(plan, 'name', '?')!r} has no buffer for {role!r}")
    return plan.buffers[holder].dtype


def weight_view(buffers: Mapping[str, Any], dims: Mapping[str, Any], role: str, idx: int | None) -> Any:
    """The array view (NumPy or CuPy) through which HF role ``role`` (layer ``idx``, or None for an unlayered
    role) is read or written: a slice of its own buffer, or of the packed buffer that holds it (a strided
    view for w_gate / w_up)."""
    if role in buffers:
        return buffers[role] if idx is None else buffers[role][idx]
    if role in BIAS_ROLES and BIAS_BUFFER in buffers and idx is not None:
        q, kv = int(dims["heads"]) * int(dims["head_dim"]), int(dims["kv_heads"]) * int(dims["head_dim"])
        lo = {"bq": 0, "bk": q, "bv": q + kv}[role]
        return buffers[BIAS_BUFFER][idx][lo:lo + (q if role == "bq" else kv)]
    packed = _PACKED_IN.get(role)
    if packed is None or packed not in buffers or idx is None:
        raise WeightsError(f"no buffer holds {role!r}" + ("" if idx is not None else " (unlayered)"))
    whole = buffers[packed][idx]
    if packed == "wqkv":
        parts = unpack_qkv(whole, int(dims["heads"]), int(dims["kv_heads"]), int(dims["head_dim"]))
        return parts[("wq", "wk", "wv").index(role)]
    gate, up = unpack_gate_up(whole)
    return gate if role == "w_gate" else up


# ---------------------------------------------------------------------------------------------------------
# State dict planning (pure)
# ---------------------------------------------------------------------------------------------------------


def hf_key_map(layers: int, biases: bool = False) -> dict[str, tuple[str, int | None]]:
    """HF state-dict key (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``: the same names;
    ``biases``: Qwen2's Q/K/V biases too) -> (role, layer index or None)."""
    out: dict[str, tuple[str, int | None]] = {_EMBED_KEY: ("embed_tokens", None)}
    tensors = {**_LAYER_TENSORS, **(_BIAS_TENSORS if biases else {})}
    for i in range(layers):
        for suffix, buf in tensors.items():
            out[f"model.layers.{i}.{suffix}"] = (buf, i)
    out["model.norm.weight"] = ("final_norm", None)
    out[_LM_HEAD_KEY] = ("lm_head", None)
    return out


def _ignored(key: str) -> bool:
    """Buffers HF keeps in some versions' state dicts that carry no weights (rotary tables)."""
    return ".rotary_emb." in key or key.startswith("rotary_emb.")


def _target(plan: Any, role: str, idx: int | None) -> str:
    """How messages name the slice role ``role`` (layer ``idx``) fills: ``wq[3]``, or ``wqkv[3] (wq rows)``."""
    holder = role if role in plan.buffers else (BIAS_BUFFER if role in BIAS_ROLES else _PACKED_IN.get(role, role))
    where = f"{holder}[{idx}]" if idx is not None else holder
    return where if holder == role else f"{where} ({role} rows)"


def plan_state_dict(plan: Any, names_and_shapes: Mapping[str, Any] | Iterable[tuple[str, Any]], *,
                    biases: bool | None = None, shared_head: bool = False) -> list[tuple[str, str, int | None]]:
    """Which HF tensor fills which buffer slice: a list of (hf_key, buffer, layer index or None).

    ``buffer`` is the HF role (the unfused spec's buffer name, e.g. ``wq``); where the plan packs that role
    into another buffer (:data:`PACKED_BUFFERS`), :func:`weight_view` gives the slice it fills.

    ``plan`` is the decode graph's plan (or anything with ``.dims`` and ``.buffers[name].shape``).
    ``names_and_shapes``: HF key -> shape (a mapping or (key, shape) pairs). Every weight buffer slice must be
    filled exactly once: missing tensors, unexpected ones, duplicates and shape mismatches raise
    :class:`WeightsError`, each problem naming the HF key and the buffer. Rotary ``inv_freq`` buffers are
    ignored; without ``lm_head.weight`` the LM head is tied to ``model.embed_tokens.weight``.
    ``biases``: Qwen2's ``q/k/v_proj.bias`` are expected (True), refused (False), or expected in every layer
    when any is given (None); they fill ``qkv_bias``. ``shared_head``: ``lm_head`` and ``embed_tokens`` are one
    buffer (tied embeddings, no copy), so nothing is assigned to the LM head.
    """
    dims = plan.dims
    _check_weight_buffers(plan)
    layers = int(dims["layers"])
    items = list(names_and_shapes.items()) if isinstance(names_and_shapes, Mapping) else list(names_and_shapes)
    if biases is None:
        biases = any(str(k).endswith(tuple(_BIAS_TENSORS)) for k, _ in items)
    if biases and BIAS_BUFFER not in plan.buffers:
        raise WeightsError(f"the checkpoint has Q/K/V biases, but graph {getattr(plan, 'name', '?')!r} has no "
                           f"{BIAS_BUFFER!r} buffer to hold them")
    keymap = hf_key_map(layers, biases)
    problems: list[str] = []
    seen: dict[str, tuple] = {}
    for key, shape in items:
        if key in seen:
            problems.append(f"{key}: given twice")
            continue
        seen[key] = tuple(int(s) for s in shape)

    def expected(buf: str, idx: int | None) -> tuple[int, ...]:
        shape = weight_shape(plan, buf)
        return shape[1:] if idx is not None else shape

    out: list[tuple[str, str, int | None]] = []
    for key, shape in seen.items():
        if _ignored(key):
            continue
        if key not in keymap:
            m = _LAYER_KEY.match(key)
            if m and int(m.group(1)) >= layers:
                problems.append(f"{key}: unexpected tensor — layer {m.group(1)} is past the graph's "
                                f"layers = {layers} (build with --set layers=...)")
            else:
                problems.append(f"{key}: unexpected tensor — no buffer of the decode graph takes it")
            continue
        buf, idx = keymap[key]
        want = expected(buf, idx)
        if shape != want:
            target = _target(plan, buf, idx)
            problems.append(f"{key}: shape {list(shape)} does not fit buffer {target!r} of shape {list(want)}")
            continue
        out.append((key, buf, idx))
    if shared_head:
        out = [a for a in out if a[1] != "lm_head"]  # the LM head reads the embedding table itself
    elif _LM_HEAD_KEY not in seen and _EMBED_KEY in seen:
        # tied embeddings: the checkpoint stores the table once
        if seen[_EMBED_KEY] == expected("lm_head", None):
            out.append((_EMBED_KEY, "lm_head", None))
        else:
            problems.append(f"{_EMBED_KEY}: (tied LM head) shape {list(seen[_EMBED_KEY])} does not fit buffer "
                            f"'lm_head' of shape {list(expected('lm_head', None))}")
    missing = [k for k in keymap if k not in seen and not (k == _LM_HEAD_KEY and _EMBED_KEY in seen)]
    for key in missing:
        buf, idx = keymap[key]
        target = _target(plan, buf, idx)
        problems.append(f"{key}: missing — nothing fills buffer {target!r}")
    if problems:
        raise WeightsError(problems, header=f"{len(problems)} problem(s) loading weights into graph "
                                            f"{getattr(plan, 'name', '?')!r}")
    return out


# ---------------------------------------------------------------------------------------------------------
# Conversion (xp = numpy or cupy, so the same code runs on the host in tests and on the device)
# ---------------------------------------------------------------------------------------------------------


def convert(xp: Any, arr: Any, src: str, dst: str) -> Any:
    """``arr`` of element kind ``src`` (f64 | f32 | f16 | bf16 bits) as buffer type ``dst`` (f32 | f16 | bf16)."""
    if dst not in ("f32", "f16", "bf16"):
        raise DagbuildError(f"weight buffers must be f32, f16 or bf16, not {dst}")
    if src == "bf16":
        if dst == "bf16":
            return arr.view(xp.uint16)
        wide = dtypes.bf16_to_f32(xp, arr.view(xp.uint16))
        return wide if dst == "f32" else wide.astype(xp.float16)
    if dst == "f32":
        return arr.astype(xp.float32, copy=False)
    if dst == "f16":
        return arr.astype(xp.float16, copy=False)
    return dtypes.bf16_bits(xp, xp.ascontiguousarray(arr.astype(xp.float32, copy=False)))


_NP_KINDS = {np.dtype(np.float64): "f64", np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}


def _is_torch(v: Any) -> bool:
    return type(v).__module__.startswith("torch") and hasattr(v, "detach")


def _to_device(v: Any, key: str, buf: str) -> tuple[Any, str]:
    """One state-dict value as a CuPy array on the device (raw, unconverted) and its element kind."""
    import cupy

    if isinstance(v, RawBF16):
        return cupy.asarray(np.require(v.bits, np.uint16, ["C", "A"])), "bf16"
    if _is_torch(v):
        import torch

        t = v.detach()
        if t.device.type not in ("cpu", "cuda"):
            raise WeightsError(f"{key}: a tensor on device {t.device} (buffer {buf!r}); pass CPU or CUDA tensors")
        kinds = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
        kind = kinds.get(t.dtype)
        if kind is None:
            raise WeightsError(f"{key}: dtype {t.dtype} cannot fill buffer {buf!r} (float32/16, bfloat16, float64)")
        if kind == "bf16":
            t = t.view(torch.int16)
        if t.device.type == "cuda":
            if not t.is_contiguous():
                t = t.contiguous()
                torch.cuda.current_stream(t.device).synchronize()
            arr = cupy.asarray(t)  # zero-copy: the CuPy array keeps the tensor alive
        else:
            t = t.contiguous()
            arr = cupy.asarray(t.numpy())
        return (arr.view(cupy.uint16) if kind == "bf16" else arr), kind
    if isinstance(v, np.ndarray):
        if v.dtype.name == "bfloat16":  # ml_dtypes
            return cupy.asarray(np.require(v, None, ["C", "A"]).view(np.uint16)), "bf16"
        kind = _NP_KINDS.get(v.dtype)
        if kind is None:
            raise WeightsError(f"{key}: NumPy dtype {v.dtype} cannot fill buffer {buf!r} (float64/32/16; bf16 as "
                               "RawBF16 bits)")
        return cupy.asarray(np.require(v, None, ["C", "A"])), kind
    if hasattr(v, "__cuda_array_interface__") or hasattr(v, "__dlpack__"):
        arr = cupy.asarray(v) if hasattr(v, "__cuda_array_interface__") else cupy.from_dlpack(v)
        kind = _NP_KINDS.get(np.dtype(arr.dtype))
        if kind is None:
            raise WeightsError(f"{key}: dtype {arr.dtype} cannot fill buffer {buf!r}")
        return arr, kind
    raise WeightsError(f"{key}: cannot read a {type(v).__name__} into buffer {buf!r} (torch tensor, NumPy/CuPy "
                       "array, or RawBF16)")


def _sync_torch(state: Mapping[str, Any]) -> None:
    torch = sys.modules.get("torch")
    if torch is None:
        return
    if any(_is_torch(v) and v.device.type == "cuda" for v in state.values()):
        torch.cuda.synchronize()


def shares_head(exe: Any) -> bool:
    """Whether ``exe``'s LM head and embedding table are one buffer (tied embeddings, see :func:`tied_bound`)."""
    b = getattr(exe, "buffers", {})
    if "lm_head" not in b or "embed_tokens" not in b:
        return False
    return int(b["lm_head"].data.ptr) == int(b["embed_tokens"].data.ptr)


def tied_bound(plan: Any) -> dict[str, Any]:
    """``bound=`` for an Executable of a tied-embeddings model: one device array serves as both
    ``embed_tokens`` and ``lm_head`` (both only read), so the table is held once and loaded once."""
    import cupy

    from ..dtypes import NP_DTYPE

    e, h = plan.buffers["embed_tokens"], plan.buffers["lm_head"]
    if (e.dtype, e.shape) != (h.dtype, h.shape):
        raise WeightsError(f"tied embeddings: embed_tokens {e.dtype}{list(e.shape)} and lm_head "
                           f"{h.dtype}{list(h.shape)} differ")
    table = cupy.zeros(e.shape, dtype=NP_DTYPE[e.dtype])
    cupy.cuda.Device().synchronize()
    return {"embed_tokens": table, "lm_head": table}


def write_model_tables(exe: Any, rope: Rope | None = None, zero_bias: bool = True) -> None:
    """The loader's non-weight inputs: ``rope_inv_freq`` (``rope``'s table; HF's default rope, theta 10000,
    when None) and, with ``zero_bias``, a zero ``qkv_bias`` (models without Q/K/V biases)."""
    import cupy

    b = exe.buffers
    exe.synchronize()
    if ROPE_BUFFER in b:
        table = (rope or Rope()).inv_freq(int(exe.plan.dims["head_dim"]))
        if table.shape != tuple(b[ROPE_BUFFER].shape):
            raise WeightsError(f"buffer {ROPE_BUFFER!r} has shape {list(b[ROPE_BUFFER].shape)}; the RoPE table has "
                               f"{table.shape[0]} entries (head_dim / 2)")
        b[ROPE_BUFFER][...] = cupy.asarray(table)
    if zero_bias and BIAS_BUFFER in b:
        b[BIAS_BUFFER].fill(0)
    cupy.cuda.Device().synchronize()


def load_state_dict(exe: Any, state: Mapping[str, Any], config: Any = None
                    ) -> list[tuple[str, str, int | None]]:
    """Fill every weight buffer of ``exe`` from HF state-dict tensors (torch CPU/CUDA tensors, NumPy arrays,
    CuPy arrays or :class:`RawBF16`), converting to each buffer's type on the GPU. Checks everything with
    :func:`plan_state_dict` before copying anything. Roles a plan packs (``wqkv``, ``w_gate_up``) are written
    into their rows of the packed buffer (:func:`weight_view`); Q/K/V biases into ``qkv_bias`` (zeros when
    the state has none); the RoPE table from ``config`` (an HF config object or config.json dict, or a
    :class:`ModelConfig`; first checked against the plan's dims, consts and max_seq), or HF's default rope
    (theta 10000) without one. Returns the (hf_key, role, index) assignments."""
    model = config if isinstance(config, ModelConfig) or config is None else from_hf(config)
    if model is not None:
        check_plan(model, exe.plan.dims, getattr(exe.plan, "consts", {}))
    shared = shares_head(exe)
    if shared and model is not None and not model.tied:
        raise WeightsError("the graph's lm_head and embed_tokens are one buffer (tied), but the config has "
                           "tie_word_embeddings = False")
    assignments = plan_state_dict(exe.plan, {k: tuple(v.shape) for k, v in state.items()},
                                  biases=None if model is None else model.qkv_bias, shared_head=shared)
    import cupy

    _sync_torch(state)
    exe.synchronize()  # the graph may still be reading the buffers
    write_model_tables(exe, None if model is None else model.rope,
                       zero_bias=not any(buf in BIAS_ROLES for _, buf, _ in assignments))
    keep = []  # device memory owned by torch (or the caller) stays referenced until the copies are done
    try:
        for key, buf, idx in assignments:
            dtype = weight_dtype(exe.plan, buf)
            dst = weight_view(exe.buffers, exe.plan.dims, buf, idx)
            arr, kind = _to_device(state[key], key, buf)
            dst[...] = convert(cupy, arr, kind, dtype).reshape(dst.shape)
            v = state[key]
            if (v.device.type == "cuda") if _is_torch(v) else not isinstance(v, (np.ndarray, RawBF16)):
                keep.append(arr)  # memory the caller owns (a CUDA tensor, a device array)
            del arr  # an upload from the host: CuPy's pool reuses it only on this stream, after the copy
    finally:
        cupy.cuda.Device().synchronize()
    return assignments


# ---------------------------------------------------------------------------------------------------------
# safetensors (the format is an 8-byte header length, a JSON header, then raw little-endian tensor data)
# ---------------------------------------------------------------------------------------------------------

_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
              "I16": "<i2", "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "?"}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray | RawBF16]:
    """Every tensor of a ``.safetensors`` file, memory-mapped (nothing is read until it is used); BF16
    tensors come as :class:`RawBF16`."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 1 << 28):
                raise WeightsError(f"{path}: not a safetensors file (header length {n} past the file's end)")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: cannot read as safetensors ({e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: the safetensors header is not a JSON object")
    base = 8 + n
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > base else np.zeros(0, np.uint8)
    out: dict[str, np.ndarray | RawBF16] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dt, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        if dt not in _ST_DTYPES:
            raise WeightsError(f"{path}: tensor {name!r} has dtype {dt}, which dagbuild cannot read")
        np_dt = np.dtype(_ST_DTYPES[dt])
        count = math.prod(shape)
        if end - begin != count * np_dt.itemsize or base + end > size or begin < 0:
            raise WeightsError(f"{path}: tensor {name!r}: data_offsets {[begin, end]} do not hold {dt} {list(shape)}")
        arr = np.frombuffer(mm, dtype=np_dt, count=count, offset=base + begin).reshape(shape)
        out[name] = RawBF16(arr) if dt == "BF16" else arr
    return out


def checkpoint_folder(path: str | Path) -> Path:
    """The folder of a checkpoint (config.json, tokenizer.json, ...): ``path`` itself, or a ``.safetensors``
    file's folder."""
    path = Path(path)
    return path.parent if path.is_file() else path


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: those ``model.safetensors.index.json`` names (sharded), else
    ``model.safetensors``, else every ``*.safetensors`` of the directory (``path`` may be one file). Other
    files in the folder (e.g. Mistral's ``consolidated.safetensors``) are not read when an index or
    ``model.safetensors`` says which files hold the model."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise WeightsError(f"checkpoint {str(path)!r} does not exist")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise WeightsError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        bad = [n for n in names if not isinstance(n, str) or Path(n).name != n]
        if bad:
            raise WeightsError(f"{index}: shard name {bad[0]!r} is not a file name in the checkpoint directory")
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise WeightsError(f"{index} names shard {missing[0]!r}, which is not in {str(path)!r}")
        return [path / n for n in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found {', '.join(others[:3])}: convert PyTorch .bin checkpoints to safetensors)" if others else ""
        raise WeightsError(f"checkpoint {str(path)!r} has no *.safetensors file{hint}")
    return files


def load_checkpoint(exe: Any, path: str | Path) -> list[tuple[str, str, int | None]]:
    """Load an HF checkpoint directory (``config.json`` + safetensors, sharded or not) into ``exe``.

    config.json (with generation_config.json) is read and checked against the graph's dims, consts and
    max_seq first (:func:`dagbuild.llama.config.check_plan`); then the tensors of the checkpoint's files
    (:func:`checkpoint_files`) go through :func:`load_state_dict`, which also writes the RoPE table and the
    biases. ``path`` may also be one ``.safetensors`` file (its folder's config.json is used when there is one;
    without one, the default rope and the plan's consts are trusted)."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"checkpoint {str(path)!r} does not exist")
    folder = checkpoint_folder(path)
    model = None
    if (folder / "config.json").is_file():
        model = read_hf_config(folder)
        check_plan(model, exe.plan.dims, getattr(exe.plan, "consts", {}), where=f"checkpoint {str(folder)!r}")
    elif path.is_dir():
        raise WeightsError(f"checkpoint {str(path)!r} has no config.json")
    files = checkpoint_files(path)
    state: dict[str, Any] = {}
    for f in files:
        for key, value in read_safetensors(f).items():
            if key in state:
                raise WeightsError(f"{key}: in more than one safetensors file (second: {f.name})")
            state[key] = value
    return load_state_dict(exe, state, model)


# ---------------------------------------------------------------------------------------------------------
# Random weights
# ---------------------------------------------------------------------------------------------------------


def random_weights(exe: Any, seed: int, std: float = 0.02, rope: Rope | None = None) -> None:
    """Fill every weight buffer on the GPU: normal(0, std) for matrices and tables, 1 + 0.1 normal for the
    RMSNorm weights, drawn in f32 one layer slice at a time (in WEIGHT_BUFFERS order) and converted to the
    buffer's type. The same seed and dims give the same weights, packed or not: a packed plan (wqkv,
    w_gate_up) gets exactly the unfused plan's wq, wk, wv, w_gate, w_up, written in the packed layout.
    No Q/K/V biases (zeros); the RoPE table is ``rope``'s (HF's default rope, theta 10000, when None). A tied
    LM head (one buffer with the embedding table) is not drawn again."""
    import cupy

    exe.synchronize()
    rs = cupy.random.RandomState(int(seed))
    _check_weight_buffers(exe.plan)
    write_model_tables(exe, rope, zero_bias=True)
    shared = shares_head(exe)
    dims = exe.plan.dims
    for name in WEIGHT_BUFFERS:
        if name == "lm_head" and shared:
            continue
        dtype = weight_dtype(exe.plan, name)
        if name in LAYERED_BUFFERS:
            slices = [weight_view(exe.buffers, dims, name, i) for i in range(int(dims["layers"]))]
        else:
            slices = [weight_view(exe.buffers, dims, name, None)]
        for dst in slices:  # a packed role's view has the unpacked slice's shape: the same draws
            x = rs.standard_normal(dst.shape, dtype=cupy.float32)
            x = (x * cupy.float32(0.1) + cupy.float32(1.0)) if name in NORM_BUFFERS else x * cupy.float32(std)
            dst[...] = convert(cupy, x, "f32", dtype)
            del x
    cupy.cuda.Device().synchronize()


def random_hf_model(dims: Mapping[str, Any] | None = None, *, config: Any = None, dtype: str = "f32", seed: int = 0,
                    std: float = 0.02, norm_std: float = 0.1, attn_implementation: str | None = "eager",
                    device: str = "cuda"):
    """A random HF model for tests and benchmarks, built directly on ``device`` in ``dtype`` (f32 | f16 |
    bf16): a ``LlamaForCausalLM`` of the graph's ``dims`` (default rope), or the causal LM of an HF
    ``config`` object (``LlamaConfig``, ``MistralConfig``, ``Qwen2Config``: any served one). Weights are drawn
    here, not by HF's initialiser (whose behaviour changed across versions): normal(0, std) for matrices and
    biases, 1 + norm_std normal for RMSNorm weights, from ``seed``. Returned in eval mode."""
    import torch
    import transformers

    tdtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    if config is None:
        if dims is None:
            raise DagbuildError("random_hf_model needs dims or an HF config")
        kwargs = hf_config_kwargs(dims)
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        config = transformers.LlamaConfig(**kwargs)
    from_hf(config)  # the graph serves this config
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(tdtype)  # build in place: no f32 copy, and the rotary inv_freq stays f32
    try:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(
                config, **({"attn_implementation": attn_implementation} if attn_implementation else {}))
    finally:
        torch.set_default_dtype(old)
    if attn_implementation and getattr(model.config, "_attn_implementation", attn_implementation) != \
            attn_implementation and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn_implementation)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
            p.copy_(1.0 + norm_std * x if name.endswith("norm.weight") else std * x)
    return model.eval()
