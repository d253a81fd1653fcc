"""RoPE inverse frequencies as HF transformers computes them, on the host, in float32.

The decode kernels rotate by ``p * inv_freq[i]`` with ``inv_freq`` read from the ``rope_inv_freq`` buffer
([head_dim / 2] f32), so every rope scaling that is a fixed table for a given maximum length is served
exactly by writing HF's table there: ``default``, ``linear``, ``llama3``, and ``dynamic`` while no position
passes the original context (HF then keeps the default table; past it, the table would change with the
sequence length, which a fixed graph input cannot follow). The arithmetic mirrors HF's torch code step by
step in float32 (NumPy keeps float32 with Python scalars), so the tables agree to the last bit or one ulp
(``powf`` implementations differ).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import DagbuildError

#: rope types served (HF ``rope_type``; ``type`` in old configs).
SERVED = ("default", "linear", "dynamic", "llama3")


@dataclass(frozen=True)
class Rope:
    """A config's rotary embedding: its type, theta, and the scaling parameters that type reads."""

    rope_type: str = "default"
    theta: float = 10000.0
    params: Mapping[str, Any] = field(default_factory=dict)  # factor, low/high_freq_factor, original_max_...
    max_position: int | None = None  # the config's max_position_embeddings (dynamic's threshold)

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """The [head_dim / 2] float32 table HF's rotary embedding holds for this config."""
        return inv_freq(self, head_dim)

    def check_max_seq(self, max_seq: int, where: str = "HF config") -> None:
        """Refuse a graph length for which the table would not be fixed (dynamic scaling past its context)."""
        if self.rope_type != "dynamic":
            return
        limit = self.params.get("original_max_position_embeddings") or self.max_position
        if limit is None:
            raise DagbuildError(f"{where} field rope_scaling: rope_type 'dynamic' needs max_position_embeddings")
        if max_seq > int(limit):
            raise DagbuildError(
                f"{where} field rope_scaling: rope_type 'dynamic' changes its frequencies once a sequence passes "
                f"{int(limit)} positions (max_position_embeddings), but the graph is built for max_seq = {max_seq}; "
                f"build it with --set max_seq={int(limit)} or less")


def _default(theta: float, head_dim: int) -> np.ndarray:
    # HF: 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)


def _number(params: Mapping[str, Any], name: str, where: str) -> float:
    v = params.get(name)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise DagbuildError(f"{where} field rope_scaling.{name} = {v!r}: expected a positive number")
    return float(v)


def inv_freq(rope: Rope, head_dim: int, where: str = "HF config") -> np.ndarray:
    """HF's inverse frequencies for ``rope`` (see the module docstring for what each type computes)."""
    if head_dim < 2 or head_dim % 2:
        raise DagbuildError(f"RoPE needs an even head_dim, got {head_dim}")
    base = _default(rope.theta, head_dim)
    t, p = rope.rope_type, rope.params
    if t in ("default", "dynamic"):  # dynamic: the default table until a sequence passes its context
        return base
    if t == "linear":
        return (base / np.float32(_number(p, "factor", where))).astype(np.float32)
    if t == "llama3":
        factor = _number(p, "factor", where)
        low, high = _number(p, "low_freq_factor", where), _number(p, "high_freq_factor", where)
        old = _number(p, "original_max_position_embeddings", where)
        if high <= low:
            raise DagbuildError(f"{where} field rope_scaling: high_freq_factor = {high:g} must exceed "
                                f"low_freq_factor = {low:g}")
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = (np.float32(1.0) / base) * np.float32(2 * math.pi)  # torch: scalar / t = t.reciprocal() * s
        scaled = np.where(wavelen > low_wavelen, base / np.float32(factor), base).astype(np.float32)
        smooth = ((np.float32(1.0) / wavelen * np.float32(old) - np.float32(low)) / np.float32(high - low)).astype(
            np.float32)
        smoothed = ((np.float32(1) - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise DagbuildError(f"{where} field rope_scaling.rope_type = {t!r}: not served (served: {', '.join(SERVED)})")
