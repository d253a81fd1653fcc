"""The ``dagbuild`` command through ``dagbuild.cli.main``: exit codes 0/1/2, ``--json``, ``--set``, dot, info,
schema."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest
from conftest import SPECS

from dagbuild.cli import main

CHAIN = str(SPECS / "chain.yaml")


def run(argv: list[str]) -> int:
    """main's return value, or the code of the SystemExit argparse raises for a bad command line."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture
def write(tmp_path):
    def write(text: str, name: str = "spec.yaml") -> str:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return str(path)

    return write


BAD = """\
dagbuild: 1
name: bad
dims: {n: 16}
buffers:
  x: {dtype: f32, shape: [n]}
nodes:
  - id: a
    memset: {dst: "x[99]", value: 0}
  - id: b
    empty: {}
    after: [ghost]
"""

TYPED = """\
dagbuild: 1
name: typed
dims: {n: 16}
types: {wt: f16}
kernels:
  k:
    code: |
      extern "C" __global__ void k(const void* w, int n) {}
    entry: k
    params: [const wt* w, i32 n]
buffers:
  w: {dtype: wt, shape: [n]}
nodes:
  - {id: run, kernel: k, grid: [1], block: [16], args: {w: w, n: n}}
"""


# --- validate --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(SPECS.glob("*.yaml")), ids=lambda p: p.stem)
def test_validate_shipped_specs_exit_0(path, capsys):
    assert run(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "nodes" in out and "critical path" in out


def test_validate_human_output(capsys):
    assert run(["validate", CHAIN]) == 0
    assert capsys.readouterr().out.strip() == (f"{CHAIN}: valid — 11 nodes, 10 edges after reduction (17 before), "
                                               "critical path 10, max width 2")


def test_validate_json_valid(capsys):
    assert run(["validate", CHAIN, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"ok", "errors", "summary"}
    assert out["ok"] is True and out["errors"] == []
    s = out["summary"]
    assert s["nodes"] == 11 and s["nodes_by_kind"] == {"kernel": 8, "memcpy": 2, "memset": 1, "empty": 0}
    assert (s["edges"], s["edges_reduced"], s["critical_path"], s["max_width"]) == (17, 10, 10, 2)
    assert s["bytes_by_memory"] == {"device": 2 * 4096 * 4, "pinned": 2 * 4096 * 4}


def test_validate_invalid_exit_1_lists_every_error(write, capsys):
    path = write(BAD)
    assert run(["validate", path]) == 1
    err = capsys.readouterr().err
    assert "2 error(s)" in err
    assert f"{path}:8: [out_of_bounds]" in err and "'a'" in err
    assert f"{path}:11: [unknown_reference]" in err and "'ghost'" in err


def test_validate_json_invalid_shape(write, capsys):
    assert run(["validate", write(BAD), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["summary"] == {}
    assert [e["code"] for e in out["errors"]] == ["out_of_bounds", "unknown_reference"]
    for e in out["errors"]:
        assert {"code", "message", "nodes", "buffer", "line", "field"} <= set(e)
    first, second = out["errors"]
    assert (first["nodes"], first["buffer"], first["line"], first["field"]) == (["a"], "x", 8, "memset.dst")
    assert (second["nodes"], second["buffer"], second["line"], second["field"]) == (["b", "ghost"], None, 11, "after")


def test_validate_json_yaml_error(write, capsys):
    assert run(["validate", write("dagbuild: 1\nname: [oops\n"), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and [e["code"] for e in out["errors"]] == ["yaml"]
    assert isinstance(out["errors"][0]["line"], int)


def test_validate_json_schema_error(write, capsys):
    assert run(["validate", write("dagbuild: 1\nname: t\nnodes:\n  - id: a\n    colour: red\n"), "--json"]) == 1
    (e,) = json.loads(capsys.readouterr().out)["errors"]
    assert e["code"] == "schema" and e["nodes"] == ["a"] and e["line"] == 4


def test_validate_missing_file_exit_2(tmp_path, capsys):
    assert run(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_validate_directory_exit_2(tmp_path):
    assert run(["validate", str(tmp_path)]) == 2


@pytest.mark.parametrize("argv", [["validate", CHAIN, "--bogus"], ["validate"], [], ["frobnicate", CHAIN],
                                  ["dot", CHAIN, "--format", "pdf"]])
def test_bad_command_lines_exit_2(argv, capsys):
    assert run(argv) == 2
    assert "usage" in capsys.readouterr().err


# --- --set -----------------------------------------------------------------------------------------------------------


def test_set_dim(capsys):
    assert run(["validate", CHAIN, "--set", "steps=3", "--set", "n=1024", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)["summary"]
    assert s["nodes"] == 6 and s["dims"] == {"n": 1024, "steps": 3}
    assert s["bytes_by_memory"]["device"] == 2 * 1024 * 4


def test_set_last_one_wins(capsys):
    assert run(["validate", CHAIN, "--set", "steps=3", "--set", "steps=5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["nodes"] == 8


def test_set_type(write, capsys):
    path = write(TYPED)
    assert run(["validate", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["bytes_by_memory"]["device"] == 16 * 2
    assert run(["validate", path, "--set", "wt=f32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["bytes_by_memory"]["device"] == 16 * 4


def test_set_bad_type_value(write, capsys):
    assert run(["validate", write(TYPED), "--set", "wt=f99", "--json"]) == 1
    (e,) = json.loads(capsys.readouterr().out)["errors"]
    assert e["code"] == "schema" and "f99" in e["message"] and e["field"] == "types.wt"


def test_set_unknown_name_is_an_error(capsys):
    assert run(["validate", CHAIN, "--set", "stepz=3", "--json"]) == 1
    (e,) = json.loads(capsys.readouterr().out)["errors"]
    assert e["code"] == "unknown_reference" and "stepz" in e["message"]


def test_set_dim_needs_an_integer(capsys):
    assert run(["validate", CHAIN, "--set", "steps=many", "--json"]) == 1
    (e,) = json.loads(capsys.readouterr().out)["errors"]
    assert e["code"] == "schema" and e["field"] == "steps"


def test_set_that_makes_the_spec_invalid(capsys):
    assert run(["validate", CHAIN, "--set", "steps=-1", "--json"]) == 1
    (e,) = json.loads(capsys.readouterr().out)["errors"]
    assert e["code"] == "out_of_bounds" and e["field"] == "repeat.count"


@pytest.mark.parametrize("pair", ["steps", "=3", ""])
def test_set_malformed_exit_2(pair, capsys):
    assert run(["validate", CHAIN, "--set", pair]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err


# --- dot -------------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pyparsing's, inside pydot
def test_dot_to_stdout_parses(capsys):
    pydot = pytest.importorskip("pydot")
    assert run(["dot", str(SPECS / "diamond.yaml")]) == 0
    (g,) = pydot.graph_from_dot_data(capsys.readouterr().out)
    assert len(g.get_edges()) == 5
    assert len([n for n in g.get_nodes() if n.get_name() not in ("node", "edge", "graph")]) == 5


def test_dot_to_file(tmp_path, capsys):
    out = tmp_path / "chain.dot"
    assert run(["dot", CHAIN, "-o", str(out), "--set", "steps=2"]) == 0
    text = out.read_text()
    assert text.startswith('digraph "saxpy_chain" {') and '"step.1" -> "download";' in text
    cap = capsys.readouterr()
    assert cap.out == "" and "5 nodes, 4 edges" in cap.err


def test_dot_invalid_spec_exit_1(write, capsys):
    assert run(["dot", write(BAD)]) == 1
    assert "[out_of_bounds]" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["svg", "png"])
def test_dot_image_without_graphviz(fmt, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert run(["dot", CHAIN, "--format", fmt, "-o", str(tmp_path / f"g.{fmt}")]) == 1
    err = capsys.readouterr().err
    assert "Graphviz" in err and "`dot`" in err
    assert not (tmp_path / f"g.{fmt}").exists()


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
def test_dot_svg_with_graphviz(tmp_path, capsys):
    assert run(["dot", CHAIN, "--format", "svg", "-o", str(tmp_path / "g.svg")]) == 0
    assert b"<svg" in (tmp_path / "g.svg").read_bytes()
    assert run(["dot", CHAIN, "--format", "png"]) == 2  # binary data needs -o


def test_dot_output_into_a_directory_is_a_usage_error(tmp_path, capsys):
    assert run(["dot", CHAIN, "-o", str(tmp_path)]) == 2
    assert "dagbuild dot" in capsys.readouterr().err


# --- info and schema -------------------------------------------------------------------------------------------------


def test_info_table(capsys):
    assert run(["info", str(SPECS / "diamond.yaml")]) == 0
    table = {k.strip(): v.strip() for k, v in (ln.rsplit("  ", 1) for ln in capsys.readouterr().out.splitlines())}
    assert table["spec"] == "diamond" and table["nodes"] == "5" and table["kernel"] == "3"
    assert table["edges after reduction"] == "5" and table["critical path (nodes)"] == "4"
    assert table["max width (nodes at once)"] == "2"
    assert table["device memory"] == "128.0 KiB" and table["pinned memory"] == "64.0 KiB"
    assert table["dims"] == "n=8192"


def test_info_invalid_exit_1(write):
    assert run(["info", write(BAD)]) == 1


def test_schema(capsys):
    assert run(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "dagbuild spec (format 1)"
    assert {"dagbuild", "name", "dims", "types", "deps", "kernels", "buffers", "nodes"} <= set(schema["properties"])
    assert set(schema["required"]) == {"dagbuild", "name"}
    assert schema["additionalProperties"] is False


# --- version and help ------------------------------------------------------------------------------------------------


def test_version(capsys):
    import dagbuild

    assert run(["--version"]) == 0
    assert capsys.readouterr().out == f"dagbuild {dagbuild.__version__}\n" == "dagbuild 0.1.0\n"


def test_every_flag_has_help():
    import argparse

    from dagbuild.cli import parser

    ap = parser()
    (sub,) = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}"
               for name, p in [("dagbuild", ap), *sub.choices.items()] for a in p._actions
               if not isinstance(a, argparse._SubParsersAction) and not a.help]
    assert missing == []


# --- validate --json on usage errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["missing", "directory"])
def test_validate_json_missing_file_prints_json_exit_2(tmp_path, capsys, what):
    path = tmp_path / "nope.yaml" if what == "missing" else tmp_path
    assert run(["validate", str(path), "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["summary"] == {}
    (e,) = out["errors"]
    assert e["code"] == "usage" and "not found" in e["message"] and str(path) in e["message"]


def test_validate_json_bad_set_prints_json_exit_2(capsys):
    assert run(["validate", CHAIN, "--set", "steps", "--json"]) == 2
    (e,) = json.loads(capsys.readouterr().out)["errors"]
    assert e["code"] == "usage" and "NAME=VALUE" in e["message"]


def test_validate_json_unparsable_yaml_exit_1(write, capsys):
    assert run(["validate", write("dagbuild: 1\nname: t\nname: u\n"), "--json"]) == 1
    (e,) = json.loads(capsys.readouterr().out)["errors"]
    assert e["code"] == "yaml" and "duplicate key 'name'" in e["message"] and e["line"] == 3


def test_validate_hostile_yaml_exits_1_fast(write, capsys):
    import time

    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True))
    t0 = time.perf_counter()
    assert run(["validate", write(bomb)]) == 1
    assert time.perf_counter() - t0 < 2.0
    assert "[yaml]" in capsys.readouterr().err


# --- dot formats -----------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_render(monkeypatch):
    """Graphviz stand-in: records the format and returns recognisable bytes (no `dot` program needed)."""
    import dagbuild.dot

    calls = []

    def render(text, fmt):
        calls.append(fmt)
        return b"<svg>fake</svg>" if fmt == "svg" else b"\x89PNG fake"

    monkeypatch.setattr(dagbuild.dot, "render", render)
    return calls


@pytest.mark.parametrize("suffix, fmt", [(".svg", "svg"), (".png", "png"), (".SVG", "svg"), (".dot", "dot"),
                                         (".gv", "dot"), (".txt", "dot")])
def test_dot_format_from_suffix(tmp_path, fake_render, suffix, fmt):
    out = tmp_path / f"g{suffix}"
    assert run(["dot", CHAIN, "-o", str(out)]) == 0
    data = out.read_bytes()
    if fmt == "dot":
        assert data.startswith(b"digraph") and fake_render == []
    else:
        assert fake_render == [fmt] and data == (b"<svg>fake</svg>" if fmt == "svg" else b"\x89PNG fake")


def test_dot_explicit_format_wins_over_suffix(tmp_path, fake_render):
    assert run(["dot", CHAIN, "-o", str(tmp_path / "g.png"), "--format", "svg"]) == 0
    assert fake_render == ["svg"]


def test_dot_svg_may_go_to_stdout(fake_render, capsys):
    assert run(["dot", CHAIN, "--format", "svg"]) == 0
    assert capsys.readouterr().out == "<svg>fake</svg>"


def test_dot_png_to_stdout_is_a_usage_error(fake_render, capsys):
    assert run(["dot", CHAIN, "--format", "png"]) == 2
    assert "give -o FILE.png" in capsys.readouterr().err and fake_render == []


def test_dot_unwritable_output_names_the_path(tmp_path, capsys):
    out = tmp_path / "no" / "such" / "dir.dot"
    assert run(["dot", CHAIN, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "Traceback" not in err


# --- compile arguments -----------------------------------------------------------------------------------------------


@pytest.fixture
def fake_check_plan(monkeypatch):
    """The CUDA kernel check, faked."""
    import dagbuild.kernels

    calls = []

    def check_plan(p, arch="sm_90"):
        calls.append(arch)
        return {name: {"entry": k.entry, "params": len(k.params), "ptx_bytes": 10} for name, k in p.kernels.items()}

    monkeypatch.setattr(dagbuild.kernels, "check_plan", check_plan)
    return calls


@pytest.mark.parametrize("argv", [["--arch", "banana"], ["--arch", "90"], ["--target", "banana"],
                                  ["--target", "rocm:gfx90a"], ["--target", "cuda:"], ["--target", "hip:sm_90"],
                                  ["--target", "cuda:banana"], ["--arch", "sm_80", "--target", "cuda:sm_90"],
                                  ["--arch", "sm_90", "--target", "hip:gfx90a"]])
def test_compile_bad_arch_or_target_is_a_usage_error(argv, fake_check_plan, capsys):
    assert run(["compile", CHAIN, *argv]) == 2
    assert "dagbuild compile:" in capsys.readouterr().err and fake_check_plan == []


@pytest.mark.parametrize("argv, arch", [([], "sm_90"), (["--arch", "sm_80"], "sm_80"),
                                        (["--target", "cuda:sm_80"], "sm_80"),
                                        (["--arch", "sm_86", "--target", "cuda:sm_86"], "sm_86")])
def test_compile_cuda_target(argv, arch, fake_check_plan, capsys):
    assert run(["compile", CHAIN, *argv]) == 0
    assert fake_check_plan == [arch]
    assert f"saxpy: saxpy ok (4 params, 10 bytes of PTX, cuda:{arch})" in capsys.readouterr().out


def test_compile_arch_this_nvrtc_lacks_is_a_usage_error(monkeypatch, fake_check_plan, capsys):
    from dagbuild import kernels

    monkeypatch.setattr(kernels, "supported_archs", lambda: [80, 90])
    assert run(["compile", CHAIN, "--arch", "sm_75"]) == 2
    assert "sm_80, sm_90" in capsys.readouterr().err


def test_compile_hip_target_calls_hiprtc(monkeypatch, capsys):
    from dagbuild import hiprtc

    calls = []
    monkeypatch.setattr(hiprtc, "check_plan_hip",
                        lambda p, arch: calls.append(arch) or {"saxpy": {"entry": "saxpy", "params": 4}})
    assert run(["compile", CHAIN, "--target", "hip:gfx90a"]) == 0
    assert calls == ["gfx90a"] and "saxpy: saxpy ok (4 params, hip:gfx90a)" in capsys.readouterr().out


def test_compile_hip_target_without_hiprtc(monkeypatch, capsys):
    from dagbuild import hiprtc

    monkeypatch.delenv("DAGBUILD_HIPRTC", raising=False)
    monkeypatch.setattr(hiprtc, "_try_load", lambda cands, symbol: None)  # as if the library were not installed
    hiprtc._hiprtc.cache_clear()
    try:
        assert run(["compile", CHAIN, "--target", "hip:gfx942"]) == 1
    finally:
        hiprtc._hiprtc.cache_clear()
    err = capsys.readouterr().err
    assert "hiprtc (HIP runtime compilation) not found" in err and "apt-get install" in err
