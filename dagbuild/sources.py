"""Kernel source files (placeholder until the include-inlining reader lands)."""

from __future__ import annotations

from pathlib import Path

from .errors import DagbuildError


def read_kernel_source(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DagbuildError(f"{path} is not UTF-8 text (byte {e.start})") from None
