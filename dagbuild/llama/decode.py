"""Greedy decoding through the Llama decode graph: one graph launch per token.

The graph reads token ids and positions from pinned host buffers (uploaded by its first nodes) and
writes the next token ids to another (downloaded by its last node), so a step is: write two small host
arrays, launch, wait, read. Prefill runs the prompt through prefill graphs (dagbuild.llama.prefill) when
``generate`` is given a Prefiller, else through the same graph one position at a time.
Rows with a negative position are padding: the kernels write no KV for them and their tokens are ignored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BuildError, DagbuildError

REQUIRED = ("tokens_host", "pos_host", "next_host", "logits", "k_cache", "v_cache")


def llama_plan(overrides: Mapping[str, Any] | None = None, spec_path: Path | str | None = None):
    """The decode spec's plan; ``cache_batch`` follows ``batch`` unless it is set explicitly."""
    from ..data import shipped_spec
    from ..load import load_spec
    from ..plan import plan

    spec = load_spec(spec_path or shipped_spec("llama_decode.yaml"))
    ov = dict(overrides or {})
    batch = int(ov.get("batch", spec.dims.get("batch", 1)))
    if "cache_batch" not in ov:
        ov["cache_batch"] = max(batch, spec.dims.get("cache_batch", 1))
    return plan(spec, ov)


@dataclass
class Generation:
    """Tokens generated per row, and the wall time of every step (prefill and decode)."""

    tokens: list[list[int]]
    prefill_ms: list[float] = field(default_factory=list)
    decode_ms: list[float] = field(default_factory=list)
    ttft_ms: float = float("nan")  # from the start of prefill to every row's first new token

    @property
    def ms_per_token(self) -> float:
        return float(np.median(self.decode_ms)) if self.decode_ms else float("nan")

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(self.decode_ms, 99)) if self.decode_ms else float("nan")


