"""tools/blocktrace.py on the CPU: the traced build compiles, and block records split into nodes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from helpers import load_tool, needs_nvrtc

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def blocktrace():
    return load_tool("blocktrace")


def rec(start: int, waited: int, end: int, sm: int, block: int, warp: int = 0, marks=(0, 0)) -> tuple[int, ...]:
    return (start, waited, *marks, end, (sm << 32) | (block << 8) | warp)


def test_records_split_into_nodes_by_grid_in_start_order(blocktrace):
    # node a: 2 blocks of 2 warps ending at 5000 ns; node b: 3 one-warp blocks, resident from 4000 (before a
    # ends), released at 5600
    records = [rec(6000, 6500, 9000, 2, 2, marks=(7000, 0)), rec(1000, 2000, 5000, 0, 0), rec(4000, 5600, 8000, 0, 0),
               rec(1500, 2000, 4500, 1, 1), rec(4200, 5700, 8500, 1, 1), rec(1000, 2100, 4900, 0, 0, 1),
               rec(1500, 2050, 4400, 1, 1, 1)]
    rows = blocktrace.split_nodes(records, [("a", 2, 2), ("b", 3, 1)])
    a, b = rows
    assert (a["blocks"], a["sms"], a["max_per_sm"]) == (2, 2, 1)
    assert a["end"] == pytest.approx(4.0)  # from the first record's start
    assert b["first_start"] == pytest.approx(-1.0) and b["last_start"] == pytest.approx(1.0)
    assert b["waited"] == pytest.approx(1.5) and b["end"] == pytest.approx(4.0)
    assert b["after_wait"] == pytest.approx(9.0 - 5.6)
    assert b["mark1"] == pytest.approx(2.0) and b["mark2"] != b["mark2"]  # a mark no warp reached: NaN
    assert blocktrace.split_nodes(records, [("a", 2, 1), ("b", 2, 1)]) is None
    line = blocktrace.row_text("b", [b, {**b, "end": 6.0}])
    assert len(line) == len(blocktrace.HEADER) and line.split()[:4] == ["b", "3", "3", "1"]
    assert line.split()[-2] == "5.00"  # the median end of the two rows  # counts disagree: no guessing


def test_per_block_rows_in_start_order(blocktrace):
    """--blocks: a node's blocks one by one (first warp's start, last warp's release, marks and exit), relative
    to the previous node's last exit; a block whose warps reached no mark shows NaN there (a dead split)."""
    records = [rec(1000, 2000, 5000, 0, 0),  # node a, ends at 5000
               rec(4000, 5600, 8000, 3, 0, 0, marks=(6000, 7000)), rec(4100, 5700, 8500, 3, 0, 1, marks=(6100, 7200)),
               rec(4050, 5400, 5500, 1, 1, 0), rec(4060, 5450, 5600, 1, 1, 1)]
    _, b = blocktrace.split_nodes(records, [("a", 1, 1), ("b", 2, 2)])
    live, dead = b["per_block"]
    assert (live["block"], live["sm"]) == (0, 3) and (dead["block"], dead["sm"]) == (1, 1)
    assert [live[k] for k in ("start", "waited", "mark1", "mark2", "exit")] == pytest.approx([-1.0, 0.7, 1.1, 2.2, 3.5])
    assert [dead[k] for k in ("start", "waited", "exit")] == pytest.approx([-0.95, 0.45, 0.6])
    assert dead["mark1"] != dead["mark1"] and dead["mark2"] != dead["mark2"]  # NaN: no warp got there
    line = blocktrace.block_text(live)
    assert len(line) == len(blocktrace.BLOCK_HEADER) and line.split()[:2] == ["0", "3"]


def test_timer_step_is_the_smallest_positive_difference(blocktrace):
    assert blocktrace.timer_step_ns([rec(1000, 0, 1064, 0, 0), rec(1032, 1096, 2000, 0, 1)]) == 32


def test_defines_reach_every_kernel_once(blocktrace):
    from dagbuild.llama.decode import llama_plan

    dims = yaml.safe_load((ROOT / "specs" / "configs" / "llama_tiny.yaml").read_text())
    plan = llama_plan(dims, ROOT / "specs" / "llama_decode_fused.yaml")
    blocktrace.traced_plan(plan, ("ATTN_UNROLL=4",))
    blocktrace.traced_plan(plan, ("ATTN_UNROLL=4",))
    assert all(k.options.count("-DATTN_UNROLL=4") == 1 for k in plan.kernels.values())


def test_traced_plan_adds_the_option_once_and_counts_blocks(blocktrace):
    from dagbuild.llama.decode import llama_plan

    dims = yaml.safe_load((ROOT / "specs" / "configs" / "tinyllama.yaml").read_text())
    plan = llama_plan(dims, ROOT / "specs" / "llama_decode_fused.yaml")
    blocktrace.traced_plan(plan)
    blocktrace.traced_plan(plan)
    assert all(k.options.count(blocktrace.TRACE_OPTION) == 1 for k in plan.kernels.values())
    blocks = {nid: nb for nid, nb, nw in blocktrace.kernel_blocks(plan)}
    assert {nw for _, _, nw in blocktrace.kernel_blocks(plan)} == {8, 32}  # 256-thread nodes; argmax 1024
    d = plan.dims
    assert blocks["attn.0"] == d["heads"] * min(d["attn_decode_splits"], -(-d["max_seq"] // d["attn_decode_chunk"]))
    assert blocks["embed"] == plan.dims["batch"] and len(blocks) == 2 + 5 * plan.dims["layers"] + 1


@needs_nvrtc
@pytest.mark.parametrize("source", ["llama_fused.cu", "llama_batched.cu"])
def test_every_entry_is_traced_only_with_the_option(source):
    from dagbuild.kernels import compile_ptx, ptx_entries
    from dagbuild.sources import read_kernel_source

    text = read_kernel_source(ROOT / "kernels" / source)
    opts = ("--std=c++17", "-DMMA_CLUSTER=8")
    plain = compile_ptx(text, source, "sm_90", opts)
    traced = compile_ptx(text, source, "sm_90", (*opts, "-DDB_BLOCKTRACE"))
    assert "globaltimer" not in plain
    bodies = re.split(r"\.entry\s+", traced)[1:]
    names = list(ptx_entries(traced))
    untraced = [n for n, body in zip(names, bodies, strict=True) if "globaltimer" not in body]
    assert untraced == [], f"entries without DB_TRACE_BLOCK: {untraced}"
