"""K decode steps per launch: a decode spec's step wrapped in a loop node, with sampling, token feedback,
position advance and stopping on the device (``kernels/sampling.cu``).

:func:`looped_spec` takes any decode spec (``specs/llama_decode.yaml``, ``specs/llama_decode_fused.yaml``,
whatever dims they gain) and builds, as a new GraphSpec:

    upload tokens, positions, per-row control (ctl) and sampling settings (cfg); zero the loop state
    loop decode {max: steps, until: state[1], unroll: 4 (or 2, 1: a divisor of steps)}:
        the base step's nodes but its host copies and its argmax (embed ... LM head)
        sample: pick, feed back, advance, record in ring[step], stop rows, set state[1] when all stopped
    download the ring [steps, batch] and the row state to pinned memory

The rows' state (token, position, tokens left) is uploaded from the pinned buffers it is downloaded to, so it
carries from one launch to the next with no host work; the host reads the ring once a launch.
A row's prompt is fed through the same loop (``prompt`` buffer, forced tokens), so prefill runs K
positions a launch too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BuildError, DagbuildError
from ..spec import GraphSpec
from .sampling import CTL_WIDTH, STATE_DONE, STATE_STEP, Sampling

LOOP_ID = "decode"
GREEDY = Sampling()
#: buffers of the base step the loop reads or rewires (the rest are the base's own business)
BASE_NEEDS = ("tokens", "pos", "logits", "tokens_host", "pos_host", "k_cache", "v_cache")
#: what a looped graph adds, and what the host reads and writes
LOOP_BUFFERS = ("ctl", "ctl_host", "cfg", "cfg_host", "prompt", "ring", "ring_host", "state", "state_host")


def _writes(node: dict, kernels: dict, buffer: str) -> bool:
    """Whether a spec node (as a dict) writes ``buffer`` through a non-const pointer arg."""
    decl = kernels.get(node.get("kernel"))
    if decl is None:
        return False
    for text in decl["params"]:
        parts = text.replace("*", " * ").split()
        if "*" in parts and parts[0] != "const":
            arg = node.get("args", {}).get(parts[-1])
            if isinstance(arg, str) and arg.split("[")[0].strip() == buffer:
                return True
    return False


def _sampling_source(data: dict, base: GraphSpec) -> str:
    """``sampling.cu`` beside the base's kernel files (so a checkout and an install both resolve it)."""
    for decl in data["kernels"].values():
        src = decl.get("source")
        if src:
            path = Path(src).parent / "sampling.cu"
            if ((base.base_dir or Path.cwd()) / path).is_file():
                return path.as_posix()
    from ..data import data_root

    return str(data_root() / "kernels" / "sampling.cu")


def default_unroll(tokens_per_launch: int) -> int:
    """Steps per WHILE iteration: the driver's per-iteration cost (~4-7 µs on an H200) is paid once per this
    many steps; 4 where it divides K (the graph stays small), else 2 or 1."""
    return next(u for u in (4, 2, 1) if tokens_per_launch % u == 0)


