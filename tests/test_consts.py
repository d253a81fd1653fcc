"""``consts:``: named floats for scalar kernel args, overridable like dims, refused wherever an integer is
needed, shown by ``info``, round-tripped by to_yaml, built by the DSL too."""

from __future__ import annotations

import textwrap

import pytest

from dagbuild import SpecBuilder
from dagbuild.cli import main
from dagbuild.errors import SpecError
from dagbuild.load import parse_spec
from dagbuild.plan import plan

KERNEL = 'extern "C" __global__ void k(float* x, float e, int n) {}'
SPEC = textwrap.dedent(f"""\
    dagbuild: 1
    name: consts
    dims: {{n: 64}}
    consts: {{eps: 1.0e-5, two: 2}}
    kernels:
      k: {{code: '{KERNEL}', entry: k, params: [f32* x, f32 e, i32 n]}}
    buffers:
      x: {{dtype: f32, shape: [n]}}
    nodes:
      - {{id: a, kernel: k, grid: [1], block: [32], args: {{x: x, e: eps * two, n: n}}}}
    """)


def arg(p, name: str):
    return next(a.value for a in p.nodes[0].op.args if a.param.name == name)


def issue(text: str, **overrides) -> str:
    with pytest.raises(SpecError) as e:
        plan(parse_spec(text), overrides)
    return e.value.issues[0].message


def test_consts_bind_as_floats_and_override():
    spec = parse_spec(SPEC)
    assert spec.consts == {"eps": 1e-5, "two": 2.0} and isinstance(spec.consts["two"], float)
    p = plan(spec)
    assert arg(p, "e") == pytest.approx(2e-5, rel=1e-6) and p.consts == {"eps": 1e-5, "two": 2.0}
    assert arg(plan(spec, eps=1e-6), "e") == pytest.approx(2e-6, rel=1e-6)
    assert arg(plan(spec, two=3), "e") == pytest.approx(3e-5, rel=1e-6)  # an int override is the float 3.0
    assert p.summary["consts"] == {"eps": 1e-5, "two": 2.0}


@pytest.mark.parametrize("value", ["x", True, float("nan"), float("inf")])
def test_a_bad_const_override_names_the_const(value):
    assert "const 'eps' needs a finite number" in issue(SPEC, eps=value)


@pytest.mark.parametrize("old,new,where", [
    ("n: n}}", "n: two}}", "arg 'n'"),
    ("grid: [1]", "grid: [two]", "grid[0]"),
    ("shape: [n]", "shape: [two]", "buffer 'x': shape[0]"),
])
def test_a_const_is_never_an_integer(old, new, where):
    msg = issue(SPEC.replace(old, new))
    assert where in msg and "2.0" in msg


@pytest.mark.parametrize("consts,expect", [
    ("{n: 1.0}", "const 'n' is also a dim"),
    ("{eps: .nan}", "const 'eps' = nan must be a finite number"),
    ("{eps: '1e-5'}", "consts.eps"),
    ("{1x: 1.0}", "consts name '1x'"),
])
def test_bad_consts_are_refused_naming_them(consts, expect):
    with pytest.raises(SpecError) as e:
        plan(parse_spec(SPEC.replace("{eps: 1.0e-5, two: 2}", consts)))
    assert any(expect in f"{i.field} {i.message}" for i in e.value.issues), e.value.issues


def test_consts_round_trip_and_dsl():
    spec = parse_spec(SPEC)
    assert parse_spec(spec.to_yaml()) == spec
    g = SpecBuilder("consts", dims={"n": 64}, consts={"eps": 1e-5})
    g.const("two", 2.0)
    g.kernel("k", code=KERNEL, entry="k", params=["f32* x", "f32 e", "i32 n"])
    g.buffer("x", "f32", ["n"])
    g.launch("a", "k", grid=[1], block=[32], args={"x": "x", "e": "eps * two", "n": "n"})
    assert g.spec() == spec


def test_cli_set_and_info_show_consts(tmp_path, capsys):
    path = tmp_path / "consts.yaml"
    path.write_text(SPEC)
    assert main(["info", str(path), "--set", "eps=1e-6"]) == 0
    out = capsys.readouterr().out
    assert "consts" in out and "eps=1e-06" in out and "two=2" in out
    assert main(["validate", str(path), "--set", "eps=abc"]) == 1
    assert "const 'eps' needs a finite number" in capsys.readouterr().err
