"""CLI paths that need a GPU, on any machine: every argument is checked before the GPU probe, and without a
GPU they validate, explain, and exit cleanly. ``dagbuild.backends.gpu_problem`` is faked either way."""

from __future__ import annotations

import argparse
import json
import time

import pytest
import yaml
from conftest import SPECS

import dagbuild.backends
from dagbuild import cli
from dagbuild.cli import main
from dagbuild.llama import weights as W

TINY = str(SPECS / "configs" / "llama_tiny.yaml")
LLAMA = str(SPECS / "llama_decode.yaml")
CHAIN = str(SPECS / "chain.yaml")


@pytest.fixture
def no_gpu(monkeypatch):
    """No GPU, whatever this machine has: gpu_problem says why, and counts its calls."""
    calls = []
    monkeypatch.setattr(dagbuild.backends, "gpu_problem", lambda: calls.append(1) or "no GPU (test)")
    return calls


@pytest.fixture
def gpu(monkeypatch):
    """A GPU, as far as the CLI can tell (nothing may actually build: runners are faked where this is used)."""
    monkeypatch.setattr(dagbuild.backends, "gpu_problem", lambda: None)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own usage errors
        return e.code


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


@pytest.mark.parametrize("content", ["layers: 2.7\n", "hidden: true\n"])
def test_config_values_are_never_truncated(tmp_path, capsys, content):
    path = tmp_path / "cfg.yaml"
    path.write_text(content)
    assert main(["validate", str(SPECS / "llama_decode.yaml"), "--config", str(path), "--json"]) == 1
    (error,) = json.loads(capsys.readouterr().out)["errors"]
    assert error["code"] == "schema" and error["field"] == content.split(":")[0] and "integer" in error["message"]


def test_run_llama_without_gpu_validates_writes_dot_and_explains(tmp_path, capsys, no_gpu):
    dot = tmp_path / "llama.dot"
    assert main(["run", str(SPECS / "llama_decode.yaml"), "--dot", str(dot)]) == 0
    out = capsys.readouterr().out
    assert "No GPU here: no GPU (test)." in out and "ONE explicit CUDA graph" in out and "greedily" in out
    text = dot.read_text()
    assert text.startswith('digraph "llama_decode"') and text.count("->") == 358


def test_run_generic_spec_without_gpu(tmp_path, capsys, no_gpu):
    assert main(["run", str(SPECS / "fanout4.yaml"), "--dot", str(tmp_path / "f.dot")]) == 0
    assert "No GPU here" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["bench", str(SPECS / "chain.yaml")],
                                  ["pool", str(SPECS / "llama_decode.yaml"), "--set", "cache_batch=2",
                                   "--buckets", "batch=1,2"]])
def test_gpu_commands_say_they_need_a_gpu(argv, capsys, no_gpu):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "needs a GPU: no GPU (test)." in captured.out + captured.err


def test_pool_bucket_syntax_is_a_usage_error(capsys):
    assert main(["pool", str(SPECS / "chain.yaml"), "--buckets", "batch=1,x"]) == 2
    assert "must be integers" in capsys.readouterr().err


# --- the GPU probe ---------------------------------------------------------------------------------------------------


def test_gpu_problem_without_a_driver_says_so(monkeypatch):
    from dagbuild import backends

    monkeypatch.setattr(backends, "_libcuda_loads", lambda: False)
    monkeypatch.setattr(backends, "_hip_problem", lambda: "cupy is not importable (test)")
    monkeypatch.setattr(backends, "_cuda_problem", lambda: "CUDA driver version is insufficient (test)")
    assert backends.gpu_problem() == "no NVIDIA driver found (libcuda is not loadable)"


def test_gpu_problem_with_a_driver(monkeypatch):
    from dagbuild import backends

    monkeypatch.setattr(backends, "_libcuda_loads", lambda: True)
    monkeypatch.setattr(backends, "_hip_problem", lambda: "cupy is not a ROCm build")
    monkeypatch.setattr(backends, "_cuda_problem", lambda: "no CUDA device")
    assert backends.gpu_problem() == "no CUDA device"
    monkeypatch.setattr(backends, "_cuda_problem", lambda: None)
    assert backends.gpu_problem() is None


