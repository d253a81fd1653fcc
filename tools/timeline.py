#!/usr/bin/env python3
"""Where a decode step's device time goes, node by node: a CUPTI timeline of the explicit graph.

Builds the decode step (default: the fused spec, TinyLlama shape, f16, batch 1) with random weights, fills the
KV cache up to ``--pos``, then records ``--reps`` back-to-back graph launches with torch.profiler (CUPTI: the
graph's kernels are traced with their start and end). Per node it reports the kernel's own span and its
*increment*: its end minus the previous kernel's end, the time the node adds to the chain. Under programmatic
edges a kernel starts (prefetching its weights) before its producer ends, so the span overstates a node's cost
and the increment is the figure that sums to the step. Grouped by node kind (node id before the first dot),
with the weight bytes each kind reads and the bandwidth its increment implies.

  python3 tools/timeline.py                                      # fused TinyLlama, batch 1, position 100
  python3 tools/timeline.py --config specs/configs/llama_tiny.yaml --json t.json
  python3 tools/timeline.py --set batch=8 --pos 128
  python3 tools/timeline.py --set batch=64 --set cache_batch=64   # GEMM path: a row per kernel name instead

A plan with library child graphs (the fused spec's GEMM path from gemm_batch rows) cannot be matched to nodes
kernel by kernel (cuBLAS picks its kernels): it is reported per kernel name, cuBLAS's marked as the library's.

CUPTI tracing adds a little per kernel: compare the traced step with the untraced one printed beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dagbuild.bench import copy_bandwidth, device_us_per_launch  # noqa: E402
from dagbuild.executable import ExecOptions, Executable  # noqa: E402
from dagbuild.llama.decode import llama_plan  # noqa: E402
from dagbuild.llama.weights import matrix_bytes, random_weights  # noqa: E402


def parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        name, _, value = item.partition("=")
        out[name] = yaml.safe_load(value)
    return out


def add_step_args(ap: argparse.ArgumentParser, reps: int, reps_help: str) -> None:
    """The arguments of a traced decode step, shared with tools/blocktrace.py."""
    ap.add_argument("--spec", default=str(ROOT / "specs" / "llama_decode_fused.yaml"))
    ap.add_argument("--config", default=str(ROOT / "specs" / "configs" / "tinyllama.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="DIM=V", help="override a dim (e.g. batch=8)")
    ap.add_argument("--pos", type=int, default=100, help="every row's position (KV entries before it are used)")
    ap.add_argument("--reps", type=int, default=reps, help=reps_help)


def step_plan(args: argparse.Namespace):
    """The plan of ``--spec`` at ``--config``'s dims with the ``--set`` overrides."""
    dims = yaml.safe_load(Path(args.config).read_text())
    return llama_plan({**dims, **parse_set(args.set)}, args.spec)


def prime(exe: Executable, plan, pos: int) -> None:
    """Random weights, token 1 and position ``pos`` in every row, and a few launches to warm up."""
    random_weights(exe, 0)
    b = plan.dims["batch"]
    exe.buffers["tokens_host"][:b] = 1
    exe.buffers["pos_host"][:b] = pos
    for _ in range(5):
        exe.launch(exe.stream)
    exe.stream.synchronize()


def kernel_nodes(plan) -> list[tuple[str, str, int]]:
    """(node id, kernel entry, weight bytes) of every kernel node, in the plan's topological order."""
    rows = []
    for n in plan.topological():
        if n.kind != "kernel":
            continue
        rows.append((n.id, plan.kernels[n.op.kernel].entry, matrix_bytes(n.op)))
    return rows


def trace(torch, exe, reps: int) -> list[dict[str, float]]:
    """Kernel events (name, start, end in µs) of `reps` back-to-back launches, in start order."""
    from torch.profiler import ProfilerActivity, profile

    stream = exe.stream
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            exe.launch(stream)
        stream.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA" and e.time_range.elapsed_us() >= 0]
    kernels = sorted(({"name": e.name, "start": e.time_range.start, "end": e.time_range.end} for e in events
                      if "memcpy" not in e.name.lower() and "memset" not in e.name.lower()),
                     key=lambda k: k["start"])
    return kernels


def split_launches(kernels: list[dict[str, float]], per_launch: int) -> list[list[dict[str, float]]]:
    return [kernels[i:i + per_launch] for i in range(0, len(kernels) - per_launch + 1, per_launch)]


def idle_us(launch: list[dict[str, float]]) -> float:
    """Time within one launch when no kernel runs: the exposed gaps between nodes (the union of the spans
    against the first start to last end)."""
    idle, reach = 0.0, launch[0]["start"]
    for k in sorted(launch, key=lambda k: k["start"]):
        idle += max(0.0, k["start"] - reach)
        reach = max(reach, k["end"])
    return idle


def per_name(launches: list[list[dict[str, float]]], entries: set[str]) -> list[dict[str, Any]]:
    """Per kernel name, medians over launches: calls a step, µs a call (span), µs a step (the spans summed),
    biggest first. For plans with library child graphs (cuBLAS picks its own kernels, so a launch's kernels
    cannot be matched to nodes one by one); a name that is not one of the plan's ``entries`` is the library's."""
    names = sorted({k["name"] for launch in launches for k in launch})
    rows = []
    for name in names:
        calls = [sum(1 for k in launch if k["name"] == name) for launch in launches]
        spans = [sum(k["end"] - k["start"] for k in launch if k["name"] == name) for launch in launches]
        n = statistics.median(calls)
        rows.append({"kernel": name, "library": name not in entries, "calls": n,
                     "span_us": statistics.median(spans) / n if n else 0.0, "step_us": statistics.median(spans)})
    return sorted(rows, key=lambda r: -r["step_us"])


