"""Kernel checks that need no GPU: NVRTC compiles each kernel to PTX and its ``.entry`` params are
compared with the spec's declaration (count; pointer vs 32/64-bit integer vs float)."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from .errors import CompileError, Issue, SpecError
from .plan import Plan, PlanKernel


def cache_dir() -> Path | None:
    """Where PTX for signature checks is kept between runs (``DAGBUILD_CACHE_DIR``; empty disables)."""
    env = os.environ.get("DAGBUILD_CACHE_DIR")
    if env == "":
        return None
    return Path(env) if env else Path.home() / ".cache" / "dagbuild"


@functools.lru_cache(maxsize=64)
def _ptx(source: str, kernel: str, arch: str, options: tuple[str, ...]) -> str:
    """PTX of a kernel source, compiled once per source/arch/options (memory, then a disk cache)."""
    from .kernels import compile_ptx, nvrtc_version

    key = hashlib.sha256(repr((source, arch, options, nvrtc_version())).encode()).hexdigest()[:32]
    root = cache_dir()
    path = root / f"{key}.ptx" if root else None
    if path is not None and path.is_file():
        return path.read_text()
    ptx = compile_ptx(source, kernel, arch=arch, options=options)
    if path is not None:
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(ptx)
            tmp.replace(path)
        except OSError:
            pass  # a read-only home only costs a recompile next time
    return ptx


def check_kernel(k: PlanKernel, arch: str) -> list[Issue]:
    """``signature`` issues for one kernel (empty when it matches); CompileError if it does not compile."""
    from .kernels import check_signature

    ptx = _ptx(k.source, k.name, arch, k.options)
    return check_signature(k.name, k.entry, [(p.name, p.kind) for p in k.params], ptx)


def check_plan(plan: Plan, arch: str = "sm_90") -> dict[str, dict]:
    """Compile and check every kernel of a plan; raise SpecError listing every mismatch."""
    issues, report = [], {}
    for name, k in plan.kernels.items():
        try:
            found = check_kernel(k, arch)
        except CompileError as e:
            issues.append(Issue("compile", str(e), field=f"kernels.{name}"))
            continue
        issues += found
        report[name] = {"entry": k.entry, "params": len(k.params),
                        "ptx_bytes": len(_ptx(k.source, k.name, arch, k.options))}
    if issues:
        raise SpecError(issues)
    return report
