"""Time one plan three ways on one stream: eager CuPy launches, CuPy stream capture, dagbuild's graph.

All three run the same kernels over the same buffers in the same topological order; only how the work
reaches the GPU differs. Latency is per step, host-observed: launch, then wait for the step to finish.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from .executable import Executable
from .ir import Plan


def capture(stream: Any, steps: list[Callable[[Any], None]]) -> Any:
    """One CuPy graph recorded by stream capture of ``steps``, uploaded (the caller has warmed up)."""
    stream.begin_capture()
    try:
        for f in steps:
            f(stream)
    finally:
        graph = stream.end_capture()
    graph.upload(stream)
    return graph


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 5, trials: int = 3) -> dict[str, float]:
    """Device-to-device copy bandwidth, bytes read + written per second, best of several (GB/s): the ceiling
    that memory-bound benchmarks compare with (``GBps``; also per way of copying: memcpy, a copy kernel)."""
    import cupy as cp

    a = cp.empty(nbytes, dtype=cp.uint8)
    b = cp.empty_like(a)
    a.view(cp.uint64).fill(0x0123456789ABCDEF)
    s = cp.cuda.Stream(non_blocking=True)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    kinds = {
        "memcpy": lambda: cp.cuda.runtime.memcpyAsync(b.data.ptr, a.data.ptr, nbytes, 3, s.ptr),
        "kernel": lambda: b.view(cp.uint64).__setitem__(Ellipsis, a.view(cp.uint64)),
    }
    best: dict[str, float] = {}
    for name, fn in kinds.items():
        with s:
            fn()
            s.synchronize()
            for _ in range(trials):
                start.record(s)
                for _ in range(reps):
                    fn()
                end.record(s)
                end.synchronize()
                sec = cp.cuda.get_elapsed_time(start, end) * 1e-3 / reps
                best[name] = max(best.get(name, 0.0), 2 * nbytes / sec / 1e9)
    kinds.clear()
    a = b = None
    cp.get_default_memory_pool().free_all_blocks()
    return {"GBps": max(best.values()), **{f"{k}_GBps": v for k, v in best.items()}, "buffer_bytes": nbytes}


def device_us_per_launch(exe: Executable, reps: int) -> float:
    """Device µs per step of ``reps`` back-to-back explicit launches (no host round trip between)."""
    import cupy

    stream = exe.stream
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record(stream)
    for _ in range(reps):
        exe.launch(stream)
    end.record(stream)
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) * 1e3 / reps


def launch_modes(exe: Executable) -> dict[str, Callable[[], None]]:
    """The three ways to run one step on ``exe.stream``: ``eager`` (every node a CuPy launch),
    ``captured`` (that sequence recorded once by CuPy stream capture, after a warm-up run) and
    ``explicit`` (dagbuild's graph)."""
    stream = exe.stream
    eager = exe.eager_steps()

    def run_eager() -> None:
        for f in eager:
            f(stream)

    run_eager()  # the warm-up launch that capture needs
    stream.synchronize()
    captured = capture(stream, eager)
    stream.synchronize()
    return {"eager": run_eager, "captured": lambda: captured.launch(stream), "explicit": lambda: exe.launch(stream)}


def _time(launch: Callable[[], None], stream: Any, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        launch()
    stream.synchronize()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        launch()
        stream.synchronize()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def _stats(us: list[float]) -> dict[str, float]:
    s = sorted(us)
    return {"median_us": statistics.median(s), "p99_us": s[min(len(s) - 1, int(0.99 * len(s)))],
            "mean_us": statistics.fmean(s)}


def bench(plan: Plan, steps: int = 500, warmup: int = 20, exe: Executable | None = None) -> dict[str, Any]:
    """Eager vs captured vs explicit on one stream, in one run. Returns medians, p99s and speedups."""

    own = exe is None
    t0 = time.perf_counter()
    exe = exe or Executable(plan)
    build_ms = (time.perf_counter() - t0) * 1e3
    try:
        stream = exe.stream
        modes = launch_modes(exe)
        times = {name: _time(f, stream, steps, warmup) for name, f in modes.items()}
        # a second pass, interleaved order, guards against drift (clocks, caches) favouring one mode
        for name in ("explicit", "captured", "eager"):
            times[name] += _time(modes[name], stream, steps, warmup)
        device_us = device_us_per_launch(exe, steps)
    finally:
        if own:
            exe.close()
    stats = {name: _stats(t) for name, t in times.items()}
    n = len(plan.nodes)
    return {
        "spec": plan.name, "nodes": n, "critical_path": plan.summary.get("critical_path"),
        "max_width": plan.summary.get("max_width"), "steps": 2 * steps, "build_ms": build_ms,
        **{name: s for name, s in stats.items()},
        "speedup_vs_eager": stats["eager"]["median_us"] / stats["explicit"]["median_us"],
        "speedup_vs_captured": stats["captured"]["median_us"] / stats["explicit"]["median_us"],
        "p99_speedup_vs_captured": stats["captured"]["p99_us"] / stats["explicit"]["p99_us"],
        "explicit_device_us_per_step": device_us,
        "explicit_device_us_per_node": device_us / max(n, 1),
        "device": _device_name(),
    }


def _device_name() -> str:
    import cupy

    return cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()


def format_bench(r: dict[str, Any]) -> str:
    lines = [f"{r['spec']}: {r['nodes']} nodes (critical path {r['critical_path']}, width {r['max_width']}) "
             f"on {r['device']}, {r['steps']} steps per mode, one stream", "",
             f"{'mode':<10} {'median µs':>10} {'p99 µs':>10}"]
    for name in ("eager", "captured", "explicit"):
        lines.append(f"{name:<10} {r[name]['median_us']:>10.1f} {r[name]['p99_us']:>10.1f}")
    lines += ["", f"explicit vs eager: {r['speedup_vs_eager']:.2f}× faster (median)",
              f"explicit vs captured: {r['speedup_vs_captured']:.2f}× faster (median), "
              f"{r['p99_speedup_vs_captured']:.2f}× (p99)",
              f"explicit device time: {r['explicit_device_us_per_step']:.1f} µs per step, "
              f"{r['explicit_device_us_per_node']:.2f} µs per node"]
    return "\n".join(lines)


def run_steps(plan: Plan, steps: int = 100) -> dict[str, float]:
    """Build, launch ``steps`` times, report build time and per-launch latency."""
    t0 = time.perf_counter()
    with Executable(plan) as exe:
        build_ms = (time.perf_counter() - t0) * 1e3
        times = _time(lambda: exe.launch(), exe.stream, steps, 3)
    return {"build_ms": build_ms, **_stats(times)}
