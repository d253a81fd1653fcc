"""tools/timeline.py's pure parts on the CPU: which nodes it expects in a launch, and the exposed gaps."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import load_tool

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def timeline():
    return load_tool("timeline")


def test_exposed_gaps_are_the_time_no_kernel_runs(timeline):
    k = [{"start": 0.0, "end": 5.0}, {"start": 2.0, "end": 6.0}, {"start": 7.5, "end": 9.0},
         {"start": 8.0, "end": 8.5}, {"start": 10.0, "end": 11.0}]
    assert timeline.idle_us(k) == pytest.approx(1.5 + 1.0)
    assert timeline.idle_us(k[:2]) == 0.0  # overlapping (programmatic) kernels leave no gap


def test_launches_split_by_the_kernel_count(timeline):
    events = [{"name": str(i % 3), "start": i, "end": i + 1} for i in range(7)]
    launches = timeline.split_launches(events, 3)
    assert [[e["name"] for e in launch] for launch in launches] == [["0", "1", "2"]] * 2  # the partial tail dropped


def test_kernel_nodes_of_the_fused_tinyllama_step(timeline):
    from dagbuild.llama.decode import llama_plan

    dims = yaml.safe_load((ROOT / "specs" / "configs" / "tinyllama.yaml").read_text())
    plan = llama_plan(dims, ROOT / "specs" / "llama_decode_fused.yaml")
    nodes = timeline.kernel_nodes(plan)
    assert len(nodes) == 5 * 22 + 3  # embed, 5 per layer, LM head, argmax (the copies are not kernels)
    assert nodes[:3] == [("embed", "embed_pdl_f16", 0), ("qkv.0", "qkv_rope_f16", 2560 * 2048 * 2),
                         ("attn.0", "attn_decode_f16", 0)]
    assert nodes[-2] == ("lm_head", "gemv_norm_f16", 32000 * 2048 * 2)


def test_step_args_bind_the_spec_with_overrides(timeline):
    import argparse

    ap = argparse.ArgumentParser()
    timeline.add_step_args(ap, 3, "launches")
    args = ap.parse_args(["--set", "batch=4", "--set", "cache_batch=4", "--pos", "7"])
    plan = timeline.step_plan(args)
    assert (plan.dims["batch"], plan.dims["hidden"], args.pos, args.reps) == (4, 2048, 7, 3)


def test_per_name_table_of_library_plans(timeline):
    launch = [{"name": "norm", "start": 0.0, "end": 2.0}, {"name": "sm90_gemm", "start": 3.0, "end": 10.0},
              {"name": "norm", "start": 11.0, "end": 12.0}, {"name": "attn", "start": 12.5, "end": 15.0}]
    rows = timeline.per_name([launch, launch], {"norm", "attn"})
    assert [(r["kernel"], r["library"], r["calls"], r["step_us"]) for r in rows] == [
        ("sm90_gemm", True, 1, 7.0), ("norm", False, 2, 3.0), ("attn", False, 1, 2.5)]
    assert rows[1]["span_us"] == 1.5
