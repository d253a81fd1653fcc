"""The small, safe expression language of specs: dims, shapes, grids, scalar args, view indices, checks.

Integers and floats, names, ``+ - * // % ( )``, unary minus, ``ceil_div``, ``min`` and ``max``;
comparisons (``== != < <= > >=``) and ``and``/``or``/``not`` for a spec's ``checks``. A ``{expr}``
template (what ids use, and what the Python builder's repeat vars are) reads as ``(expr)``.
Parsed with :mod:`ast` and walked by hand against a whitelist; nothing is ever ``eval``-ed.
"""

from __future__ import annotations

import ast
import functools
import math
import operator
import re
from collections.abc import Mapping

Number = int | float
Expr = int | float | str

FUNCTIONS = ("ceil_div", "min", "max")


class ExprError(ValueError):
    """An expression failed to parse or evaluate; the message says why."""

    code = "expression"


class UnknownNameError(ExprError):
    """An expression names something that is not a dim, type or repeat var."""

    code = "unknown_reference"


#: ``{expr}`` templates in ids, ``after`` entries and (as plain parentheses) expressions.
TEMPLATE = re.compile(r"\{([^{}]+)\}")
MAX_LENGTH = 4096  # characters of one expression

def _ceil_div(a: Number, b: Number) -> Number:
    if b == 0:
        raise ExprError("division by zero in ceil_div")
    if isinstance(a, int) and isinstance(b, int):
        return -((-a) // b)
    return math.ceil(a / b)


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Mod: operator.mod}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}
_FUNCS = {"ceil_div": _ceil_div, "min": lambda *a: min(a), "max": lambda *a: max(a)}  # min(x) is x


@functools.lru_cache(maxsize=8192)
def parse(text: str) -> ast.expr:
    """Parse and whitelist-check ``text``; raises ExprError naming what is not allowed."""
    if len(text) > MAX_LENGTH:
        raise ExprError(f"expression longer than {MAX_LENGTH} characters: {text[:40]!r}...")
    source = TEMPLATE.sub(r"(\1)", text.strip())
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as e:
        raise ExprError(f"syntax error in {text!r}: {e.msg}") from None
    except (RecursionError, MemoryError):  # CPython's parser gives up on very deep nesting
        raise ExprError(f"expression too deeply nested: {text[:40]!r}...") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Expression | ast.Load | ast.Name | ast.operator | ast.unaryop):
            if isinstance(node, ast.operator) and type(node) not in _BINOPS:
                raise ExprError(f"operator {type(node).__name__} is not allowed in {text!r} "
                                "(use + - * // %)")
            if isinstance(node, ast.unaryop) and not isinstance(node, ast.USub | ast.UAdd | ast.Not):
                raise ExprError(f"operator {type(node).__name__} is not allowed in {text!r}")
            continue
        if isinstance(node, ast.BinOp | ast.UnaryOp | ast.BoolOp | ast.And | ast.Or):
            continue
        if isinstance(node, ast.Compare):
            if not all(type(op) in _COMPARE for op in node.ops):
                raise ExprError(f"only == != < <= > >= may compare in {text!r}")
            continue
        if isinstance(node, ast.cmpop):
            continue
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int | float):
                raise ExprError(f"only numbers are allowed as constants in {text!r}")
            continue
        if isinstance(node, ast.Call):
            if (not isinstance(node.func, ast.Name) or node.func.id not in _FUNCS or node.keywords):
                raise ExprError(f"only {', '.join(FUNCTIONS)} may be called in {text!r}")
            want = 2 if node.func.id == "ceil_div" else None
            if (want and len(node.args) != want) or len(node.args) < 1:
                raise ExprError(f"{node.func.id} takes {want or 'at least 1'} arguments in {text!r}")
            continue
        raise ExprError(f"{type(node).__name__} is not allowed in {text!r}")
    return tree.body


def names(value: Expr) -> set[str]:
    """Free names an expression refers to (function names excluded)."""
    if not isinstance(value, str):
        return set()
    return set(_names(value))


