"""Helpers several test files share (importable as ``helpers``: pytest puts tests/ on sys.path for conftest.py).

Four groups, each written once so a fix reaches every test that uses it: spec text's issues and lines (CPU),
NVRTC and ptxas reports (CPU), kernels against float64 NumPy (GPU), and HF transformers' greedy decoding (GPU).
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import numpy as np
import pytest
from conftest import SPECS

from dagbuild.errors import Issue, SpecError
from dagbuild.llama import reference as ref
from dagbuild.load import parse_spec
from dagbuild.plan import plan

# ---- spec text ----------------------------------------------------------------------------------------------


def line(text: str, needle: str, nth: int = 1) -> int:
    """1-based line of the ``nth`` line of ``text`` containing ``needle``."""
    hits = [i + 1 for i, ln in enumerate(text.splitlines()) if needle in ln]
    assert len(hits) >= nth, f"{needle!r} not in spec text"
    return hits[nth - 1]


def issues_of(text: str, overrides: dict | None = None) -> list[Issue]:
    """The issues planning ``text`` (kernel sources relative to specs/) raises; fails if it plans."""
    with pytest.raises(SpecError) as info:
        plan(parse_spec(text, base_dir=SPECS), overrides)
    return info.value.issues


# ---- NVRTC and ptxas (no GPU needed) ------------------------------------------------------------------------


def nvrtc_reason() -> str | None:
    """None when NVRTC compiles here, else why not (the skip reason of the NVRTC tests)."""
    from dagbuild import kernels

    try:
        kernels.nvrtc_version()
    except Exception as e:
        return f"NVRTC unavailable ({e}); pip install 'dagbuild[nvrtc]'"
    return None


needs_nvrtc = pytest.mark.skipif(nvrtc_reason() is not None, reason=str(nvrtc_reason()))


def entry_bodies(ptx: str) -> dict[str, str]:
    """Each ``.entry``'s PTX text up to the next ``.entry``, by entry name."""
    parts = re.split(r"\.visible\s+\.entry\s+", ptx)[1:]
    return {p.split("(", 1)[0]: p for p in parts}


#: One entry of ptxas' ``-v`` report: "Function properties for NAME", its stack/spill line, its "Used" line.
_PTXAS_ENTRY = re.compile(r"Function properties for (\w+)\s*\n.*?(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads\s*\n[^\n]*?Used (\d+) registers([^\n]*)", re.S)


def ptxas_resources(source: str, name: str) -> dict[str, tuple[int, int, int, int, str]]:
    """ptxas' resource report (``-Xptxas=-v``) of ``source`` built for sm_90 by NVRTC: entry name →
    (stack bytes, spill store bytes, spill load bytes, registers, the rest of the "Used" line). Skips the
    test where NVRTC cannot build sm_90 machine code."""
    from dagbuild import kernels

    nvrtc = kernels._nvrtc()
    inc = kernels.cuda_include_dir()
    opts = [b"--std=c++17", b"-arch=sm_90", b"-Xptxas=-v"] + ([f"-I{inc}".encode()] if inc else [])
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), 0, [], [])
    try:
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        log = kernels._program_log(nvrtc, prog)
        if int(err) != 0:
            pytest.skip(f"NVRTC cannot build sm_90 machine code here: {log[:200]}")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return {n: (int(stack), int(st), int(ld), int(regs), rest)
            for n, stack, st, ld, regs, rest in _PTXAS_ENTRY.findall(log)}


# ---- kernels on the GPU against float64 NumPy ---------------------------------------------------------------

GUARD = 67  # NaN elements after each output buffer: a write past its end shows


def rng_for(*key: Any) -> np.random.Generator:
    """A generator seeded from the test's parameters (fresh, reproducible data per test case)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def weights(rng: np.random.Generator, shape: Any, wt: str, scale: float = 1.0, offset: float = 0.0):
    """Random weights of type wt: (the array to upload, its exact value in float64)."""
    a = (offset + scale * rng.standard_normal(shape)).astype(np.float32)
    if wt == "f32":
        return a, a.astype(np.float64)
    if wt == "f16":
        h = a.astype(np.float16)
        return h, h.astype(np.float64)
    bits = ref.f32_to_bf16(a)  # bf16 travels as its uint16 bit patterns
    return bits, ref.bf16_to_f32(bits).astype(np.float64)


def activations(rng: np.random.Generator, batch: int, k: int) -> np.ndarray:
    """x rows of different magnitudes (a folded RMSNorm must not care)."""
    return (rng.standard_normal((batch, k)) * rng.uniform(0.1, 10.0, (batch, 1))).astype(np.float32)


def out_buffer(cp: Any, count: int, fill: float = np.nan, dtype: Any = np.float32, head: Any = None) -> Any:
    """A device buffer of count elements plus a guard, all ``fill``, or ``head`` then the guard."""
    host = np.full(count + GUARD, fill, dtype=dtype)
    if head is not None:
        host[:count] = np.asarray(head, dtype=dtype).reshape(-1)
    return cp.asarray(host)


def fetch(buf: Any, count: int, finite: bool = False) -> np.ndarray:
    """The first count elements as float64, after checking that the guard is still all NaN; ``finite``: every
    element written (kernels that leave padding rows alone are checked row by row instead)."""
    host = buf.get()
    assert np.all(np.isnan(host[count:])), "kernel wrote past the end of its output"
    out = host[:count].astype(np.float64)
    if finite:
        assert np.all(np.isfinite(out)), "output has NaN/inf (an element left unwritten?)"
    return out


def rel_err(out: Any, expect: Any) -> float:
    """||out - expect|| / ||expect|| over all elements; out must be finite."""
    out, expect = np.asarray(out, np.float64).reshape(-1), np.asarray(expect, np.float64).reshape(-1)
    assert np.all(np.isfinite(out)), "output has NaN/inf (an element left unwritten?)"
    return float(np.linalg.norm(out - expect) / np.linalg.norm(expect))


# ---- HF transformers' greedy decoding (GPU) -----------------------------------------------------------------


def prompt_ids(seed: int, length: int, vocab: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, length).tolist()


def hf_greedy(torch: Any, model: Any, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """(n greedy tokens, the f32 logits of each step as NumPy) by full-sequence forwards: no KV cache and no
    ``generate()``, so nothing depends on how a transformers version handles caches, EOS or generation configs."""
    ids = torch.tensor([prompt], dtype=torch.long, device="cuda")
    toks, logits = [], []
    with torch.inference_mode():
        for _ in range(n):
            lg = model(input_ids=ids, use_cache=False).logits[0, -1].float()
            t = int(torch.argmax(lg))
            toks.append(t)
            logits.append(lg.cpu().numpy())
            ids = torch.cat([ids, ids.new_tensor([[t]])], dim=1)
    return toks, logits


def first_difference(a: list, b: list) -> int | None:
    """The first index where two token lists differ (None: equal over the shorter one)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
