"""Where a pool bucket's build time goes (TinyLlama-shape decode graph): bind, edge inference, graph
construction, instantiation, per-node parameter setting. One process, medians of a few repeats.

    python tools/probe_build_cost.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn, reps=5):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def main() -> int:
    import yaml

    from dagbuild.bind import bind
    from dagbuild.dag import full_graph, infer_edges
    from dagbuild.executable import ExecOptions, Executable
    from dagbuild.llama.decode import llama_plan
    from dagbuild.load import load_spec

    ov = {**yaml.safe_load((ROOT / "specs/configs/tinyllama.yaml").read_text()), "max_seq": 64, "cache_batch": 64}
    spec = load_spec(ROOT / "specs/llama_decode.yaml")
    p = llama_plan({**ov, "batch": 64})
    exe = Executable(p)
    be = exe.backend
    print(f"bind: {timed(lambda: bind(spec, {**ov, 'batch': 8})):.2f} ms")
    print(f"infer_edges: {timed(lambda: infer_edges(p.nodes)):.2f} ms; "
          f"full_graph: {timed(lambda: full_graph(p)):.2f} ms")
    print(f"instantiate: {timed(lambda: be.exec_destroy(be.instantiate(exe.graph))):.2f} ms")
    params = {n.id: exe.node_params(n.id) for n in p.nodes}
    kernels = [n for n in p.nodes if n.kind == "kernel"]
    ex2 = be.instantiate(exe.graph)

    def set_all():
        for n in kernels:
            be.set_kernel(ex2, exe.handles[n.id], *params[n.id])

    ms = timed(set_all)
    print(f"exec set_kernel x{len(kernels)}: {ms:.2f} ms ({ms * 1e3 / len(kernels):.1f} us each)")
    drv = be._drv

    def graph_set_all():
        for n in kernels:
            kp, packed = be._kernel_node(*params[n.id])
            be._check("cuGraphKernelNodeSetParams", drv.cuGraphKernelNodeSetParams(exe.handles[n.id], kp))

    ms = timed(graph_set_all)
    print(f"graph cuGraphKernelNodeSetParams x{len(kernels)}: {ms:.2f} ms ({ms * 1e3 / len(kernels):.1f} us each)")

    def pack_all():
        for n in kernels:
            be._kernel_node(*params[n.id])

    ms = timed(pack_all)
    print(f"python packing only x{len(kernels)}: {ms:.2f} ms ({ms * 1e3 / len(kernels):.1f} us each)")

    def fresh():
        e = Executable(p, ExecOptions(upload=False, check_signatures=False), bound=exe.buffers,
                       modules=exe.modules, stream=exe.stream)
        e.close()

    print(f"fresh executable (add nodes + instantiate): {timed(fresh):.2f} ms")

    def derived():
        e = Executable(p, ExecOptions(upload=False, check_signatures=False), bound=exe.buffers,
                       modules=exe.modules, stream=exe.stream, derive_from=exe)
        e.close()

    print(f"derived executable, nothing to set: {timed(derived):.2f} ms")

    def clone():
        g = be._check("cuGraphClone", drv.cuGraphClone(exe.graph))
        be.graph_destroy(g)

    print(f"cuGraphClone: {timed(clone):.2f} ms")
    be.exec_destroy(ex2)
    exe.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