class LlamaDecoder:
    """Drives an executable of ``specs/llama_decode.yaml`` (any batch bucket of a pool works too)."""

    def __init__(self, exe: Any):
        missing = [b for b in REQUIRED if b not in exe.buffers]
        if missing:
            raise BuildError(f"graph {exe.plan.name!r} is not a Llama decode graph: no buffer {missing[0]!r}",
                             buffer=missing[0])
        self.exe = exe
        self.dims = exe.plan.dims
        self.batch = self.dims["batch"]

    def reset(self) -> None:
        """Forget every sequence (zero the KV cache)."""
        self.exe.synchronize()
        with self.exe.stream:  # the graph's stream orders the zeroing before the next launch
            self.exe.buffers["k_cache"].fill(0)
            self.exe.buffers["v_cache"].fill(0)

    def step(self, tokens: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        """One graph launch: rows ``i < len(tokens)`` decode ``tokens[i]`` at ``positions[i]``; the rest
        are padding. Returns the next token of each given row."""
        n = len(tokens)
        if n != len(positions):
            raise DagbuildError(f"step: {n} tokens but {len(positions)} positions")
        if not 1 <= n <= self.batch:
            raise DagbuildError(f"step: {n} rows do not fit this graph's batch of {self.batch}")
        vocab, max_seq = self.dims["vocab"], self.dims["max_seq"]
        toks = np.asarray(tokens, dtype=np.int64)
        pos = np.asarray(positions, dtype=np.int64)
        if toks.min() < 0 or toks.max() >= vocab:
            raise DagbuildError(f"step: token ids must be in [0, {vocab}), got {toks.min()}..{toks.max()}")
        if pos.max() >= max_seq:
            raise DagbuildError(f"step: position {int(pos.max())} is past max_seq = {max_seq}; "
                                "build with a larger --set max_seq")
        b = self.exe.buffers
        b["tokens_host"][:n] = toks
        b["tokens_host"][n:] = 0
        b["pos_host"][:n] = pos
        b["pos_host"][n:] = -1
        self.exe.launch(sync=True)
        return b["next_host"][:n].copy()

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 on_step: Callable[[int, int], None] | None = None, prefill: Any = None,
                 stop_ids: Collection[int] = (), on_token: Callable[[int, int], None] | None = None) -> Generation:
        """Greedy decoding of one prompt per row. ``prefill``: a :class:`~dagbuild.llama.prefill.Prefiller`
        of this executable (prompts through prefill graphs, which yield the first new tokens), else the
        prompt goes through the decode graph one position at a time and the step that reads a prompt's
        last token yields the first new one. A row ends after ``max_new_tokens`` or after emitting one of
        ``stop_ids`` (kept as its last token); then it is padding, and decoding stops when every row has
        ended. ``on_step(done, total)`` is called after every launch, ``on_token(row, token)`` for each new
        token."""
        rows = len(prompts)
        if rows == 0 or any(len(p) == 0 for p in prompts):
            raise DagbuildError("generate: every row needs a non-empty prompt")
        self.reset()
        stop = frozenset(int(t) for t in stop_ids)
        if prefill is not None:
            return self._generate_after_prefill(prompts, max_new_tokens, on_step, prefill, stop, on_token)
        lengths = [len(p) for p in prompts]
        total = max(lengths) + max_new_tokens - 1
        out: list[list[int]] = [[] for _ in range(rows)]
        ended = [False] * rows
        gen = Generation(out)
        current = [p[0] for p in prompts]
        for t in range(total):
            positions = [t if t < lengths[r] + max_new_tokens - 1 and not ended[r] else -1 for r in range(rows)]
            if all(p < 0 for p in positions):
                break
            tok = [current[r] if positions[r] >= 0 else 0 for r in range(rows)]
            t0 = time.perf_counter()
            nxt = self.step(tok, positions)
            ms = (time.perf_counter() - t0) * 1e3
            (gen.prefill_ms if t < max(lengths) - 1 else gen.decode_ms).append(ms)
            for r in range(rows):
                if positions[r] < 0:
                    continue
                if t + 1 < lengths[r]:
                    current[r] = prompts[r][t + 1]
                elif len(out[r]) < max_new_tokens:
                    out[r].append(int(nxt[r]))
                    current[r] = int(nxt[r])
                    if on_token:
                        on_token(r, current[r])
                    if current[r] in stop:
                        ended[r] = True
            if on_step:
                on_step(t + 1, total)
            if t == max(lengths) - 1:
                gen.ttft_ms = sum(gen.prefill_ms) + ms
        return gen

    def _generate_after_prefill(self, prompts, max_new_tokens, on_step, prefill, stop, on_token) -> Generation:
        rows, lengths = len(prompts), [len(p) for p in prompts]
        t0 = time.perf_counter()
        first, _ = prefill.run(prompts)
        gen = Generation([[int(t)][:max_new_tokens] for t in first], prefill_ms=[(time.perf_counter() - t0) * 1e3])
        gen.ttft_ms = gen.prefill_ms[0]
        ended = [not toks or toks[-1] in stop for toks in gen.tokens]
        for r, toks in enumerate(gen.tokens):
            if toks and on_token:
                on_token(r, toks[-1])
        total = max_new_tokens - 1
        for t in range(total):
            if all(ended):
                break
            positions = [-1 if ended[r] else lengths[r] + t for r in range(rows)]
            tok = [0 if ended[r] else gen.tokens[r][-1] for r in range(rows)]
            t0 = time.perf_counter()
            nxt = self.step(tok, positions)
            gen.decode_ms.append((time.perf_counter() - t0) * 1e3)
            for r in range(rows):
                if ended[r]:
                    continue
                gen.tokens[r].append(int(nxt[r]))
                if on_token:
                    on_token(r, gen.tokens[r][-1])
                ended[r] = gen.tokens[r][-1] in stop
            if on_step:
                on_step(t + 1, total)
        return gen

    def logits(self) -> Any:
        """The last step's logits, [batch, vocab] f32 on the device (the buffer may hold padding rows past them:
        the fused spec's gemm_pad)."""
        return self.exe.buffers["logits"][: self.batch]


def _progress(done: int, total: int) -> None:
    import sys

    width = 30
    fill = int(width * done / total)
    sys.stderr.write(f"\r  [{'#' * fill}{'.' * (width - fill)}] {done}/{total} steps")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()
