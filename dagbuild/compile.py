"""Kernel checks that need no GPU: NVRTC compiles each kernel to PTX and its ``.entry`` params are
compared with the spec's declaration (count; pointer vs 32/64-bit integer vs float)."""

from __future__ import annotations

import functools

from .errors import CompileError, Issue, SpecError
from .plan import Plan, PlanKernel


@functools.lru_cache(maxsize=64)
def _ptx(source: str, kernel: str, arch: str, options: tuple[str, ...]) -> str:
    from .kernels import compile_ptx

    return compile_ptx(source, kernel, arch=arch, options=options)


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
