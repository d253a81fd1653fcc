"""The benchmark tools parse their arguments on a machine without a GPU: they run only on a lent device, so an
import or an argument that breaks is otherwise found there, at the cost of device time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# every tool with an argument parser (the probes take a case name, not options)
TOOLS = sorted(p.name for p in (ROOT / "tools").glob("*.py") if not p.name.startswith("probe_"))


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_help_needs_no_gpu(tool):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / tool), "--help"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_device_check_stages_parse():
    """tools/device_check.sh is valid bash, and the stages the notes name are there."""
    script = ROOT / "tools" / "device_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    text = script.read_text()
    for stage in ("tests", "stack", "stackknobs", "stackbench", "loopstack", "mvc", "engines", "batch", "loop",
                  "gemmcu", "attnab", "cachelines", "capcost", "tcwide", "poolprof", "attnskip", "gemmpad"):
        assert f"\n    {stage})" in text, stage


@pytest.mark.parametrize("batch,max_seq", [(16, 192), (64, 192), (256, 2112), (64, 2112)])
def test_bench_attn_auto_splits_are_the_specs(batch, max_seq):
    """tools/bench_attn.py's "auto" split count and variant options are what the fused spec launches."""
    from helpers import load_tool

    from dagbuild.llama.decode import llama_plan

    tool = load_tool("bench_attn")
    dims = {"batch": batch, "cache_batch": batch, "max_seq": max_seq}
    plan = llama_plan({**dims, "attn_mma": 1}, ROOT / "specs" / "llama_decode_fused.yaml")
    attn = next(n.op for n in plan.nodes if n.id == "attn.0")
    assert attn.kernel == "attn_qkv_mma" and attn.grid == (batch * tool.KV_HEADS, tool.auto_splits(batch, max_seq), 1)
    assert {a.param.name: a.value for a in attn.args}["chunk"] == tool.min_keys(batch)
    assert attn.shared == tool.mma_shared(tool.HEAD_DIM)
    for kernel in ("attn_qkv", "attn_qkv_mma"):  # one module: the two declarations compile alike
        assert tool.variant_options("base") == tuple(plan.kernels[kernel].options)
        assert tool.variant_options("A=1,B=2") == (*plan.kernels[kernel].options, "-DA=1", "-DB=2")
    off = llama_plan({**dims, "attn_mma": 0}, ROOT / "specs" / "llama_decode_fused.yaml")
    attn = next(n.op for n in off.nodes if n.id == "attn.0")
    assert attn.kernel == "attn_qkv" and {a.param.name: a.value for a in attn.args}["chunk"] == tool.min_keys(
        batch, "attn_qkv_f16")


def test_bench_gemv_times_gemv_res_as_the_spec_builds_it():
    """tools/bench_gemv.py --fused builds and launches the O and down GEMVs with the fused spec's options (a 3-slot
    ring) and shared memory: the forms every small batch runs (gemv_one_row 0; the batch-1 forms add only defines)."""
    from helpers import load_tool

    from dagbuild.llama.decode import llama_plan

    tool = load_tool("bench_gemv")
    plan = llama_plan({"gemv_one_row": 0}, ROOT / "specs" / "llama_decode_fused.yaml")
    for node, k in (("o_proj.0", plan.dims["heads"] * plan.dims["head_dim"]), ("down_proj.0", plan.dims["ffn"])):
        op = next(n.op for n in plan.nodes if n.id == node)
        assert op.kernel == "gemv_res" and tool.res_build(k) == (tuple(plan.kernels["gemv_res"].options), op.shared)


