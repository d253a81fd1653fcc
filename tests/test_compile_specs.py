"""`dagbuild compile` over every shipped spec and kernel: NVRTC on the CPU, declared params vs PTX."""

from __future__ import annotations

import pytest
from conftest import SPECS
from helpers import needs_nvrtc

from dagbuild.cli import main

SPEC_FILES = sorted(p.name for p in SPECS.glob("*.yaml"))


def test_every_spec_is_listed():
    assert {"chain.yaml", "diamond.yaml", "fanout4.yaml", "layers.yaml", "llama_decode.yaml"} <= set(SPEC_FILES)


@needs_nvrtc
@pytest.mark.parametrize("name", SPEC_FILES)
def test_compile_checks_every_shipped_spec(name, capsys):
    assert main(["compile", str(SPECS / name)]) == 0
    out = capsys.readouterr().out
    assert " ok (" in out


@needs_nvrtc
@pytest.mark.parametrize("wt", ["f32", "f16", "bf16"])
def test_llama_spec_compiles_for_every_weight_type(wt, capsys):
    assert main(["compile", str(SPECS / "llama_decode.yaml"), "--set", f"wt={wt}"]) == 0
    assert f"gemv_{wt}" in capsys.readouterr().out


@needs_nvrtc
def test_compile_reports_signature_mismatch(tmp_path, capsys):
    text = (SPECS / "chain.yaml").read_text().replace("params: [f32 a, const f32* x, f32* y, i32 n]",
                                                       "params: [f32 a, const f32* x, f32* y, f32 n]")
    bad = tmp_path / "chain_bad.yaml"
    bad.write_text(text.replace("../kernels/basic.cu", str(SPECS.parent / "kernels" / "basic.cu")))
    assert main(["compile", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "[signature]" in err and "saxpy" in err and "'n'" in err
