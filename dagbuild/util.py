"""Small helpers shared by layers that have nothing else in common."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection inside: reading a large spec or building many graphs makes millions of
    small objects and no cycles, and the collector would rescan them again and again (most of the time of
    a 100,000-node load, a third of a pool build)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def format_bytes(n: float) -> str:
    """``1536`` → ``1.5 KiB``: sizes in messages, DOT labels and ``info``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
