"""Sampling settings per row, and the Python reference of ``kernels/sampling.cu``'s ``sample_step``.

The kernel's algorithm is defined once, in that file's header; :func:`sample_reference` is the same
algorithm in NumPy (float32 logits, integer weights, Philox4x32-10), used by the tests to check the kernel
and to explain a token. Its weights come from NumPy's float32 ``exp``, which may differ from the device's
``expf`` in the last bit, so a draw that lands within a rounding of a boundary between two tokens can
differ; everything else is equal bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import DagbuildError

#: ctl row layout (i32): eos, tokens left, prompt length, top_k, seed low and high 32 bits, 2 spare.
CTL_FIELDS = ("eos", "left", "prompt_len", "top_k", "seed_lo", "seed_hi", "spare0", "spare1")
CTL_WIDTH = len(CTL_FIELDS)
#: state buffer (i32): the ring row of the next step, all rows stopped, the kernel's arrival counter.
STATE_STEP, STATE_DONE, STATE_ARRIVALS = 0, 1, 2


@dataclass(frozen=True)
class Sampling:
    """How one row picks tokens. ``temperature <= 0`` (or ``top_k == 1``) is greedy; ``top_k = 0`` and
    ``top_p = 1`` turn those filters off; ``seed`` (64-bit) and the position make every draw."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature):
            raise DagbuildError(f"sampling: temperature must be finite, got {self.temperature}")
        if not 0 <= self.top_k < 2**31:
            raise DagbuildError(f"sampling: top_k must be ≥ 0 (0: off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise DagbuildError(f"sampling: top_p must be in (0, 1] (1: off), got {self.top_p}")
        if not 0 <= self.seed < 2**64:
            raise DagbuildError(f"sampling: seed must be in [0, 2^64), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


# ---- Philox4x32-10 ------------------------------------------------------------------------------------

_M0, _M1, _W0, _W1, _MASK = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """Philox4x32-10 (Salmon et al., SC 2011), as Random123 defines it."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = _M0 * c0, _M1 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & _MASK, (p0 >> 32) ^ c3 ^ k1, p0 & _MASK
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    return c0, c1, c2, c3


def draw(seed: int, position: int) -> int:
    """The 32-bit random number of a sampled token at ``position`` (the input token's position)."""
    return philox4x32_10((position & _MASK, 0, 0, 0), (seed & _MASK, (seed >> 32) & _MASK))[0]


# ---- the algorithm -------------------------------------------------------------------------------------


def order_keys(logits: np.ndarray) -> np.ndarray:
    """Order-preserving uint32 keys of float32 values (larger value, larger key)."""
    u = np.ascontiguousarray(logits, dtype=np.float32).view(np.uint32)
    return np.where(u & 0x80000000, ~u, u | 0x80000000).astype(np.uint32)


def weights(logits: np.ndarray, temperature: float, floor_key: int) -> np.ndarray:
    """floor(exp((l - max) / T) * 2^32) as Python-int-safe uint64, 0 below ``floor_key``."""
    lg = np.asarray(logits, dtype=np.float32)
    m = lg.max()
    inv_t = np.float32(1.0) / np.float32(temperature)
    e = np.exp((lg - m) * inv_t, dtype=np.float32)
    w = (e * np.float32(4294967296.0)).astype(np.float64).astype(np.uint64)
    return np.where(order_keys(lg) >= floor_key, w, np.uint64(0))


def kth_largest_key(keys: np.ndarray, k: int) -> int:
    return int(np.sort(keys)[::-1][k - 1])


def nucleus_key(keys: np.ndarray, w: np.ndarray, need: int) -> int:
    """The largest key t with sum(w[keys >= t]) >= need."""
    order = np.argsort(keys, kind="stable")[::-1]
    cum = 0
    for i in order:
        cum += int(w[i])
        if cum >= need:
            return int(keys[i])
    raise AssertionError("need exceeds the total weight")


def kept_keys_floor(logits: np.ndarray, s: Sampling) -> int:
    """The smallest key a sampled token may have under ``s`` (top-k, then top-p)."""
    lg = np.asarray(logits, dtype=np.float32)
    keys = order_keys(lg)
    floor_key = kth_largest_key(keys, s.top_k) if 0 < s.top_k < lg.size else 0
    if s.top_p < 1.0:
        w = weights(lg, s.temperature, floor_key)
        z = int(w.sum(dtype=np.uint64))
        need = min(max(math.ceil(float(np.float32(s.top_p)) * float(z)), 1), z)
        floor_key = nucleus_key(keys, w, need)
    return floor_key


def sample_reference(logits: np.ndarray, s: Sampling, position: int) -> int:
    """The token ``sample_step`` picks for one row's logits at ``position`` (not forced)."""
    lg = np.asarray(logits, dtype=np.float32)
    if s.greedy:
        return int(np.argmax(lg))
    floor_key = kept_keys_floor(lg, s)
    w = weights(lg, s.temperature, floor_key)
    z = int(w.sum(dtype=np.uint64))
    r = draw(s.seed, position)
    target = (z * r) >> 32
    cum = np.cumsum(w.astype(object))
    return int(np.argmax(cum > target))