def looped_spec(base: GraphSpec, tokens_per_launch: int, unroll: int | None = None) -> GraphSpec:
    """The base decode step as ``tokens_per_launch`` steps per launch (see the module docstring), ``unroll``
    steps per iteration of the loop's conditional node (default :func:`default_unroll`; it must divide K)."""
    from ..load import from_dict

    if isinstance(tokens_per_launch, bool) or not isinstance(tokens_per_launch, int) or tokens_per_launch < 1:
        raise DagbuildError(f"tokens_per_launch must be an integer ≥ 1, got {tokens_per_launch!r}")
    unroll = default_unroll(tokens_per_launch) if unroll is None else unroll
    if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1 or tokens_per_launch % unroll:
        raise DagbuildError(f"unroll must be an integer ≥ 1 dividing tokens_per_launch = {tokens_per_launch}, "
                            f"got {unroll!r}")
    data = base.to_dict()
    missing = [b for b in BASE_NEEDS if b not in data.get("buffers", {})]
    if missing:
        raise DagbuildError(f"spec {base.name!r} is not a decode step: it has no buffer {missing[0]!r}")
    clash = [b for b in (*LOOP_BUFFERS, "steps") if b in data["buffers"] or b in data.get("dims", {})]
    if clash:
        raise DagbuildError(f"spec {base.name!r} already has a buffer or dim {clash[0]!r} that the loop adds")
    pinned = {n for n, b in data["buffers"].items() if b.get("memory") == "pinned"}
    body = []
    for node in data["nodes"]:
        if "memcpy" in node and ({node["memcpy"]["src"], node["memcpy"]["dst"]} & pinned):
            continue  # the host copies: the loop moves tokens on the device
        if "kernel" in node and _writes(node, data["kernels"], "next"):
            continue  # the greedy argmax: sampling replaces it
        body.append(node)
    data["name"] = f"{base.name}_loop"
    data["dims"]["steps"] = tokens_per_launch
    data["kernels"]["sample"] = {
        "source": _sampling_source(data, base), "entry": "sample_step",
        "params": ["const f32* logits", "i32* tokens", "i32* pos", "i32* ctl", "const f32* cfg",
                   "const i32* prompt", "i32* ring", "i32* state", "i32 vocab", "i32 max_seq", "i32 batch",
                   "i32 ring_rows"]}
    data["buffers"].update({
        "ctl": {"dtype": "i32", "shape": ["batch", CTL_WIDTH]},
        "ctl_host": {"dtype": "i32", "shape": ["batch", CTL_WIDTH], "memory": "pinned"},
        "cfg": {"dtype": "f32", "shape": ["batch", 2]},
        "cfg_host": {"dtype": "f32", "shape": ["batch", 2], "memory": "pinned"},
        "prompt": {"dtype": "i32", "shape": ["batch", "max_seq"]},
        "ring": {"dtype": "i32", "shape": ["steps", "batch"]},
        "ring_host": {"dtype": "i32", "shape": ["steps", "batch"], "memory": "pinned"},
        "state": {"dtype": "i32", "shape": [4]},
        "state_host": {"dtype": "i32", "shape": [4], "memory": "pinned"},
    })
    sample = {"id": "sample", "kernel": "sample", "grid": ["batch"], "block": [1024],
              "args": {"logits": "logits", "tokens": "tokens", "pos": "pos", "ctl": "ctl", "cfg": "cfg",
                       "prompt": "prompt", "ring": "ring", "state": "state", "vocab": "vocab",
                       "max_seq": "max_seq", "batch": "batch", "ring_rows": "steps"}}
    copy = lambda i, dst, src: {"id": i, "memcpy": {"dst": dst, "src": src}}
    data["nodes"] = [
        copy("upload_tokens", "tokens", "tokens_host"), copy("upload_pos", "pos", "pos_host"),
        copy("upload_ctl", "ctl", "ctl_host"), copy("upload_cfg", "cfg", "cfg_host"),
        {"id": "reset_state", "memset": {"dst": "state", "value": 0}},
        {"id": LOOP_ID, "loop": {"max": "steps", "until": f"state[{STATE_DONE}]", "unroll": unroll},
         "nodes": [*body, sample]},
        copy("download_ring", "ring_host", "ring"), copy("download_tokens", "tokens_host", "tokens"),
        copy("download_pos", "pos_host", "pos"), copy("download_ctl", "ctl_host", "ctl"),
        copy("download_state", "state_host", "state"),
    ]
    return from_dict(data, base_dir=base.base_dir)


def looped_plan(p: Any, tokens_per_launch: int, unroll: int | None = None) -> Any:
    """:func:`looped_spec` of a bound decode plan's spec, bound with the same dims and types."""
    from ..plan import plan

    return plan(looped_spec(p.spec, tokens_per_launch, unroll), {**p.dims, **p.types, **p.consts})


@dataclass
class LoopGeneration:
    """Tokens generated per row; per launch its wall time and the steps it ran."""

    tokens: list[list[int]]
    launch_ms: list[float] = field(default_factory=list)
    launch_steps: list[int] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(self.launch_steps)

    @property
    def ms_per_step(self) -> float:
        return sum(self.launch_ms) / self.steps if self.steps else float("nan")


