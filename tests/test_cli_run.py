"""CLI paths that need a GPU, on a machine without one: they validate, explain, and exit cleanly."""

from __future__ import annotations

import json

import pytest
from conftest import SPECS, gpu_unavailable_reason

from dagbuild.cli import main

no_gpu = pytest.mark.skipif(gpu_unavailable_reason() is None, reason="a GPU is present: these test the CPU path")
TINY = str(SPECS / "configs" / "llama_tiny.yaml")


def test_config_file_overrides(capsys):
    assert main(["validate", str(SPECS / "llama_decode.yaml"), "--config", TINY, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["summary"]["nodes"] == 3 + 4 * 13 + 4
    assert out["summary"]["dims"]["hidden"] == 256


def test_set_wins_over_config(capsys):
    assert main(["info", str(SPECS / "llama_decode.yaml"), "--config", TINY, "--set", "layers=2"]) == 0
    assert "layers=2" in capsys.readouterr().out


@pytest.mark.parametrize("content, why", [(None, "cannot read"), ("a: [1,", "not valid YAML"),
                                          ("- 1\n- 2\n", "must be a mapping")])
def test_bad_config_is_a_usage_error(tmp_path, capsys, content, why):
    path = tmp_path / "cfg.yaml"
    if content is not None:
        path.write_text(content)
    assert main(["validate", str(SPECS / "chain.yaml"), "--config", str(path)]) == 2
    assert why in capsys.readouterr().err


def test_config_with_unknown_dim_is_invalid(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text("hidden: 64\nbogus: 3\n")
    assert main(["validate", str(SPECS / "chain.yaml"), "--config", str(path), "--json"]) == 1
    errors = json.loads(capsys.readouterr().out)["errors"]
    assert {e["code"] for e in errors} == {"unknown_reference"} and any("'bogus'" in e["message"] for e in errors)


@no_gpu
def test_run_llama_without_gpu_validates_writes_dot_and_explains(tmp_path, capsys):
    dot = tmp_path / "llama.dot"
    assert main(["run", str(SPECS / "llama_decode.yaml"), "--dot", str(dot)]) == 0
    out = capsys.readouterr().out
    assert "No GPU here" in out and "ONE explicit CUDA graph" in out and "greedily" in out
    text = dot.read_text()
    assert text.startswith('digraph "llama_decode"') and text.count("->") == 358


@no_gpu
def test_run_generic_spec_without_gpu(tmp_path, capsys):
    assert main(["run", str(SPECS / "fanout4.yaml"), "--dot", str(tmp_path / "f.dot")]) == 0
    assert "No GPU here" in capsys.readouterr().out


@no_gpu
@pytest.mark.parametrize("argv", [["bench", str(SPECS / "chain.yaml")],
                                  ["pool", str(SPECS / "llama_decode.yaml"), "--buckets", "batch=1,2"]])
def test_gpu_commands_say_they_need_a_gpu(argv, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "needs a GPU" in captured.out + captured.err


def test_pool_bucket_syntax_is_a_usage_error(capsys):
    assert main(["pool", str(SPECS / "chain.yaml"), "--buckets", "batch=1,x"]) == 2
    assert "must be integers" in capsys.readouterr().err