def test_bench_attn_refuses_an_unknown_kernel():
    """--kernel names entries of the module: a misspelt one is refused before any GPU work, naming the choices."""
    cmd = [sys.executable, str(ROOT / "tools" / "bench_attn.py"), "--kernel", "attn_qkv_mma_f16,attn_qk"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "--kernel takes attn_qkv_mma_f16, attn_qkv_f16" in proc.stderr


def test_spec_variant_changes_only_what_it_names(tmp_path, capsys):
    """tools/spec_variant.py: a copy with one kernel option and one node field binds to the original's plan but
    for those (kernel sources made absolute, so the copy works from another folder); a bad name is an error that
    names it, and nothing is written."""
    from helpers import load_tool

    from dagbuild.llama.decode import llama_plan

    sv = load_tool("spec_variant")
    fused = ROOT / "specs" / "llama_decode_fused.yaml"
    out = tmp_path / "sub" / "v.yaml"
    assert sv.main(["-o", str(out), "--option", "attn=-DATTN_TRIGGER=0", "--node", "down_proj.{l}.shared=116736"]) == 0
    base, copy = llama_plan({}, fused), llama_plan({}, out)
    assert [n.id for n in copy.nodes] == [n.id for n in base.nodes]
    assert copy.kernels["attn"].options == (*base.kernels["attn"].options, "-DATTN_TRIGGER=0")
    for b, c in zip(base.nodes, copy.nodes, strict=True):
        if b.id.startswith("down_proj."):
            assert c.op.shared == 116736 and b.op.shared != 116736
        else:
            assert c.op == b.op, b.id
    assert sv.main(["-o", str(out), "--node", "o_gemm.{l}.shared=tc_stages * 32768 + 18432"]) == 0
    gemm = llama_plan({"batch": 16, "cache_batch": 16}, out)  # the kernel forms changed, the child form kept
    assert {n.op.shared for n in gemm.nodes if n.id.startswith("o_gemm.")} == {3 * 32768 + 18432}
    for args, word in ((["--option", "nope=-DX=1"], "no kernel 'nope'"), (["--node", "nope.shared=1"], "no node"),
                       (["--node", "embed.nope=1"], "has a field 'nope'"),
                       (["--node", "down_proj.{l}.grid=7"], "does not load")):
        bad = tmp_path / "bad.yaml"
        assert sv.main(["-o", str(bad), *args]) == 2
        assert word in capsys.readouterr().err and not bad.exists(), word


def test_bench_ab_parses_and_checks_variants_on_the_host(tmp_path):
    """tools/bench_ab.py: NAME[=SPEC][:DIM=V,...] variants; a malformed one, a missing spec, a file that is not a
    spec, a name given twice or a dim the spec refuses is an error naming the variant, before any GPU work (exit 2)."""
    from helpers import load_tool

    ab = load_tool("bench_ab")
    v = ab.parse_variant("c384=:attn_decode_chunk=384, gemm_batch=0")
    assert (v.name, v.spec, v.dims) == ("c384", ab.SPEC, {"attn_decode_chunk": 384, "gemm_batch": 0})
    assert ab.parse_variants([])[0] == ab.Variant("base", ab.SPEC, {})
    for text, words in (("=x.yaml", "no name"), (f"a={tmp_path / 'none.yaml'}", "is not a file"),
                        ("a:chunk", "'chunk' is not DIM=INTEGER"), ("a:x=1.5", "not DIM=INTEGER")):
        with pytest.raises(ValueError, match=words):
            ab.parse_variant(text)
    with pytest.raises(ValueError, match="a given twice"):
        ab.parse_variants(["a", "b", "a:attn_decode_chunk=128"])
    not_a_spec = tmp_path / "x.yaml"
    not_a_spec.write_text("just: text\n")
    with pytest.raises(ValueError, match="variant 'x': "):
        ab.check_variants([ab.parse_variant(f"x={not_a_spec}")], {}, [1])
    cmd = [sys.executable, str(ROOT / "tools" / "bench_ab.py"), "--variant", "base",
           "--variant", "small:attn_decode_chunk=32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "variant 'small' at batch 1" in proc.stderr
    assert "attn_decode_chunk must be at least attn_chunk" in proc.stderr


def test_bench_ab_report_gives_each_variant_its_ratio_to_the_first():
    from helpers import load_tool

    ab = load_tool("bench_ab")
    r = {"device": "H100", "config": "tinyllama", "rounds": 2, "steps": 20,
         "variants": [{"name": "trig0"}, {"name": "trig1"}],
         "rows": [{"context": 128, "batch": 1, "rounds_ms": {"trig0": [1.0, 1.2], "trig1": [1.3, 1.1]},
                   "median_ms": {"trig0": 1.1, "trig1": 1.2}}]}
    lines = ab.report(r).splitlines()
    assert lines[2].split() == ["128", "1", "trig0", "1.100", "1.000x", "1.000", "/", "1.200"]
    assert lines[3].split()[2:5] == ["trig1", "1.200", "1.091x"]


@pytest.mark.parametrize(("args", "message"), [
    (["--threads", "1,x"], "--threads: expected a positive integer, got 'x'"),
    (["--total", "0"], "--total: expected a positive integer, got '0'"),
])
def test_probe_capture_cost_refuses_bad_counts(args, message):
    """Refused by the argument parser, before CuPy or a GPU is touched."""
    cmd = [sys.executable, str(ROOT / "tools" / "probe_capture_cost.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and message in proc.stderr


def test_ncu_table_reads_a_raw_csv_and_names_what_it_cannot(tmp_path, capsys, monkeypatch):
    """tools/ncu_table.py: one line a kernel, the stall reasons largest first; a missing file or a CSV without
    ncu's columns is named, not a traceback."""
    from helpers import load_tool

    tool = load_tool("ncu_table")
    stall = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    csv = tmp_path / "stalls.csv"
    csv.write_text(f'"ID","Kernel Name","gpu__time_duration.sum","{stall.format("wait")}",'
                   f'"{stall.format("no_instruction")}"\n'
                   '"","","nsecond","",""\n'
                   '"0","attn_decode_f16","7,296","1.91","0.26"\n')
    monkeypatch.setattr(sys, "argv", ["ncu_table.py", str(csv)])
    assert tool.main() == 0
    out = capsys.readouterr().out
    assert "attn_decode_f16" in out and "7296 ns" in out and out.index("wait 1.91") < out.index("no_instruction 0.26")
    for path, why in ((tmp_path / "none.csv", "cannot read"), (ROOT / "README.md", "no 'Kernel Name' column")):
        monkeypatch.setattr(sys, "argv", ["ncu_table.py", str(path)])
        assert tool.main() == 1 and why in capsys.readouterr().out
