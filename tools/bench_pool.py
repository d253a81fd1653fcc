"""Build a graph per batch bucket for the TinyLlama-shape decode spec, explicitly (GraphPool) and by
CuPy stream capture of the same kernels (warm-up launch + capture + instantiate per bucket), in one
run on one GPU. Prints build time and device memory added beyond the shared arena.

    python tools/bench_pool.py [--buckets vllm|1,2,4,...] [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def vllm_sizes() -> list[int]:
    """1, 2, 4, then 8 to 256 in steps of 8, then 272 to 512 in steps of 16."""
    return [1, 2, 4, *range(8, 257, 8), *range(272, 513, 16)]


def free_bytes() -> int:
    import cupy

    cupy.cuda.Device().synchronize()
    gc.collect()
    return cupy.cuda.runtime.memGetInfo()[0]


def main() -> int:
    import cupy

    from dagbuild import load_spec
    from dagbuild.bench import eager_steps
    from dagbuild.pool import GraphPool

    ap = argparse.ArgumentParser()
    ap.add_argument("--buckets", default="vllm")
    ap.add_argument("--max-seq", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args()
    sizes = vllm_sizes() if args.buckets == "vllm" else sorted({int(x) for x in args.buckets.split(",")})
    spec = load_spec(ROOT / "specs" / "llama_decode.yaml")
    overrides = {"cache_batch": max(sizes), "max_seq": args.max_seq}
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    results = {"buckets": len(sizes), "sizes": sizes, "device": name}

    # warm the compile caches (CuPy's and dagbuild's PTX cache): compile cost is not graph-building cost
    warm = GraphPool(spec, {"batch": [1]}, overrides={**overrides, "cache_batch": 1})
    warm.close()
    del warm

    for method in ("derive", "fresh"):
        f0 = free_bytes()
        t0 = time.perf_counter()
        pool = GraphPool(spec, {"batch": sizes}, overrides=overrides, eager=False, method=method)
        t_arena = time.perf_counter()
        f1 = free_bytes()
        for n in sizes:
            pool.get(batch=n)
        t1 = time.perf_counter()
        pool.upload()
        f2 = free_bytes()
        results[f"explicit_{method}"] = {
            "build_s": t1 - t_arena, "build_plus_arena_s": t1 - t0,
            "arena_mib": (f0 - f1) / 2**20, "graphs_mib": (f1 - f2) / 2**20,
            "per_bucket_ms": {str(k[0]): round(v, 3) for k, v in sorted(pool.build_ms.items())},
        }
        if method == "derive":
            # stream capture of the very same kernels over the same arena, one bucket at a time
            stream = pool.stream
            graphs = []
            g0 = free_bytes()
            t2 = time.perf_counter()
            for n in sizes:
                steps = eager_steps(pool.get(batch=n))
                for f in steps:  # the warm-up launch capture-based engines run first
                    f(stream)
                stream.synchronize()
                stream.begin_capture()
                for f in steps:
                    f(stream)
                g = stream.end_capture()
                g.upload(stream)
                graphs.append(g)
            stream.synchronize()
            t3 = time.perf_counter()
            g1 = free_bytes()
            results["captured"] = {"build_s": t3 - t2, "graphs_mib": (g0 - g1) / 2**20}
            del graphs
        pool.close()
        del pool
    e, c = results["explicit_derive"], results["captured"]
    fr = results["explicit_fresh"]
    print(f"{results['device']}: TinyLlama-shape decode graph, {len(sizes)} batch buckets {sizes[0]}..{sizes[-1]}")
    print(f"{'method':<28} {'build s':>9} {'MiB beyond arena':>17}")
    print(f"{'explicit (derive+update)':<28} {e['build_s']:>9.3f} {e['graphs_mib']:>17.1f}")
    print(f"{'explicit (fresh nodes)':<28} {fr['build_s']:>9.3f} {fr['graphs_mib']:>17.1f}")
    print(f"{'CuPy stream capture':<28} {c['build_s']:>9.3f} {c['graphs_mib']:>17.1f}")
    print(f"arena: {e['arena_mib']:.0f} MiB; explicit is {c['build_s'] / e['build_s']:.1f}× faster to build")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
