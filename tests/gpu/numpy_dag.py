"""A NumPy interpreter of a Plan: runs the same DAG node by node on host arrays (the test oracle)."""

from __future__ import annotations

from collections.abc import Callable

import networkx as nx
import numpy as np

from dagbuild.dtypes import NP_DTYPE
from dagbuild.ir import KernelOp, MemcpyOp, MemsetOp, Plan, PlanNode, View


def _view(bufs: dict[str, np.ndarray], v: View) -> np.ndarray:
    raw = bufs[v.buffer].reshape(-1).view(np.uint8)
    return raw[v.offset: v.offset + v.nbytes]


def _f32(bufs, v: View) -> np.ndarray:
    return _view(bufs, v).view(np.float32)


def _saxpy(bufs, a):
    y = _f32(bufs, a["y"])
    y[:] = np.float32(a["a"]) * _f32(bufs, a["x"]) + y


def _scale(bufs, a):
    _f32(bufs, a["y"])[:] = np.float32(a["a"]) * _f32(bufs, a["x"])


def _add(bufs, a):
    _f32(bufs, a["out"])[:] = _f32(bufs, a["a"]) + _f32(bufs, a["b"])


def _spin(bufs, a):
    t = _f32(bufs, a["x"]).astype(np.float32).copy()
    for _ in range(a["iters"]):
        t = (t * np.float32(0.999) + np.float32(0.001)).astype(np.float32)
    _f32(bufs, a["y"])[:] = t


def _gemv_f16(bufs, a):
    n, batch = a["n"], a["batch"]
    w = _view(bufs, a["w"]).view(np.float16).astype(np.float64).reshape(n, n)
    x = _f32(bufs, a["x"]).astype(np.float64).reshape(batch, n)
    _f32(bufs, a["y"])[:] = (x @ w.T).astype(np.float32).reshape(-1)


KERNELS: dict[str, Callable] = {"saxpy": _saxpy, "scale": _scale, "add": _add, "spin": _spin,
                                "gemv_f16": _gemv_f16}


def run(plan: Plan, bufs: dict[str, np.ndarray]) -> None:
    """Execute every node of ``plan`` in a topological order over ``bufs`` (name → array), in place."""
    g = nx.DiGraph()
    g.add_nodes_from(n.id for n in plan.nodes)
    g.add_edges_from(plan.edges)
    by_id = plan.node_by_id
    for nid in nx.topological_sort(g):
        step(plan, by_id[nid], bufs)


def step(plan: Plan, n: PlanNode, bufs: dict[str, np.ndarray]) -> None:
    op = n.op
    if isinstance(op, KernelOp):
        entry = plan.kernels[op.kernel].entry
        args = {a.param.name: (a.view if a.view is not None else a.value) for a in op.args}
        KERNELS[entry](bufs, args)
    elif isinstance(op, MemcpyOp):
        _view(bufs, op.dst)[:] = _view(bufs, op.src)
    elif isinstance(op, MemsetOp):
        dt = {1: np.uint8, 2: np.uint16, 4: np.uint32}[op.element_size]
        _view(bufs, op.dst).view(dt)[:] = op.value_bits


def host_copy(exe) -> dict[str, np.ndarray]:
    out = {}
    for name, arr in exe.buffers.items():
        out[name] = arr.copy() if isinstance(arr, np.ndarray) else arr.get()
        assert out[name].dtype == np.dtype(NP_DTYPE[exe.plan.buffers[name].dtype])
    return out
