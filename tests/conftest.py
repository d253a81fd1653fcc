"""Shared test fixtures: the GPU marker skips cleanly, with the reason, where no device is found."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
KERNELS = ROOT / "kernels"


@functools.cache
def gpu_unavailable_reason() -> str | None:
    """None when a CUDA device is usable through CuPy, else why not."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a CUDA library that fails to load
        return f"cupy is not importable ({type(e).__name__}: {e})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"no CUDA device ({type(e).__name__}: {e})"
    if n < 1:
        return "no CUDA device"
    try:
        import cuda.bindings.driver  # noqa: F401
    except Exception as e:
        return f"cuda-bindings is not importable ({e})"
    return None


class CountingBackend:
    """Wraps a backend and counts instantiations (to show that something did *not* re-instantiate)."""

    def __init__(self, inner):
        self.inner, self.instantiations = inner, 0

    def instantiate(self, graph):
        self.instantiations += 1
        return self.inner.instantiate(graph)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def pytest_collection_modifyitems(config, items):
    reason = None
    for item in items:
        if "gpu" in item.keywords:
            reason = reason or gpu_unavailable_reason()
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"GPU test: {reason}"))
