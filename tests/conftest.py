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


# ----------------------------------------------------------------------------------------------------------
# TEMPORARY (issue 14): kernels/*.cu now `#include "port.cuh"`, which only compiles once the spec binder
# reads kernel files through dagbuild.sources.read_kernel_source (the lead wires that into the binder). Until
# it does, the tests bind specs as the wired binder will. Delete this block once dagbuild.plan (or its
# successor) calls read_kernel_source itself: the fixture then does nothing anyway.
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="session")
def _binder_inlines_kernel_includes():
    import importlib

    plan_mod = importlib.import_module("dagbuild.plan")  # the module (dagbuild.plan is also the function)
    original = getattr(plan_mod, "_read_source", None)
    if original is None or "read_kernel_source" in vars(plan_mod):
        yield  # the binder has been restructured or already inlines includes
        return
    from dagbuild.sources import SourceError, read_kernel_source

    def _read_source(name, decl, spec, issues):
        text, path = original(name, decl, spec, issues)
        if path is None or not text:
            return text, path
        try:
            return read_kernel_source(path), path
        except SourceError as e:
            issues.add("unknown_reference", f"kernel {name!r}: {e}", path=("kernels", name, "source"),
                       field=f"kernels.{name}.source")
            return "", path

    mp = pytest.MonkeyPatch()
    mp.setattr(plan_mod, "_read_source", _read_source)
    yield
    mp.undo()
