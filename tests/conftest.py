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
    """None when a GPU is usable, else why not (dagbuild's own probe, the one the CLI uses)."""
    from dagbuild.backends import gpu_problem

    return gpu_problem()


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
