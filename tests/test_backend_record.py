"""Child-graph bodies recorded ahead on threads (CudaBackend.record_children): which bodies go where, what
add_child_graph takes, and that a failing recording leaves nothing behind. No GPU: the driver, the capture
and the library handles are stand-ins."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from dagbuild.backends.cuda import CudaBackend
from dagbuild.errors import DagbuildError


class FakeLibrary:
    def __init__(self):
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeDriver:
    CUstream_flags = SimpleNamespace(CU_STREAM_NON_BLOCKING=1)

    def __init__(self):
        self.streams, self.destroyed_streams, self.ctx_calls = 0, [], []

    def cuStreamCreate(self, flags):
        self.streams += 1
        return (0, f"stream{self.streams}")

    def cuStreamDestroy(self, s):
        self.destroyed_streams.append(s)
        return (0,)

    def cuCtxSetCurrent(self, ctx):
        self.ctx_calls.append((ctx, threading.current_thread().name))
        return (0,)


def fake_backend(fail_on=None):
    be = object.__new__(CudaBackend)
    be._drv = FakeDriver()
    be._ctx = "ctx"
    be._blas = None
    be._capture_stream = None
    be._recorders = []
    be._recorded = {}
    be.libraries, be.captured, be.destroyed, be.added = [], [], [], []
    be._library = lambda: be.libraries.append(FakeLibrary()) or be.libraries[-1]

    def capture(calls, recorder=None):
        if calls == fail_on:
            raise DagbuildError(f"cannot record {calls}")
        g = ("graph", calls, recorder[0] if recorder else None, len(be.captured))
        be.captured.append(g)
        return g

    be.capture = capture
    be.graph_destroy = be.destroyed.append
    be._deps = lambda deps: list(deps)
    be._drv.cuGraphAddChildGraphNode = lambda graph, d, n, child: (
        be.added.append(child) or (0, f"node{len(be.added)}"))
    return be


def test_record_children_spreads_bodies_over_threads_and_add_takes_them():
    be = fake_backend()
    bodies = [(("gemm", (("m", "i32", i),)),) for i in range(10)] + [(("gemm", (("m", "i32", 3),)),)]
    be.record_children(bodies, workers=4)
    assert len(be.captured) == 11
    assert len(be._recorders) == 4 and len(be.libraries) == 4  # a stream and a library handle per thread
    assert {g[2] for g in be.captured} == {"stream1", "stream2", "stream3", "stream4"}
    assert len(be._drv.ctx_calls) == 4  # every thread made the context current
    assert all(ctx == "ctx" and name != threading.main_thread().name for ctx, name in be._drv.ctx_calls)
    assert len(be._recorded[bodies[3]]) == 2  # the same body twice: two graphs
    for body in bodies:
        be.add_child_graph("parent", [], body)
    assert be._recorded == {}
    assert sorted(be.added, key=lambda g: g[3]) == sorted(be.captured, key=lambda g: g[3])
    assert sorted(be.destroyed) == sorted(be.added)  # the node holds a clone: each recorded graph is freed
    be.add_child_graph("parent", [], (("gemm", (("m", "i32", 99),)),))  # not recorded ahead: captured now
    assert be.added[-1][2] is None


def test_record_children_failure_frees_what_it_recorded_and_raises():
    be = fake_backend(fail_on=(("gemm", (("m", "i32", 5),)),))
    bodies = [(("gemm", (("m", "i32", i),)),) for i in range(8)]
    with pytest.raises(DagbuildError, match="cannot record"):
        be.record_children(bodies, workers=2)
    assert be._recorded == {}
    assert sorted(be.destroyed, key=lambda g: g[3]) == sorted(be.captured, key=lambda g: g[3])


def test_discard_and_close_free_recorded_graphs_streams_and_handles():
    be = fake_backend()
    bodies = [(("gemm", (("m", "i32", i),)),) for i in range(3)]
    be.record_children([], workers=8)  # nothing to record: no thread, stream or handle
    assert be._recorders == []
    be.record_children(bodies, workers=8)  # no more threads than bodies
    assert len(be._recorders) == 3
    be.add_child_graph("parent", [], bodies[0])
    be.discard_recorded()
    assert be._recorded == {} and len(be.destroyed) == 3
    be.close()
    assert all(lib.closed for lib in be.libraries)
    assert sorted(be._drv.destroyed_streams) == ["stream1", "stream2", "stream3"]
    assert be._recorders == []


@pytest.mark.parametrize("bad", [0, -2, 2.0, "8", True])
def test_exec_options_refuses_bad_record_workers(bad):
    from dagbuild.errors import BuildError
    from dagbuild.executable import ExecOptions

    with pytest.raises(BuildError, match=r"record_workers=.*integer ≥ 1"):
        ExecOptions(record_workers=bad)
    assert ExecOptions(record_workers=3).record_workers == 3