def test_gpu_problem_accepts_a_hip_gpu(monkeypatch):
    from dagbuild import backends

    monkeypatch.setattr(backends, "_libcuda_loads", lambda: False)
    monkeypatch.setattr(backends, "_hip_problem", lambda: None)
    assert backends.gpu_problem() is None


def test_cli_has_one_gpu_probe():
    assert not hasattr(cli, "gpu_reason")
    import dagbuild.pool

    assert not hasattr(dagbuild.pool, "pool_cli")  # moved here: pool must not import the CLI


# --- run: arguments are checked first ---------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(W.hf_config_kwargs(yaml.safe_load(open(TINY)))))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


@pytest.mark.parametrize("argv, why", [
    (["--weights", "/nonexistent"], "no such directory"),
    (["--prompt-ids", "abc"], "comma-separated token ids"),
    (["--prompt-ids", ""], "comma-separated token ids"),
    (["--prompt-ids", "1,-2"], "comma-separated token ids"),
    (["--prompt-ids", "1;2"], "comma-separated token ids"),
    (["--prompt", "Once upon a time"], "tokenizer.json"),
    (["--prompt", "  "], "--prompt is empty"),
    (["--prompt", "hi", "--prompt-ids", "1"], "not both"),
    (["--chat"], "give --prompt"),
    (["--tokens", "-5"], "--tokens must be ≥ 1"),
    (["--tokens", "0"], "--tokens must be ≥ 1"),
    (["--tokens", "many"], "must be an integer"),
    (["--steps", "0"], "--steps must be ≥ 1"),
    (["--random-weights", "-1"], "--random-weights must be ≥ 0"),
])
def test_run_bad_arguments_are_usage_errors_before_the_gpu_probe(argv, why, in_tmp, no_gpu, capsys):
    assert run(["run", LLAMA, *argv]) == 2
    assert why in capsys.readouterr().err
    assert no_gpu == [] and list(in_tmp.iterdir()) == []  # no probe, no DOT written


def test_run_weights_must_be_a_checkpoint(tmp_path, checkpoint, in_tmp, no_gpu, capsys):
    (checkpoint / "config.json").unlink()
    assert run(["run", LLAMA, "--weights", str(checkpoint)]) == 2
    assert "no config.json" in capsys.readouterr().err
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "model.safetensors").unlink()
    assert run(["run", LLAMA, "--weights", str(checkpoint)]) == 2
    assert "no *.safetensors" in capsys.readouterr().err
    other = tmp_path / "weights.bin"
    other.write_bytes(b"")
    assert run(["run", LLAMA, "--weights", str(other)]) == 2
    assert ".safetensors file" in capsys.readouterr().err
    assert run(["run", LLAMA, "--weights", str(checkpoint), "--random-weights", "3"]) == 2
    assert no_gpu == []


def test_run_good_weights_pass_the_checks(checkpoint, in_tmp, no_gpu, capsys):
    assert run(["run", LLAMA, "--config", TINY, "--weights", str(checkpoint)]) == 0
    assert no_gpu == [1] and "No GPU here" in capsys.readouterr().out


def test_run_weights_plan_the_checkpoints_shape(checkpoint, in_tmp, no_gpu, capsys):
    """Without --config, the checkpoint's config.json sets the dims (and --set still wins)."""
    assert run(["run", LLAMA, "--weights", str(checkpoint), "--set", "max_seq=64"]) == 0
    out = capsys.readouterr().out
    assert "hidden=256" in out and "layers=4" in out and "max_seq=64" in out


def test_run_refused_checkpoint_exits_1_naming_the_field(checkpoint, in_tmp, no_gpu, capsys):
    cfg = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**cfg, "model_type": "mixtral"}))
    assert run(["run", LLAMA, "--weights", str(checkpoint)]) == 1
    assert "model_type = 'mixtral'" in capsys.readouterr().err and no_gpu == []


