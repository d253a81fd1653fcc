#!/usr/bin/env python3
"""When each block of a decode step starts, passes its grid-dependency wait and exits: a per-block trace.

tools/timeline.py sees a kernel as one span; under programmatic edges that hides what matters: how early a
kernel's blocks are resident (prefetching weights), how long after its producer ends its wait returns, and
how long its own work after the wait takes. This tool compiles the spec's kernels with ``-DDB_BLOCKTRACE``
(kernels/port.cuh: a kernel opening with ``DB_TRACE_BLOCK()`` appends [start, waited, exit, SM] per warp,
``%globaltimer`` ns) and launches the graph once per ``--reps``. Records are ordered by start; the blocks of
node N+1 all start after every block of node N has started (a programmatic dependent launches only once each
block of its producer has triggered or exited), so the records split into nodes by their warp counts in the
plan's order. That holds for a graph whose kernels form one programmatic chain (the fused spec); the tool
says so and stops when the counts disagree.

Per node, relative to the previous node's last block exit (E):
  first / last start   how early the node's blocks are resident (negative: before E)
  waited               when the last warp passed griddepcontrol.wait (its release after E)
  mark 1, mark 2       the kernel's own points (DB_TRACE_MARK), the last warp's: GEMVs x staged, first output;
                       attention first tile scored, partials summed
  end                  the last block's exit: the node's increment, as in tools/timeline.py
  after wait           end minus the earliest release: the node's own dependent work
  SMs, max/SM          how its blocks spread

  python3 tools/blocktrace.py                          # fused TinyLlama f16, batch 1, position 100
  python3 tools/blocktrace.py --set gemv_blocks_per_sm=1 --json bt.json
  python3 tools/blocktrace.py --blocks attn.10                # and attention's blocks of layer 10 one by one
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from timeline import add_step_args, parse_set, prime, step_plan  # noqa: E402

from dagbuild.bench import device_us_per_launch  # noqa: E402
from dagbuild.executable import ExecOptions, Executable  # noqa: E402

TRACE_OPTION = "-DDB_BLOCKTRACE"
FIELDS = ("first_start", "last_start", "waited", "mark1", "mark2", "end", "after_wait")
WIDTHS = (10, 9, 8, 8, 8, 8, 11)
RECORD = 6  # u64 per warp record (kernels/port.cuh, DbBlockTrace)


def traced_plan(plan, defines: tuple[str, ...] = ()) -> None:
    """Compile every kernel of ``plan`` with the block trace and ``-D`` defines (kernels rebound in place)."""
    extra = (TRACE_OPTION, *(f"-D{d}" for d in defines))
    for name, k in list(plan.kernels.items()):
        plan.kernels[name] = dataclasses.replace(k, options=(*k.options, *(o for o in extra if o not in k.options)))


def kernel_resources(plan, exe: Executable) -> dict[str, str]:
    """Per node kind: registers per thread and static shared bytes of its kernel (what limits residency)."""
    out: dict[str, str] = {}
    for n in plan.topological():
        kind = n.id.split(".")[0]
        if n.kind == "kernel" and kind not in out:
            k = plan.kernels[n.op.kernel]
            f = exe.modules.module(k).get_function(k.entry)
            out[kind] = (f"{k.entry}: {f.num_regs} regs, {f.local_size_bytes} B local, "
                         f"{f.shared_size_bytes} B static + {n.op.shared} B dynamic")
    return out


def kernel_blocks(plan) -> list[tuple[str, int, int]]:
    """(node id, blocks, warps per block) of every kernel node in the plan's topological order."""
    out = []
    for n in plan.topological():
        if n.kind == "kernel":
            g = t = 1
            for v in n.op.grid:
                g *= int(v)
            for v in n.op.block:
                t *= int(v)
            out.append((n.id, g, -(-t // 32)))
    return out


class TraceBuffers:
    """The device records and counter, wired into every module's ``db_trace_*`` globals."""

    def __init__(self, cupy, exe: Executable, cap: int) -> None:
        self.cupy = cupy
        self.cap = cap
        self.buf = cupy.zeros((cap, RECORD), dtype=cupy.uint64)
        self.count = cupy.zeros(1, dtype=cupy.uint32)
        self.globals = []
        for key, module in exe.modules.modules.items():
            try:
                g = {name: module.get_global(name) for name in ("db_trace_buf", "db_trace_cap", "db_trace_n")}
            except Exception as e:  # CuPy raises its driver error: say which kernels lack the trace
                names = sorted(k.name for k in exe.plan.kernels.values() if (k.source, k.options) == key)
                raise SystemExit(f"kernels {', '.join(names)}: their source has no block-trace globals (include "
                                 f"kernels/port.cuh and open each kernel with DB_TRACE_BLOCK()): {e}") from e
            self.globals.append(g)
            self._set(g["db_trace_buf"], cupy.uint64, self.buf.data.ptr)
            self._set(g["db_trace_n"], cupy.uint64, self.count.data.ptr)
        self.enable(False)

    def _set(self, ptr, dtype, value: int) -> None:
        self.cupy.ndarray((1,), dtype=dtype, memptr=ptr)[0] = value

    def enable(self, on: bool) -> None:
        for g in self.globals:
            self._set(g["db_trace_cap"], self.cupy.uint32, self.cap if on else 0)
        self.count[0] = 0

    def records(self) -> list[tuple[int, ...]]:
        """(start, waited, mark 1, mark 2, exit, smid << 32 | block << 8 | warp) per warp."""
        n = min(int(self.count.get()[0]), self.cap)
        return [tuple(int(v) for v in row) for row in self.buf[:n].get()]


def split_nodes(records, blocks: list[tuple[str, int, int]]) -> list[dict[str, Any]] | None:
    """Per node: its warps' records, relative to the previous node's last exit (None if counts differ).

    A record is (start, waited, mark 1, mark 2, exit, smid << 32 | block << 8 | warp), 0 for a point not
    reached; waited and the marks are the last warp's, after_wait is the end minus the earliest release."""
    records = sorted(records, key=lambda r: r[0])
    if len(records) != sum(nb * nw for _, nb, nw in blocks):
        return None
    rows, i, prev_end = [], 0, records[0][0]
    for nid, nb, nw in blocks:
        mine = records[i:i + nb * nw]
        i += nb * nw
        blocks_on: dict[int, set[int]] = {}
        for r in mine:
            blocks_on.setdefault(r[5] >> 32, set()).add((r[5] >> 8) & 0xFFFFFF)
        end = max(r[4] for r in mine)

        def last(j: int, mine=mine, prev_end=prev_end) -> float:
            ts = [r[j] for r in mine if r[j]]
            return (max(ts) - prev_end) / 1e3 if ts else float("nan")

        waits = [r[1] for r in mine if r[1]]
        rows.append({"per_block": block_rows(mine, prev_end), **{
            "id": nid, "blocks": nb, "sms": len(blocks_on), "max_per_sm": max(len(b) for b in blocks_on.values()),
            "first_start": (mine[0][0] - prev_end) / 1e3, "last_start": (mine[-1][0] - prev_end) / 1e3,
            "waited": last(1), "mark1": last(2), "mark2": last(3), "end": (end - prev_end) / 1e3,
            "after_wait": ((end - min(waits)) / 1e3) if waits else float("nan"),
        }})
        prev_end = end
    return rows


def block_rows(mine, prev_end: int) -> list[dict[str, Any]]:
    """One node's blocks in start order: SM, block index, its first warp's start, its last warp's release, marks
    and exit (µs after the previous node's last exit; NaN where no warp of it got there)."""
    by_block: dict[int, list] = {}
    for r in mine:
        by_block.setdefault((r[5] >> 8) & 0xFFFFFF, []).append(r)

    def last(ws, j: int) -> float:
        ts = [w[j] for w in ws if w[j]]
        return (max(ts) - prev_end) / 1e3 if ts else float("nan")

    out = [{"block": b, "sm": ws[0][5] >> 32, "start": (min(w[0] for w in ws) - prev_end) / 1e3,
            "waited": last(ws, 1), "mark1": last(ws, 2), "mark2": last(ws, 3), "exit": last(ws, 4)}
           for b, ws in by_block.items()]
    return sorted(out, key=lambda r: r["start"])


BLOCK_HEADER = f"{'block':>7}{'SM':>5}{'start':>8}{'waited':>8}{'mark 1':>8}{'mark 2':>8}{'exit':>8}"


def block_text(r: dict[str, Any]) -> str:
    return f"{r['block']:>7}{r['sm']:>5}" + "".join(f"{r[f]:>8.2f}" for f in ("start", "waited", "mark1", "mark2",
                                                                               "exit"))


def timer_step_ns(records) -> int:
    """The smallest positive difference between recorded times: the timer's resolution, at most."""
    ts = sorted({t for r in records for t in r[:5] if t})
    diffs = [b - a for a, b in zip(ts, ts[1:], strict=False) if b > a]
    return min(diffs) if diffs else 0


HEADER = (f"{'node':<14}{'blocks':>7}{'SMs':>5}{'max/SM':>7}{'first st':>10}{'last st':>9}{'waited':>8}"
          f"{'mark 1':>8}{'mark 2':>8}{'end':>8}{'after wait':>11}")


def row_text(label: str, rows: list[dict[str, Any]]) -> str:
    """One table line: the first row's placement (blocks, SMs, blocks per SM), the medians of the times."""
    r0 = rows[0]
    return (f"{label:<14}{r0['blocks']:>7}{r0['sms']:>5}{r0['max_per_sm']:>7}"
            + "".join(f"{statistics.median(r[f] for r in rows):>{w}.2f}" for f, w in zip(FIELDS, WIDTHS, strict=True)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_args(ap, 5, "traced launches (default 5; medians over them)")
    ap.add_argument("--layer", type=int, default=10, help="the layer whose nodes are listed one by one")
    ap.add_argument("--define", action="append", default=[], metavar="NAME=V",
                    help="compile every kernel with -DNAME=V too (e.g. ATTN_UNROLL=4)")
    ap.add_argument("--blocks", action="append", default=[], metavar="NODE",
                    help="also list NODE's blocks one by one, first traced launch (e.g. attn.10; repeatable)")
    ap.add_argument("--json", help="write every traced launch's per-node rows (and per-block rows) here")
    args = ap.parse_args(argv)

    import cupy

    plan = step_plan(args)
    traced_plan(plan, tuple(args.define))
    blocks = kernel_blocks(plan)
    launches = []
    with Executable(plan, ExecOptions(programmatic=True)) as exe:
        tb = TraceBuffers(cupy, exe, cap=2 * sum(nb * nw for _, nb, nw in blocks) + 1024)  # before any launch
        prime(exe, plan, args.pos)
        untraced_us = device_us_per_launch(exe, 50)  # records off (each warp's slot atomic stays)
        resources = kernel_resources(plan, exe)
        resolution = 0
        for _ in range(args.reps):
            tb.enable(True)
            exe.launch(exe.stream)
            exe.stream.synchronize()
            recs = tb.records()
            tb.enable(False)
            resolution = timer_step_ns(recs)
            rows = split_nodes(recs, blocks)
            if rows is None:
                print(f"trace has {len(recs)} warp records, the plan {sum(nb * nw for _, nb, nw in blocks)} warps: "
                      "not split (every kernel must open with DB_TRACE_BLOCK() and be a link of one programmatic "
                      "chain)")
                return 1
            launches.append(rows)
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    print(f"{name} · {Path(args.spec).name} · {Path(args.config).name} {parse_set(args.set) or ''} "
          f"{' '.join('-D' + d for d in args.define)} · "
          f"pos {args.pos} · {len(launches)} traced launches · globaltimer step <= {resolution} ns")
    steps = [sum(r["end"] for r in rows) for rows in launches]
    print(f"step: {statistics.median(steps):.1f} µs traced (first block start to last exit), {untraced_us:.1f} µs "
          "per launch back to back with records off")
    for kind, text in resources.items():
        print(f"  {kind:<12}{text}")

    kinds: dict[str, list[dict[str, Any]]] = {}
    for rows in launches:
        for r in rows:
            kinds.setdefault(r["id"].split(".")[0], []).append(r)
    print("\nper kind, µs relative to the previous node's last exit (medians over layers and launches):")
    print(HEADER)
    for kind, rs in kinds.items():
        print(row_text(kind, rs))
    layer = [i for i, r in enumerate(launches[0]) if r["id"].endswith(f".{args.layer}")]
    if layer:
        print(f"\nlayer {args.layer}, node by node (medians over launches):")
        print(HEADER)
        for i in layer:
            print(row_text(launches[0][i]["id"], [rows[i] for rows in launches]))
    for nid in args.blocks:
        row = next((r for r in launches[0] if r["id"] == nid), None)
        if row is None:
            print(f"\n--blocks {nid}: no kernel node of that id in the traced plan (ids like "
                  f"{', '.join(r['id'] for r in launches[0][1:4])})")
            continue
        print(f"\n{nid}, block by block (first traced launch; µs after the previous node's last exit):")
        print(BLOCK_HEADER)
        for r in row["per_block"]:
            print(block_text(r))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "args": vars(args), "timer_step_ns": resolution,
                                               "untraced_us": untraced_us, "resources": resources,
                                               "launches": launches}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