def library_report(plan, kernels: list[dict[str, float]], reps: int, untraced_us: float) -> list[str]:
    """The per-name table of a plan with child graphs (see :func:`per_name`), as lines."""
    if len(kernels) % reps:
        return [f"{len(kernels)} kernel events over {reps} launches: not a whole number a launch (a launch cut "
                "off?), no table"]
    launches = split_launches(kernels, len(kernels) // reps)
    steps = [launch[-1]["end"] - launch[0]["start"] for launch in launches]
    idle = statistics.median(idle_us(launch) for launch in launches)
    rows = per_name(launches, {k.entry for k in plan.kernels.values()})
    lines = [f"step: traced {statistics.median(steps):.1f} µs (first kernel start to last end), untraced "
             f"{untraced_us:.1f} µs per launch back to back; {len(launches[0])} kernels a launch (library child "
             f"graphs: one row per kernel name); exposed gaps (no kernel running) {idle:.1f} µs",
             f"{'kernel':<64}{'calls':>7}{'µs/call':>10}{'µs/step':>10}"]
    for r in rows:
        name = ("[library] " if r["library"] else "") + r["kernel"]
        lines.append(f"{name[:63]:<64}{r['calls']:>7g}{r['span_us']:>10.2f}{r['step_us']:>10.1f}")
    lib = sum(r["step_us"] for r in rows if r["library"])
    lines.append(f"library kernels {lib:.1f} µs a step, the plan's own {sum(r['step_us'] for r in rows) - lib:.1f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_args(ap, 20, "traced launches (default 20)")
    ap.add_argument("--plain", action="store_true", help="plain edges instead of programmatic ones")
    ap.add_argument("--json", help="write the per-node and per-kind rows here")
    args = ap.parse_args(argv)

    import torch

    torch.cuda.init()
    plan = step_plan(args)
    nodes = kernel_nodes(plan)
    copy = copy_bandwidth()
    with Executable(plan, ExecOptions(programmatic=not args.plain)) as exe:
        prime(exe, plan, args.pos)
        untraced_us = device_us_per_launch(exe, 50)
        events = trace(torch, exe, args.reps)
    if not events:
        print("no kernel events traced (CUPTI unavailable?)")
        return 1
    if any(n.kind == "child" for n in plan.nodes):
        print(f"{torch.cuda.get_device_name()} · copy {copy['GBps']:.0f} GB/s · {Path(args.spec).name} · "
              f"{Path(args.config).name} {parse_set(args.set) or ''} · pos {args.pos}")
        print("\n".join(library_report(plan, events, args.reps, untraced_us)))
        return 0
    launches = split_launches(events, len(nodes))
    names_ok = all(k["name"] == n[1] for launch in launches for k, n in zip(launch, nodes, strict=True))
    per_node = []
    for i, (nid, entry, wbytes) in enumerate(nodes):
        spans = [launch[i]["end"] - launch[i]["start"] for launch in launches]
        incs = [launch[i]["end"] - (launch[i - 1]["end"] if i else launch[i]["start"]) for launch in launches]
        per_node.append({"id": nid, "kernel": entry, "weight_bytes": wbytes, "span_us": statistics.median(spans),
                         "inc_us": statistics.median(incs)})
    steps = [launch[-1]["end"] - launch[0]["start"] for launch in launches]
    idle = statistics.median(idle_us(launch) for launch in launches)
    kinds: dict[str, dict[str, Any]] = {}
    for r in per_node:
        k = kinds.setdefault(r["id"].split(".")[0], {"kind": r["id"].split(".")[0], "kernel": r["kernel"],
                                                      "nodes": 0, "inc_us": 0.0, "span_us": 0.0, "weight_bytes": 0})
        k["nodes"] += 1
        k["inc_us"] += r["inc_us"]
        k["span_us"] += r["span_us"]
        k["weight_bytes"] += r["weight_bytes"]
    gbps = copy["GBps"]
    print(f"{torch.cuda.get_device_name()} · copy {gbps:.0f} GB/s · {Path(args.spec).name} · "
          f"{Path(args.config).name} {parse_set(args.set) or ''} · pos {args.pos} · "
          f"{'plain' if args.plain else 'programmatic'} edges")
    print(f"step: traced {statistics.median(steps):.1f} µs (first kernel start to last end), untraced "
          f"{untraced_us:.1f} µs per launch back to back; {len(nodes)} kernel nodes; kernel names "
          f"{'match' if names_ok else 'DO NOT match'} the plan order")
    print(f"{'kind':<12}{'kernel':<26}{'nodes':>6}{'inc µs/node':>13}{'span µs/node':>14}{'inc µs/step':>13}"
          f"{'floor µs':>10}{'% of copy':>11}")
    for k in kinds.values():
        n = k["nodes"]
        floor = k["weight_bytes"] / (gbps * 1e3)
        pct = f"{100 * floor / k['inc_us']:.0f} %" if k["weight_bytes"] else ""
        print(f"{k['kind']:<12}{k['kernel']:<26}{n:>6}{k['inc_us'] / n:>13.2f}{k['span_us'] / n:>14.2f}"
              f"{k['inc_us']:>13.1f}{floor:>10.1f}{pct:>11}")
    total_floor = sum(k["weight_bytes"] for k in kinds.values()) / (gbps * 1e3)
    print(f"sum of increments {sum(r['inc_us'] for r in per_node):.1f} µs; weight floor {total_floor:.1f} µs; "
          f"exposed gaps (no kernel running) {idle:.1f} µs, {idle / len(nodes):.2f} µs per node")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy": copy,
                                               "args": vars(args), "untraced_us": untraced_us,
                                               "traced_step_us": statistics.median(steps), "idle_us": idle,
                                               "names_match": names_ok, "nodes": per_node,
                                               "kinds": list(kinds.values())}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