@functools.lru_cache(maxsize=8192)
def _names(value: str) -> frozenset[str]:
    tree = parse(value)
    funcs = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    return frozenset(n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in funcs)


def evaluate(value: Expr, env: Mapping[str, Number]) -> Number:
    """Evaluate a number or expression text against ``env``."""
    if isinstance(value, bool):
        raise ExprError(f"{value!r} is not a number")
    if isinstance(value, int | float):
        return value
    try:
        return compiled(value)(env)
    except RecursionError:
        raise ExprError(f"expression too deeply nested: {value[:40]!r}...") from None
    except OverflowError as e:  # an int too large for a float, or ceil_div of an infinity
        raise ExprError(f"overflow in {value!r}: {e}") from None


def evaluate_int(value: Expr, env: Mapping[str, Number]) -> int:
    """Evaluate where an integer is needed (sizes, grids, indices, counts): a float is refused, even a
    whole one (``rows[2.0]`` is a mistake, not row 2)."""
    out = evaluate(value, env)
    if isinstance(out, float):
        shown = f"{value!r} = {out}" if isinstance(value, str) and value.strip() != repr(out) else str(out)
        raise ExprError(f"{shown} is a float, but an integer is needed here")
    return out


@functools.lru_cache(maxsize=8192)
def compiled(text: str):
    """``text`` as a tree of closures (built once per text): evaluation skips the AST walk."""
    return _closure(parse(text), text)


def _closure(node: ast.expr, text: str):
    if isinstance(node, ast.Constant):
        value = node.value
        return lambda env: value
    if isinstance(node, ast.Name):
        name = node.id

        def load(env):
            try:
                return env[name]
            except KeyError:
                raise UnknownNameError(f"unknown name {name!r} in {text!r}") from None

        return load
    if isinstance(node, ast.UnaryOp):
        inner = _closure(node.operand, text)
        if isinstance(node.op, ast.Not):
            return lambda env: int(not inner(env))
        return (lambda env: -inner(env)) if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.BoolOp):
        parts = [_closure(v, text) for v in node.values]
        if isinstance(node.op, ast.And):
            return lambda env: int(all(p(env) for p in parts))
        return lambda env: int(any(p(env) for p in parts))
    if isinstance(node, ast.Compare):
        first = _closure(node.left, text)
        rest = [(_COMPARE[type(op)], _closure(c, text)) for op, c in zip(node.ops, node.comparators, strict=True)]

        def compare(env):
            a = first(env)
            for op, c in rest:
                b = c(env)
                if not op(a, b):
                    return 0
                a = b
            return 1

        return compare
    if isinstance(node, ast.BinOp):
        left, right, op = _closure(node.left, text), _closure(node.right, text), _BINOPS[type(node.op)]
        if isinstance(node.op, ast.FloorDiv | ast.Mod):
            def divide(env):
                b = right(env)
                if b == 0:
                    raise ExprError(f"division by zero in {text!r}")
                return op(left(env), b)

            return divide
        # + - * of names and numbers, the most common shapes (`l + 1`, `2 * ffn`, `n - m`): one call, not three
        sides = [(n.id, None) if isinstance(n, ast.Name) else (None, n.value) if isinstance(n, ast.Constant) else None
                 for n in (node.left, node.right)]
        if None not in sides:
            (lname, lconst), (rname, rconst) = sides
            if lname is None and rname is None:
                value = op(lconst, rconst)
                return lambda env: value

            def pair(env):
                try:
                    a = lconst if lname is None else env[lname]
                    b = rconst if rname is None else env[rname]
                except KeyError as e:
                    raise UnknownNameError(f"unknown name {e.args[0]!r} in {text!r}") from None
                return op(a, b)

            return pair
        return lambda env: op(left(env), right(env))
    if isinstance(node, ast.Call):
        fn, args = _FUNCS[node.func.id], [_closure(a, text) for a in node.args]  # type: ignore[union-attr]
        return lambda env: fn(*[a(env) for a in args])
    raise ExprError(f"cannot evaluate {text!r}")  # parse() whitelisted everything else


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside parentheses: ``"min(a, b), c"`` → ``["min(a, b)", "c"]``."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]