def test_run_text_prompt_needs_the_checkpoints_tokenizer(checkpoint, in_tmp, no_gpu, capsys):
    assert run(["run", LLAMA, "--weights", str(checkpoint), "--prompt", "hello"]) == 2
    assert "tokenizer.json" in capsys.readouterr().err and no_gpu == []


# --- run: where the DOT goes -----------------------------------------------------------------------------------------


def test_run_default_dot_lands_in_the_current_directory(in_tmp, no_gpu, capsys):
    assert run(["run", CHAIN]) == 0
    assert [p.name for p in in_tmp.iterdir()] == ["saxpy_chain.dot"]
    assert "wrote the reduced DAG to saxpy_chain.dot" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["../evil", "sub/evil", "/tmp/evil", ".hidden", "", "a b"])
def test_run_default_dot_never_leaves_the_current_directory(name, in_tmp):
    with pytest.raises(cli.UsageError, match="give --dot PATH"):
        cli._dot_path(argparse.Namespace(dot=None), name)


def test_run_default_dot_refuses_a_link_that_leads_out(tmp_path, in_tmp):
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (in_tmp / "g.dot").symlink_to(outside / "g.dot")
    with pytest.raises(cli.UsageError):
        cli._dot_path(argparse.Namespace(dot=None), "g")


