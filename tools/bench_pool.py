"""Build a graph per batch bucket for the TinyLlama-shape decode spec, explicitly (GraphPool) and by
CuPy stream capture of the same kernels (warm-up launch + capture + instantiate per bucket), on one GPU.
Each method runs in its own process (driver memory is measured from a clean start); the figures are
build time and device memory added beyond the shared arena.

    python tools/bench_pool.py [--buckets vllm67|vllm51|1,2,4,...] [--json OUT] [--profile]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
METHODS = ("derive", "fresh", "serial", "captured")


def sizes_for(name: str) -> list[int]:
    if name == "vllm67":  # 1, 2, 4, then 8 to 256 step 8, then 272 to 768 step 16: 67 sizes
        return [1, 2, 4, *range(8, 257, 8), *range(272, 769, 16)]
    if name == "vllm51":  # the same rule stopping at 512: 51 sizes
        return [1, 2, 4, *range(8, 257, 8), *range(272, 513, 16)]
    return sorted({int(x) for x in name.split(",")})


def free_bytes() -> int:
    import cupy

    cupy.cuda.Device().synchronize()
    gc.collect()
    return cupy.cuda.runtime.memGetInfo()[0]


def one(method: str, sizes: list[int], max_seq: int, profile: bool, spec_path: str, sets: dict[str, int]) -> dict:
    """Run one method in this process; device memory is read with memGetInfo around the graph builds."""
    import cupy

    from dagbuild import load_spec
    from dagbuild.bench import capture
    from dagbuild.executable import ExecOptions
    from dagbuild.pool import GraphPool

    cupy.cuda.set_allocator(None)  # plain cudaMalloc/cudaFree: memGetInfo sees exactly what is held
    cupy.cuda.set_pinned_memory_allocator(None)
    spec = load_spec(spec_path)
    overrides = {"cache_batch": max(sizes), "max_seq": max_seq, **sets}
    # warm the compile caches (CuPy's and dagbuild's PTX cache): compiling is not graph building
    # every side of the fused spec's variants (GEMV engine, MV engine at 2 and 1 blocks per SM, MMA engine)
    warm = sorted({n for n in (1, 2, 16, 32) if n <= max(sizes)} | {min(sizes)})
    GraphPool(spec, {"batch": warm}, overrides={**overrides, "cache_batch": warm[-1]}).close()
    f0 = free_bytes()
    pool = GraphPool(spec, {"batch": sizes}, overrides=overrides, eager=False,
                     method="fresh" if method == "fresh" else "derive", concurrent=method != "serial")
    f1 = free_bytes()
    out = {"method": method, "arena_mib": (f0 - f1) / 2**20, "arena_buffers_mib": pool.arena_bytes / 2**20}
    if method != "captured":
        prof = None
        if profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        gc.disable()  # as GraphPool(eager=True) does while it builds every bucket
        before = dict(pool.phases)  # the largest bucket's plan, made when the pool was
        t0 = time.perf_counter()
        for n in sizes:
            pool.get(batch=n)
        t1 = time.perf_counter()
        gc.enable()
        if prof is not None:
            import io
            import pstats

            prof.disable()
            buf = io.StringIO()
            for order in ("tottime", "cumulative"):
                pstats.Stats(prof, stream=buf).sort_stats(order).print_stats(25)
            out["profile"] = buf.getvalue()
        pool.upload()
        f2 = free_bytes()
        out.update(build_s=t1 - t0, graphs_mib=(f1 - f2) / 2**20,
                   per_bucket_ms={str(k[0]): round(v, 3) for k, v in sorted(pool.build_ms.items())},
                   phases_s={k: round(v - before.get(k, 0.0), 4) for k, v in pool.phases.items()})
    else:
        # the same kernels over the same arena, captured bucket by bucket; plans are bound first so only
        # capture (warm-up launch + record + instantiate + upload) is timed
        from dagbuild.executable import Executable

        exes = [Executable(pool.plan_for((n,)), ExecOptions(build_graph=False), bound=pool.arena,
                           modules=pool.modules, stream=pool.stream) for n in sizes]
        steps = [e.eager_steps() for e in exes]
        f1 = free_bytes()
        stream, graphs = pool.stream, []
        t0 = time.perf_counter()
        for fs in steps:
            for f in fs:  # the warm-up launch capture-based engines run first
                f(stream)
            stream.synchronize()
            graphs.append(capture(stream, fs))
        stream.synchronize()
        t1 = time.perf_counter()
        f2 = free_bytes()
        out.update(build_s=t1 - t0, graphs_mib=(f1 - f2) / 2**20)
        del graphs
    pool.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--buckets", default="vllm67")
    ap.add_argument("--max-seq", type=int, default=64)
    ap.add_argument("--json")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--spec", default=str(ROOT / "specs" / "llama_decode.yaml"),
                    help="e.g. specs/llama_decode_fused.yaml (its batch variants pick kernels per bucket)")
    ap.add_argument("--set", action="append", default=[], metavar="DIM=V", help="override a dim of the spec")
    ap.add_argument("--only", choices=METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = sizes_for(args.buckets)
    sets = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if not name or not value.lstrip("-").isdigit():
            ap.error(f"--set {item!r}: expected DIM=INTEGER")
        sets[name] = int(value)
    if args.only:
        print(json.dumps(one(args.only, sizes, args.max_seq, args.profile, args.spec, sets)))
        return 0
    import cupy

    results = {"buckets": len(sizes), "sizes": sizes,
               "device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()}
    for m in METHODS:
        cmd = [sys.executable, __file__, "--only", m, "--buckets", args.buckets, "--max-seq", str(args.max_seq),
               "--spec", args.spec, *(f"--set={s}" for s in args.set)]
        if args.profile and m == "serial":
            cmd.append("--profile")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"{m} failed:\n{proc.stderr[-3000:]}")
            return 1
        results[m] = json.loads(proc.stdout.strip().splitlines()[-1])
    d, f, c, s = results["derive"], results["fresh"], results["captured"], results["serial"]
    print(f"{results['device']}: TinyLlama-shape decode graph ({len(sizes)} batch buckets, {sizes[0]}..{sizes[-1]}), "
          f"arena {d['arena_mib']:.0f} MiB")
    print(f"{'method':<34} {'build s':>8} {'MiB beyond arena':>17}")
    print(f"{'explicit, derived (instantiate+set)':<34} {d['build_s']:>8.3f} {d['graphs_mib']:>17.1f}")
    print(f"{'explicit, fresh nodes':<34} {f['build_s']:>8.3f} {f['graphs_mib']:>17.1f}")
    print(f"{'explicit, derived, serialized':<34} {s['build_s']:>8.3f} {s['graphs_mib']:>17.1f}")
    print(f"{'CuPy stream capture (+warm-up)':<34} {c['build_s']:>8.3f} {c['graphs_mib']:>17.1f}")
    print(f"explicit (derived) builds {c['build_s'] / d['build_s']:.1f}× faster than capture")
    for label, r in (("derived", d), ("fresh", f)):
        print(f"host time by phase, {label}: " + ", ".join(f"{k} {v:.3f} s" for k, v in r["phases_s"].items()))
    for r in (d, s):
        if "profile" in r:
            print(r["profile"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
