"""Prefill through graphs pooled by prompt length (``specs/llama_prefill.yaml``), over the decode graph's
weights and KV cache.

A :class:`Prefiller` builds a :class:`~dagbuild.pool.GraphPool` of the prefill spec bucketed by ``seq``
(16, 32, ... up to ``max_seq``), with the decode executable's weight buffers and KV cache bound into every
bucket, so prefill writes the cache that decoding then reads. A prompt is padded to its bucket with
positions -1 (they write nothing); prompts longer than the largest bucket run in chunks of it, each chunk
attending to the cache the earlier ones wrote. Each launch yields the next token of every row whose last
prompt position was in it: the first generated token. The model's constants come from the decode plan (its
consts ``rms_eps``/``attn_scale``) and its executable (the ``rope_inv_freq`` and ``qkv_bias`` the loader
wrote), so a checkpoint's values reach prefill as they reach decode.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import BuildError, DagbuildError

#: Prompt-length buckets (capped at the decode graph's max_seq).
DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)
#: Dims the prefill spec takes from the decode plan.
SHARED_DIMS = ("batch", "cache_batch", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab", "layers", "max_seq")
#: Dims taken from the decode plan when it has them (the GEMV launch shape of the LM head), else the spec's.
LAUNCH_DIMS = ("sms", "gemv_blocks_per_sm", "gemv_shared")
#: The model's float constants: the decode plan's values, always.
SHARED_CONSTS = ("rms_eps", "attn_scale")
#: Buffers bound from the decode executable (weights, KV cache, RoPE table, Q/K/V biases): all of them.
SHARED_BUFFERS = ("embed_tokens", "attn_norm", "wqkv", "wo", "mlp_norm", "w_gate_up", "w_down", "final_norm",
                  "lm_head", "rope_inv_freq", "qkv_bias", "k_cache", "v_cache")


def prefill_spec():
    from ..data import shipped_spec
    from ..load import load_spec

    return load_spec(shipped_spec("llama_prefill.yaml"))


def prefill_overrides(decode_plan: Any) -> dict[str, Any]:
    """The prefill spec's dims, consts and weight type for a decode plan (same model, batch and cache)."""
    missing = [b for b in SHARED_BUFFERS if b not in decode_plan.buffers]
    if missing:
        raise BuildError(f"graph {decode_plan.name!r} has no buffer {missing[0]!r}: prefill graphs pair with the "
                         "fused decode spec (specs/llama_decode_fused.yaml: packed wqkv and w_gate_up, the RoPE "
                         "table and Q/K/V biases); prefill this one position at a time", buffer=missing[0])
    consts = getattr(decode_plan, "consts", None) or {}
    absent = [c for c in SHARED_CONSTS if c not in consts]
    if absent:
        raise BuildError(f"graph {decode_plan.name!r} has no const {absent[0]!r}: prefill graphs take the model's "
                         f"constants ({', '.join(SHARED_CONSTS)}) from the decode plan; prefill this one position "
                         "at a time")
    return {**{d: decode_plan.dims[d] for d in SHARED_DIMS},
            **{d: decode_plan.dims[d] for d in LAUNCH_DIMS if d in decode_plan.dims},
            **{c: float(consts[c]) for c in SHARED_CONSTS}, "wt": decode_plan.types["wt"]}


def plan_chunks(lengths: Sequence[int], buckets: Sequence[int]) -> list[tuple[int, int]]:
    """(first position, bucket) of each launch for prompts of these lengths: chunks of the largest bucket,
    the last one in the smallest bucket that holds what is left."""
    buckets = sorted(buckets)
    out, lo, longest = [], 0, max(lengths)
    while lo < longest:
        n = min(buckets[-1], longest - lo)
        out.append((lo, next(b for b in buckets if b >= n)))
        lo += n
    return out


class Prefiller:
    """Prefill graphs for one decode executable: ``run(prompts)`` fills the KV cache and returns each row's
    first generated token. ``buckets``: prompt lengths with a graph (each ≤ max_seq); ``eager``: build
    them all now (else on first use)."""

    def __init__(self, decode_exe: Any, buckets: Sequence[int] | None = None, *, eager: bool = True,
                 spec: Any = None):
        from ..pool import GraphPool

        plan = decode_exe.plan
        self.overrides = prefill_overrides(plan)
        self.dims = plan.dims
        max_seq = int(self.dims["max_seq"])
        wanted = sorted({int(b) for b in (buckets or DEFAULT_BUCKETS)})
        if any(b < 1 for b in wanted):
            raise BuildError(f"prefill buckets must be ≥ 1, got {wanted}")
        self.buckets = [b for b in wanted if b <= max_seq] or [max_seq]
        self.decode = decode_exe
        bound = {name: decode_exe.buffers[name] for name in SHARED_BUFFERS}
        t0 = time.perf_counter()
        self.pool = GraphPool(spec or prefill_spec(), {"seq": self.buckets}, overrides=self.overrides, bound=bound,
                              eager=eager, backend=decode_exe.backend, concurrent=False)
        self.build_s = time.perf_counter() - t0

    def chunks(self, lengths: Sequence[int]) -> list[tuple[int, int]]:
        return plan_chunks(lengths, self.buckets)

    def run(self, prompts: Sequence[Sequence[int]]) -> tuple[list[int], list[float]]:
        """Prefill one prompt per row (rows beyond len(prompts) are padding). Returns the first generated
        token of each row and the host-observed ms of each launch."""
        rows, batch = len(prompts), int(self.dims["batch"])
        if not 1 <= rows <= batch:
            raise DagbuildError(f"prefill: {rows} prompts do not fit the graph's batch of {batch}")
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1:
            raise DagbuildError("prefill: every row needs a non-empty prompt")
        vocab, max_seq = int(self.dims["vocab"]), int(self.dims["max_seq"])
        if max(lengths) > max_seq:
            raise DagbuildError(f"prefill: a prompt of {max(lengths)} tokens is longer than max_seq = {max_seq}; "
                                "build with a larger --set max_seq")
        toks = [np.asarray(p, dtype=np.int64) for p in prompts]
        for r, t in enumerate(toks):
            if t.min() < 0 or t.max() >= vocab:
                raise DagbuildError(f"prefill: row {r}: token ids must be in [0, {vocab}), got {t.min()}..{t.max()}")
        first = [-1] * rows
        ms = []
        for lo, bucket in self.chunks(lengths):
            exe = self.pool.get(seq=bucket)
            b = exe.buffers
            tok_h, pos_h = b["tokens_host"], b["pos_host"]
            tok_h[...] = 0
            pos_h[...] = -1
            ends = {}
            for r in range(rows):
                n = max(0, min(lengths[r] - lo, bucket))
                if n:
                    tok_h[r, :n] = toks[r][lo:lo + n]
                    pos_h[r, :n] = np.arange(lo, lo + n)
                    if lo + n == lengths[r]:
                        ends[r] = True
            t0 = time.perf_counter()
            exe.launch(sync=True)
            ms.append((time.perf_counter() - t0) * 1e3)
            nxt = b["next_host"]
            for r in ends:
                first[r] = int(nxt[r])
        return first, ms

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> Prefiller:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
