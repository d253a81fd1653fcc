"""Helpers several test files share (importable as ``helpers``: pytest puts tests/ on sys.path for conftest.py).

Written once so a fix reaches every test that uses it: spec text's issues and lines, NVRTC and ptxas reports
(CPU), and the scripts of tools/ loaded as modules.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import SPECS

from dagbuild.errors import Issue, SpecError
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


def ptx_or_skip(source: str, name: str) -> str:
    """The PTX of `source` by NVRTC (the NVRTC tests' module fixtures), or a skip saying why it cannot compile."""
    from dagbuild import kernels

    if nvrtc_reason():
        pytest.skip(str(nvrtc_reason()))
    return kernels.compile_ptx(source, name)


def entry_param_types(ptx: str) -> dict[str, list[str]]:
    """Each ``.entry``'s param types with signedness dropped (``.s32``/``.b32`` read ``.u32``, 64-bit ones
    ``.u64``): what a spec's declared params are checked against."""
    from dagbuild import kernels

    same = {".s32": ".u32", ".b32": ".u32", ".s64": ".u64", ".b64": ".u64"}
    return {name: [same.get(t, t) for t in types] for name, types in kernels.ptx_entries(ptx).items()}


def entry_bodies(ptx: str) -> dict[str, str]:
    """Each ``.entry``'s PTX text up to the next ``.entry``, by entry name."""
    parts = re.split(r"\.visible\s+\.entry\s+", ptx)[1:]
    return {p.split("(", 1)[0]: p for p in parts}


#: One entry of ptxas' ``-v`` report: "Function properties for NAME", its stack/spill line, its "Used" line.
_PTXAS_ENTRY = re.compile(r"Function properties for (\w+)\s*\n.*?(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads\s*\n[^\n]*?Used (\d+) registers([^\n]*)", re.S)


def ptxas_resources(source: str, name: str) -> dict[str, tuple[int, int, int, int, str]]:
    return ptxas_resources_and_cubin(source, name)[0]


def ptxas_resources_and_cubin(source: str, name: str) -> tuple[dict[str, tuple[int, int, int, int, str]], bytes]:
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
        cubin = kernels._nvrtc_output(nvrtc, prog, name, "CUBIN")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return {n: (int(stack), int(st), int(ld), int(regs), rest)
            for n, stack, st, ld, regs, rest in _PTXAS_ENTRY.findall(log)}, cubin


# The unit roundoff of storing an f32 value as wt (|wt(x) - x| <= ROUNDOFF[wt] |x|; f32 stores it as it is): what
# a value rounded once into a wt buffer (the KV cache) may differ by from the f32 value, relative.
ROUNDOFF = {"f32": 0.0, "f16": 2.0 ** -11, "bf16": 2.0 ** -8}


def weight_type_values(a, wt: str):
    """The float64 values of an array of weight type ``wt`` as uploaded or fetched from the device (f32, f16, or
    bf16 as its uint16 bits)."""
    import numpy as np

    from dagbuild.llama import reference as ref

    return ref.bf16_to_f32(a).astype(np.float64) if wt == "bf16" else np.asarray(a, np.float64)


def in_weight_type(a, wt: str):
    """f32 values ``a`` as a weight-type array to upload (f32, f16, or bf16 bits as uint16) and the values it
    holds, in float64 (the GPU tests' references)."""
    import numpy as np

    from dagbuild.llama import reference as ref

    a = np.asarray(a, np.float32)
    arr = a if wt == "f32" else a.astype(np.float16) if wt == "f16" else ref.f32_to_bf16(a)
    return arr, weight_type_values(arr, wt)


# ---- tools/ -------------------------------------------------------------------------------------------------


def load_tool(name: str) -> ModuleType:
    """tools/<name>.py as a module (the tools are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class body runs
    spec.loader.exec_module(mod)
    return mod
