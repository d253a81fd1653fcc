"""Device memory one graph executable costs, by how it was made, each case in a fresh process.

    python tools/probe_graph_memory.py            # prints MiB per executable for each case
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
N = 12
CASES = ["explicit:tiny", "explicit:tinyllama", "captured:tinyllama", "explicit:chain128",
         "explicit-noupload:tinyllama", "explicit-nocopies:tinyllama", "explicit-serial:tinyllama"]


def free() -> int:
    import cupy

    cupy.cuda.Device().synchronize()
    gc.collect()
    return cupy.cuda.runtime.memGetInfo()[0]


def case(name: str) -> dict:
    import cupy
    import yaml

    from dagbuild import load_spec, plan
    from dagbuild.bench import capture
    from dagbuild.executable import ExecOptions, Executable
    from dagbuild.llama.decode import llama_plan

    cupy.cuda.set_allocator(None)
    cupy.cuda.set_pinned_memory_allocator(None)
    how, what = name.split(":")
    if what == "chain128":
        p = plan(load_spec(ROOT / "specs" / "chain.yaml"), {"steps": 128})
    else:
        ov = yaml.safe_load((ROOT / "specs" / "configs" / ("llama_tiny.yaml" if what == "tiny" else "tinyllama.yaml"))
                            .read_text())
        p = llama_plan({**ov, "max_seq": 64})
    if how == "explicit-nocopies":  # the same kernels with the host<->device memcpy nodes dropped
        keep = [n for n in p.nodes if n.kind != "memcpy"]
        ids = {n.id for n in keep}
        a = p.analysis
        p = replace(p, nodes=keep, analysis=replace(a, edges=tuple((u, v) for u, v in a.edges
                                                                 if u in ids and v in ids)))
    base = Executable(p, ExecOptions(build_graph=False))
    f0 = free()
    held = []
    if how.startswith("explicit"):
        for _ in range(N):
            opts = ExecOptions(upload=how != "explicit-noupload", concurrent=how != "explicit-serial")
            held.append(Executable(p, opts, bound=base.buffers, modules=base.modules, stream=base.stream))
    else:
        steps = base.eager_steps()
        s = base.stream
        for f in steps:
            f(s)
        s.synchronize()
        held = [capture(s, steps) for _ in range(N)]
    f1 = free()
    return {"case": name, "nodes": len(p.nodes), "mib_per_exec": (f0 - f1) / N / 2**20}


def main() -> int:
    if len(sys.argv) > 1:
        print(json.dumps(case(sys.argv[1])))
        return 0
    for c in CASES:
        proc = subprocess.run([sys.executable, __file__, c], capture_output=True, text=True, check=False)
        if proc.returncode:
            print(c, "failed:", proc.stderr[-1500:])
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{r['case']:<32} {r['nodes']:>4} nodes  {r['mib_per_exec']:8.2f} MiB per executable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
