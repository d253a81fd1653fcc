"""K steps per launch on the CPU: the looped decode spec built from both shipped decode specs, its
structure (the step in a loop, host copies outside, sampling replacing argmax), and the CLI without a GPU."""

from __future__ import annotations

import pytest
from conftest import SPECS

from dagbuild.cli import main
from dagbuild.dot import to_dot
from dagbuild.errors import DagbuildError
from dagbuild.llama.loop import default_unroll, looped_plan, looped_spec
from dagbuild.load import load_spec, parse_spec
from dagbuild.plan import plan

TINY = {"hidden": 256, "heads": 4, "kv_heads": 2, "ffn": 688, "vocab": 1024, "layers": 4, "max_seq": 256}


@pytest.mark.parametrize("name", ["llama_decode.yaml", "llama_decode_fused.yaml"])
def test_looped_spec_of_each_decode_spec(name):
    base = load_spec(SPECS / name)
    base_plan = plan(base, TINY)
    p = looped_plan(base_plan, 16)
    assert p.dims["steps"] == 16 and p.name == f"{base.name}_loop"
    loop = p.node_by_id["decode"]
    assert loop.op.max == 16 and loop.op.until.label == "state[1]"
    body = {n.id for n in p.scoped("decode")}
    host_io = {"upload_tokens", "upload_pos", "argmax", "download"}
    assert body == ({n.id for n in base_plan.nodes} - host_io) | {"sample"}
    assert not any(n.kind == "memcpy" for n in p.nodes if n.scope == "decode")
    assert ("lm_head", "sample") in p.edges
    # the base's programmatic edges stay, inside the body
    assert len(p.analysis.programmatic) == len(base_plan.analysis.programmatic - {("lm_head", "argmax")})
    # every pinned buffer of row state the graph uploads from, it downloads to: the state carries over
    tops = [n for n in p.scoped(None) if n.kind == "memcpy"]
    ups = {n.op.src.buffer for n in tops if n.op.direction == "H2D"}
    downs = {n.op.dst.buffer for n in tops if n.op.direction == "D2H"}
    assert ups - {"cfg_host"} <= downs and "cfg_host" not in downs and {"ring_host", "state_host"} <= downs
    assert ("decode", "download_ring") in p.edges and ("upload_tokens", "decode") in p.edges
    # the YAML of the looped spec reads back to the same spec
    spec = looped_spec(base, 4)
    assert parse_spec(spec.to_yaml(), base_dir=SPECS) == spec


def test_looped_spec_refuses_bad_inputs():
    base = load_spec(SPECS / "llama_decode.yaml")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(DagbuildError, match="tokens_per_launch"):
            looped_spec(base, bad)
    with pytest.raises(DagbuildError, match="not a decode step"):
        looped_spec(load_spec(SPECS / "chain.yaml"), 4)
    with pytest.raises(DagbuildError, match="already has"):
        looped_spec(looped_spec(base, 2), 2)
    for bad in (3, 0, 2.0, True):  # steps per WHILE iteration must divide K = 16
        with pytest.raises(DagbuildError, match="unroll must be an integer ≥ 1 dividing tokens_per_launch = 16"):
            looped_spec(base, 16, bad)
    assert [default_unroll(k) for k in (1, 2, 6, 7, 16, 64)] == [1, 2, 2, 1, 4, 4]


def test_looped_dot_has_the_loop_cluster():
    p = looped_plan(plan(load_spec(SPECS / "llama_decode_fused.yaml"), TINY), 8)
    dot = to_dot(p)
    assert 'label="loop decode: loop ≤ 8 (4 per iteration) until state[1]"' in dot and '"sample" -> "decode"' in dot


def test_cli_run_without_gpu_writes_the_looped_dag(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("dagbuild.cli._gpu_problem", lambda: "no GPU in this test")
    out = tmp_path / "loop.dot"
    rc = main(["run", str(SPECS / "llama_decode.yaml"), "--config", str(SPECS / "configs/llama_tiny.yaml"),
               "--tokens-per-launch", "4", "--temperature", "0.8", "--top-p", "0.9", "--dot", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "steps=4" in text and "WHILE conditional node" in text
    assert "loop decode" in out.read_text()


@pytest.mark.parametrize("flag, value", [("--temperature", "-1"), ("--top-p", "0"), ("--top-p", "1.5"),
                                         ("--top-k", "-2"), ("--tokens-per-launch", "0"), ("--seed", "x"),
                                         ("--eos", "-2")])
def test_cli_run_refuses_bad_sampling_args(flag, value, capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", str(SPECS / "llama_decode.yaml"), flag, value])
    assert info.value.code == 2 and flag in capsys.readouterr().err


def test_loop_and_sampling_kernels_compile_for_hip():
    from test_hiprtc import REASON

    if REASON is not None:
        pytest.skip(f"hiprtc unavailable: {REASON}")
    from dagbuild.hiprtc import check_plan_hip

    p = looped_plan(plan(load_spec(SPECS / "llama_decode.yaml"), {**TINY, "layers": 2}), 4)
    report = check_plan_hip(p, "gfx90a")
    assert report["sample"]["entry"] == "sample_step" and report["dagbuild.loop_next"]["entry"] == "loop_next"