def test_run_spec_name_with_a_path_is_refused(tmp_path, in_tmp, no_gpu, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("dagbuild: 1\nname: ../evil\nnodes: [{id: e, empty: {}}]\n")
    assert run(["run", str(spec)]) in (1, 2)  # 1 where spec.py refuses the name itself, else 2 here
    assert not (tmp_path.parent / "evil.dot").exists() and "Traceback" not in capsys.readouterr().err


def test_run_unwritable_dot_is_a_usage_error_naming_the_path(tmp_path, no_gpu, capsys):
    target = tmp_path / "missing" / "x.dot"
    assert run(["run", CHAIN, "--dot", str(target)]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and "No such file or directory" in err and "Traceback" not in err


# --- run: runners ----------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_runners(monkeypatch):
    import dagbuild.bench
    import dagbuild.llama.run

    calls = []

    def run_cli(p, args):
        calls.append(("llama", p.name, p.dims["hidden"]))
        return 0

    def run_steps(p, steps=100):
        calls.append(("generic", p.name, steps))
        return {"build_ms": 1.0, "median_us": 2.0, "p99_us": 3.0}

    monkeypatch.setattr(dagbuild.llama.run, "run_cli", run_cli)
    monkeypatch.setattr(dagbuild.bench, "run_steps", run_steps)
    return calls


def test_runner_llama_decode_dispatches_to_the_llama_runner(gpu, fake_runners):
    assert run(["run", LLAMA, "--config", TINY]) == 0
    assert fake_runners == [("llama", "llama_decode", 256)]


def test_runner_follows_the_field_not_the_name(tmp_path, gpu, fake_runners):
    text = (SPECS / "llama_decode.yaml").read_text()
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text(text.replace("name: llama_decode\n", "name: my_model\n")
                       .replace("../kernels/", str(SPECS.parent / "kernels") + "/"))
    assert run(["run", str(renamed), "--config", TINY]) == 0
    no_runner = tmp_path / "no_runner.yaml"
    no_runner.write_text(text.replace("runner: llama_decode\n", "").replace("name: llama_decode\n",
                                                                             "name: llama_decode_copy\n")
                         .replace("../kernels/", str(SPECS.parent / "kernels") + "/"))
    assert run(["run", str(no_runner), "--config", TINY, "--steps", "7"]) == 0
    assert fake_runners == [("llama", "my_model", 256), ("generic", "llama_decode_copy", 7)]


def test_no_runner_is_the_generic_launch_loop(gpu, fake_runners, capsys):
    assert run(["run", CHAIN, "--steps", "5"]) == 0
    assert fake_runners == [("generic", "saxpy_chain", 5)]
    assert "5 launches, median 2.0 µs, p99 3.0 µs" in capsys.readouterr().out


def test_unknown_runner_lists_the_known_ones(tmp_path, no_gpu, fake_runners, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("dagbuild: 1\nname: s\nrunner: vllm\nnodes: [{id: e, empty: {}}]\n")
    assert run(["run", str(spec)]) == 1
    err = capsys.readouterr().err
    assert "unknown runner 'vllm'" in err and "llama_decode" in err and f"{spec}:3:" in err
    assert no_gpu == [] and fake_runners == []


# --- bench and pool: arguments are checked first ----------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--warmup", "-1"]])
def test_bench_bad_counts(argv, no_gpu, capsys):
    assert run(["bench", CHAIN, *argv]) == 2
    assert "must be ≥" in capsys.readouterr().err and no_gpu == []


@pytest.mark.parametrize("bucket, why", [
    ("nosuch=1,2", "'nosuch' is not a dim of spec 'llama_decode'"),
    ("batch=0,1", "integers ≥ 1"),
    ("batch=", "give at least one value"),
    ("batch=x", "must be integers"),
    ("batch", "expects DIM=1,2,4"),
    ("=1,2", "expects DIM=1,2,4"),
])
def test_pool_bad_buckets_are_usage_errors_before_the_gpu_probe(bucket, why, no_gpu, capsys):
    assert run(["pool", LLAMA, "--buckets", bucket]) == 2
    assert why in capsys.readouterr().err and no_gpu == []


def test_pool_dim_given_twice(no_gpu, capsys):
    assert run(["pool", LLAMA, "--buckets", "batch=1", "--buckets", "batch=2"]) == 2
    assert "given twice" in capsys.readouterr().err and no_gpu == []


def test_pool_spec_invalid_at_the_largest_bucket_exits_1_before_the_gpu_probe(tmp_path, no_gpu, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("dagbuild: 1\nname: s\ndims: {n: 8}\nbuffers:\n  x: {dtype: f32, shape: [n]}\n"
                    "nodes:\n  - {id: z, memset: {dst: 'x[5]', value: 0}}\n")
    assert run(["pool", str(spec), "--buckets", "n=2,4"]) == 1  # x[5] is out of bounds at n=4
    assert "[out_of_bounds]" in capsys.readouterr().err and no_gpu == []
    assert run(["pool", str(spec), "--buckets", "n=2,8"]) == 2
    assert "needs a GPU" in capsys.readouterr().err and no_gpu == [1]


# --- --config is read like a spec ------------------------------------------------------------------------------------


def test_hostile_config_is_refused_fast(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)))
    t0 = time.perf_counter()
    assert main(["validate", CHAIN, "--config", str(path)]) == 2
    assert time.perf_counter() - t0 < 2.0
    assert "through aliases" in capsys.readouterr().err


def test_config_duplicate_keys_are_refused(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text("steps: 2\nsteps: 3\n")
    assert main(["validate", CHAIN, "--config", str(path)]) == 2
    assert "duplicate key 'steps'" in capsys.readouterr().err


def _fake_cupy(monkeypatch, sms: int) -> None:
    import sys
    from types import SimpleNamespace

    device = SimpleNamespace(attributes={"MultiProcessorCount": sms})
    monkeypatch.setitem(sys.modules, "cupy", SimpleNamespace(cuda=SimpleNamespace(Device=lambda: device)))


FUSED = str(SPECS / "llama_decode_fused.yaml")


def test_run_sizes_the_fused_grids_for_the_gpus_sm_count(gpu, monkeypatch):
    """`sms` comes from the GPU (a 114-SM H100 PCIe here) unless --set names it; specs without it get nothing."""
    _fake_cupy(monkeypatch, 114)
    args = argparse.Namespace(spec=FUSED, config=None, set=[])
    assert cli._device_dims(cli._load(FUSED)) == {"sms": 114}
    assert cli._plan(args, device=True).dims["sms"] == 114
    args = argparse.Namespace(spec=FUSED, config=None, set=["sms=100"])
    assert cli._plan(args, device=True).dims["sms"] == 100
    assert cli._device_dims(cli._load(LLAMA)) == {}


def test_no_gpu_no_device_dims(no_gpu):
    args = argparse.Namespace(spec=FUSED, config=None, set=[])
    assert cli._device_dims(cli._load(FUSED)) == {} and cli._plan(args, device=True).dims["sms"] == 132
