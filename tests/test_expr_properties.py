"""The expression language against Python's own arithmetic, on random expressions: what ``expr.evaluate``
returns (or that it refuses) matches what Python computes for the same text. Python's ``eval`` runs here, in
the test only, as the reference; dagbuild never evaluates with it."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dagbuild import expr

ENV = {"a": 7, "b": -3, "c": 0, "d": 12, "f": 2.5}
NAMES = st.sampled_from(sorted(ENV))
NUMBERS = st.one_of(st.integers(-20, 20), st.sampled_from([0.5, 1.5, 2.0]))


def _python(text: str):
    """Python's value of the reference text (ZeroDivisionError: dagbuild's ExprError)."""
    def ceil_div(x, y):
        if y == 0:
            raise ZeroDivisionError
        return -((-x) // y) if isinstance(x, int) and isinstance(y, int) else math.ceil(x / y)

    scope = {"__builtins__": {}, "int": int, "bool": bool, "ceil_div": ceil_div, "min": lambda *v: min(v),
             "max": lambda *v: max(v), **ENV}
    return eval(text, scope)  # noqa: S307 - the reference in a test, over generated arithmetic only


@st.composite
def expressions(draw, depth: int = 0) -> tuple[str, str]:
    """(dagbuild text, Python reference text): comparisons, ``and``/``or`` and ``not`` give 0 or 1 in dagbuild
    (integer places need a number), so the reference wraps them in int(); ``and``/``or`` still short-circuit."""
    if depth >= 3 or draw(st.integers(0, 2)) == 0:
        leaf = draw(st.one_of(NAMES, NUMBERS.map(repr)))
        leaf = f"({leaf})" if leaf.startswith("-") else leaf
        return leaf, leaf
    kind = draw(st.sampled_from(["bin", "bin", "neg", "call", "cmp", "bool", "not"]))
    sub = lambda: draw(expressions(depth + 1))  # noqa: E731
    if kind == "bin":
        op = draw(st.sampled_from(["+", "-", "*", "//", "%"]))
        (x, rx), (y, ry) = sub(), sub()
        return f"({x} {op} {y})", f"({rx} {op} {ry})"
    if kind == "neg":
        x, rx = sub()
        return f"-({x})", f"-({rx})"
    if kind == "call":
        fn = draw(st.sampled_from(["ceil_div", "min", "max"]))
        args = [sub() for _ in range(2 if fn == "ceil_div" else draw(st.integers(1, 3)))]
        return f"{fn}({', '.join(a for a, _ in args)})", f"{fn}({', '.join(r for _, r in args)})"
    if kind == "cmp":
        ops = draw(st.lists(st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), min_size=1, max_size=2))
        parts = [sub()]
        for op in ops:
            parts += [(op, op), sub()]
        return f"({' '.join(a for a, _ in parts)})", f"int({' '.join(r for _, r in parts)})"
    if kind == "bool":
        op = draw(st.sampled_from(["and", "or"]))
        (x, rx), (y, ry) = sub(), sub()
        return f"({x} {op} {y})", f"int(bool({rx}) {op} bool({ry}))"
    x, rx = sub()
    return f"(not {x})", f"int(not {rx})"


@settings(max_examples=500, deadline=None)
@given(expressions())
def test_evaluate_matches_python(case):
    text, reference = case
    try:
        want = _python(reference)
    except ZeroDivisionError:
        with pytest.raises(expr.ExprError, match="division by zero"):
            expr.evaluate(text, ENV)
        return
    except OverflowError:  # a float too large: not a case integer places meet
        return
    got = expr.evaluate(text, ENV)
    if isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got), (text, got)
        return
    assert got == want and type(got) is type(want), (text, reference, got, want)