class LoopDecoder:
    """Drives an executable of a :func:`looped_spec` graph: K steps (prefill or decode) per launch."""

    def __init__(self, exe: Any):
        missing = [b for b in (*BASE_NEEDS, *LOOP_BUFFERS) if b not in exe.buffers]
        if missing:
            raise BuildError(f"graph {exe.plan.name!r} is not a looped decode graph: no buffer {missing[0]!r}",
                             buffer=missing[0])
        self.exe = exe
        self.dims = exe.plan.dims
        self.batch, self.steps = self.dims["batch"], self.dims["steps"]

    def reset(self) -> None:
        """Forget every sequence (zero the KV cache)."""
        self.exe.synchronize()
        with self.exe.stream:
            self.exe.buffers["k_cache"].fill(0)
            self.exe.buffers["v_cache"].fill(0)

    def start(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
              sampling: Sampling | Sequence[Sampling] = GREEDY, eos: int | Sequence[int] | None = None) -> None:
        """Load one prompt per row (rows past them are padding) and each row's budget, EOS id and sampling;
        zero the KV cache. Then :meth:`launch` until :meth:`running` is False."""
        rows = len(prompts)
        if not 1 <= rows <= self.batch:
            raise DagbuildError(f"{rows} prompts do not fit this graph's batch of {self.batch}")
        per_row = lambda v: list(v) if isinstance(v, Sequence) else [v] * rows
        budgets, samplings, eoss = per_row(max_new_tokens), per_row(sampling), per_row(-1 if eos is None else eos)
        if not len(budgets) == len(samplings) == len(eoss) == rows:
            raise DagbuildError(f"start: give one max_new_tokens, sampling and eos per prompt ({rows} prompts)")
        vocab, max_seq = self.dims["vocab"], self.dims["max_seq"]
        for r, pr in enumerate(prompts):
            if not pr:
                raise DagbuildError(f"start: prompt {r} is empty")
            if min(pr) < 0 or max(pr) >= vocab:
                raise DagbuildError(f"start: prompt {r}: token ids must be in [0, {vocab})")
            if len(pr) > max_seq:
                raise DagbuildError(f"start: prompt {r} has {len(pr)} tokens, more than max_seq = {max_seq}")
            if budgets[r] < 1:
                raise DagbuildError(f"start: row {r}: max_new_tokens must be ≥ 1, got {budgets[r]}")
        self.reset()
        b = self.exe.buffers
        prompt = np.zeros((self.batch, max_seq), np.int32)
        ctl = np.zeros((self.batch, CTL_WIDTH), np.int32)
        cfg = np.zeros((self.batch, 2), np.float32)
        tokens = np.zeros(self.batch, np.int32)
        pos = np.full(self.batch, -1, np.int32)
        for r, pr in enumerate(prompts):
            s = samplings[r]
            prompt[r, :len(pr)] = pr
            tokens[r], pos[r] = pr[0], 0
            ctl[r, :6] = [eoss[r], budgets[r], len(pr), s.top_k, s.seed & 0xFFFFFFFF, (s.seed >> 32) & 0xFFFFFFFF]
            cfg[r] = [s.temperature, s.top_p]
        b["prompt"].set(prompt)
        b["ctl_host"][...] = ctl.view(np.int32)
        b["cfg_host"][...] = cfg
        b["tokens_host"][...] = tokens
        b["pos_host"][...] = pos
        self.exe.synchronize()
        self._rows = rows
        self._out: list[list[int]] = [[] for _ in range(rows)]

    def running(self) -> bool:
        return bool((self.exe.buffers["pos_host"][:self._rows] >= 0).any())

    def launch(self) -> int:
        """One launch: up to K steps; collects the tokens it generated. Returns the steps it ran."""
        self.exe.launch(sync=True)
        b = self.exe.buffers
        steps = int(b["state_host"][STATE_STEP])
        ring = b["ring_host"][:steps, :self._rows]
        for s in range(steps):
            for r in range(self._rows):
                if ring[s, r] >= 0:
                    self._out[r].append(int(ring[s, r]))
        return steps

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                 sampling: Sampling | Sequence[Sampling] = GREEDY, eos: int | Sequence[int] | None = None,
                 on_launch: Callable[[int], None] | None = None) -> LoopGeneration:
        """Prompts in, up to ``max_new_tokens`` per row out (fewer where a row meets its EOS id, which is
        kept, or max_seq), K steps per launch."""
        self.start(prompts, max_new_tokens, sampling, eos)
        gen = LoopGeneration(self._out)
        while self.running():
            t0 = time.perf_counter()
            steps = self.launch()
            gen.launch_ms.append((time.perf_counter() - t0) * 1e3)
            gen.launch_steps.append(steps)
            if on_launch:
                on_launch(steps)
        return gen
