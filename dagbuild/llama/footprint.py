"""Device memory a decode plan needs (weights, KV cache, activations), checked before anything is built.

Pure over the plan's buffers, so ``dagbuild info --hf-config`` prints the same figures without a GPU; the
runner compares the total with the device's free memory and refuses with the breakdown when it does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import DagbuildError
from ..util import format_bytes
from .weights import BIAS_BUFFER, ROPE_BUFFER, weight_buffer_names

KV_BUFFERS = ("k_cache", "v_cache")
#: What building needs beyond the buffers: graph executables, kernel modules, CuPy's pool slack.
RESERVE_BYTES = 512 << 20


@dataclass(frozen=True)
class Footprint:
    """Device bytes of a decode plan, by role (a tied LM head shares the embedding table: counted once)."""

    weights: int
    kv_cache: int
    activations: int
    tied: bool = False

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    def describe(self, dims: dict[str, int] | None = None) -> str:
        kv = format_bytes(self.kv_cache)
        if dims and "max_seq" in dims:
            kv += f" at max_seq {dims['max_seq']} x cache_batch {dims.get('cache_batch', 1)}"
        return (f"weights {format_bytes(self.weights)}{' (LM head tied to the embedding)' if self.tied else ''}, "
                f"KV cache {kv}, activations {format_bytes(self.activations)}")


def footprint(plan: Any, tied: bool = False) -> Footprint:
    """Device bytes of ``plan``'s buffers by role; ``tied``: lm_head is the embedding table's memory."""
    names = set(weight_buffer_names(plan)) | ({BIAS_BUFFER, ROPE_BUFFER} & set(plan.buffers))
    if tied:
        names.discard("lm_head")
    weights = kv = act = 0
    for name, b in plan.buffers.items():
        if b.memory != "device" or (tied and name == "lm_head"):
            continue
        if name in names:
            weights += b.nbytes
        elif name in KV_BUFFERS:
            kv += b.nbytes
        else:
            act += b.nbytes
    return Footprint(weights, kv, act, tied)


def check_fits(fp: Footprint, free: int, dims: dict[str, int] | None = None, name: str = "the graph") -> None:
    """Refuse, before building, a plan whose buffers (plus a reserve for graphs and kernels) exceed ``free``."""
    need = fp.total + RESERVE_BYTES
    if need > free:
        hint = "; lower --set max_seq or --set batch/cache_batch" if fp.kv_cache > fp.weights // 4 else ""
        raise DagbuildError(f"{name} needs {format_bytes(need)} of device memory ({fp.describe(dims)}, and "
                            f"{format_bytes(RESERVE_BYTES)} for graphs and kernels), but only {format_bytes(free)} "
                            f"is free on the device{hint}")
