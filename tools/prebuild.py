#!/usr/bin/env python3
"""Compile the shipped specs' kernel modules to cubins (and their PTX) ahead of time, no GPU needed.

A GPU machine that loads a module compiles it first (NVRTC: 5-30 s a module for the Llama kernels); a fresh
machine does it for every module it uses. This fills a cache directory (``DAGBUILD_CACHE_DIR``'s layout,
see dagbuild.kernels.module_image) with every module of every spec in specs/ at its default dims, the looped
decode specs' loop kernels included, so that a GPU machine given the directory loads them at once:

  python3 tools/prebuild.py --cache .kcache                 # here, once per change of a kernel source
  python3 tools/prebuild.py --cache .kcache --trace --trace-set layer_kernel=2 --trace-define LY_DIAG=1
                                                            # and what blocktrace.py compiles for those knobs
  DAGBUILD_CACHE_DIR=$PWD/.kcache python3 -m pytest -m gpu  # there (the device tool: carry .kcache)

A module is keyed by its source text, options, arch and NVRTC's major version, so a stale entry is never
used: it is only left on disk (``--clean`` removes what the current sources no longer name).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOOPED = ("llama_decode.yaml", "llama_decode_fused.yaml")  # their looped plans add the loop kernels


def modules(extra: tuple[Path, ...] = ()) -> dict[tuple[str, tuple[str, ...]], str]:
    """(source text, options) -> a kernel name, for every module the shipped specs (and ``extra`` specs, e.g.
    an A/B copy of one) use."""
    from dagbuild.llama.loop import looped_plan
    from dagbuild.load import load_spec
    from dagbuild.plan import plan

    out: dict[tuple[str, tuple[str, ...]], str] = {}
    for path in [*sorted((ROOT / "specs").glob("*.yaml")), *extra]:
        plans = [plan(load_spec(path))]
        if path.name in LOOPED:
            plans.append(looped_plan(plans[0], 4))
        for p in plans:
            for k in p.kernels.values():
                out.setdefault((k.source, tuple(k.options)), k.name)
    return out


def traced_modules(sets: dict, defines: list[str]) -> dict[tuple[str, tuple[str, ...]], str]:
    """The modules tools/blocktrace.py compiles for the fused TinyLlama step at ``sets``: the block trace
    alone, then with each of ``defines`` (one variant each, as tools/device_check.sh's knob stages run them;
    ``A=1,B=2`` is one variant with both);
    only the kernels the step's nodes use."""
    import yaml
    from blocktrace import traced_plan
    from timeline import step_plan

    out: dict[tuple[str, tuple[str, ...]], str] = {}
    for variant in [(), *(tuple(d.split(",")) for d in defines)]:
        args = argparse.Namespace(spec=str(ROOT / "specs" / "llama_decode_fused.yaml"),
                                  config=str(ROOT / "specs" / "configs" / "tinyllama.yaml"),
                                  set=[f"{k}={yaml.safe_dump(v).strip()}" for k, v in sets.items()])
        p = step_plan(args)
        traced_plan(p, variant)
        for name in sorted({n.op.kernel for n in p.nodes if n.kind == "kernel"}):
            k = p.kernels[name]
            out.setdefault((k.source, tuple(k.options)), k.name)
    return out


def build(job: tuple[str, tuple[str, ...], str, str]) -> tuple[str, float, int, bool]:
    """One module into the cache: (kernel name, seconds, cubin bytes, compiled now)."""
    from dagbuild import kernels

    source, options, name, arch = job
    digest = kernels._digest(source, arch, options)
    root = kernels.cache_dir()
    fresh = root is None or not (root / f"{digest}.cubin").is_file()
    t0 = time.perf_counter()
    image = kernels.module_image(source, name, arch, options)
    if image is None:
        raise SystemExit(f"cannot write the cache directory {root}")
    return name, time.perf_counter() - t0, image.stat().st_size, fresh


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=os.environ.get("DAGBUILD_CACHE_DIR") or str(ROOT / ".kcache"),
                    help="the cache directory (default: $DAGBUILD_CACHE_DIR, else .kcache in the repository)")
    ap.add_argument("--arch", default="sm_90", help="the GPU architecture (default sm_90: H100, H200)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="modules compiled at once")
    ap.add_argument("--clean", action="store_true", help="first remove cached files no current module names")
    ap.add_argument("--trace", action="store_true",
                    help="also what tools/blocktrace.py compiles for the fused TinyLlama step (at --trace-set)")
    ap.add_argument("--trace-set", action="append", default=[], metavar="DIM=V",
                    help="a dim of the traced step (e.g. layer_kernel=2)")
    ap.add_argument("--trace-define", action="append", default=[], metavar="NAME=V",
                    help="with --trace: the trace with -DNAME=V too, one variant each (e.g. LY_DIAG=1; "
                         "LY_DIAG=1,LY_PROXY_FENCE=0 is one variant with both)")
    ap.add_argument("--spec", action="append", default=[], metavar="PATH",
                    help="also this spec's modules at its default dims (e.g. an A/B copy under scratch/)")
    args = ap.parse_args()
    os.environ["DAGBUILD_CACHE_DIR"] = str(Path(args.cache).resolve())
    from dagbuild import kernels

    kernels.check_arch(args.arch)
    todo = modules(tuple(Path(p).resolve() for p in args.spec))
    if args.trace or args.trace_define:
        sys.path.insert(0, str(ROOT / "tools"))
        from timeline import parse_set

        todo |= {key: name for key, name in traced_modules(parse_set(args.trace_set), args.trace_define).items()
                 if key not in todo}
    root = Path(os.environ["DAGBUILD_CACHE_DIR"])
    if args.clean and root.is_dir():
        keep = {kernels._digest(src, args.arch, opts) for src, opts in todo}
        for f in root.iterdir():
            if f.name.split(".")[0] not in keep:
                f.unlink()
    jobs = [(src, opts, name, args.arch) for (src, opts), name in todo.items()]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for name, seconds, size, fresh in pool.map(build, jobs):
            print(f"{name:<28} {'compiled' if fresh else 'cached':<9} {seconds:6.1f} s  cubin {size / 2**20:5.2f} MiB",
                  flush=True)
    total = sum(f.stat().st_size for f in root.iterdir() if f.is_file())
    print(f"{len(jobs)} modules for {args.arch} in {root} ({total / 2**20:.1f} MiB), {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
