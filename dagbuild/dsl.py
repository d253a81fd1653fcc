"""The Python side of the spec format: build the same GraphSpec fluently, with loops or ``repeat``.

    g = SpecBuilder("saxpy_chain", dims={"n": 1024})
    g.kernel("saxpy", source="../kernels/basic.cu", entry="saxpy",
             params=["f32 a", "const f32* x", "f32* y", "i32 n"])
    g.buffer("x", "f32", ["n"]).buffer("y", "f32", ["n"])
    g.memset("zero", dst="y", value=0)
    for s in range(4):
        g.launch(f"step.{s}", "saxpy", grid=["ceil_div(n, 256)"], block=[256],
                 args={"a": 0.5, "x": "x", "y": "y", "n": "n"})
    spec = g.spec()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .load import from_dict
from .spec import GraphSpec

Expr = int | float | str


class SpecBuilder:
    """Collects declarations in order; :meth:`spec` validates them into a GraphSpec (a description of a
    graph, not a CUDA graph: :func:`dagbuild.build` makes that)."""

    def __init__(self, name: str, dims: dict[str, int] | None = None, *, deps: str = "infer",
                 types: dict[str, str] | None = None, base_dir: Path | str | None = None,
                 runner: str | None = None, consts: dict[str, float] | None = None):
        self._data: dict[str, Any] = {"dagbuild": 1, "name": name, "dims": dict(dims or {}),
                                      "consts": dict(consts or {}),
                                      "types": dict(types or {}), "deps": deps,
                                      "kernels": {}, "buffers": {}, "nodes": []}
        if runner is not None:
            self._data["runner"] = runner
        self._stack: list[list] = [self._data["nodes"]]
        self._base_dir = base_dir

    def dim(self, name: str, value: int) -> SpecBuilder:
        self._data["dims"][name] = value
        return self

    def const(self, name: str, value: float) -> SpecBuilder:
        """A named float for scalar kernel args (``eps: rms_eps``), overridable like a dim."""
        self._data["consts"][name] = value
        return self

    def kernel(self, name: str, *, entry: str, params: Sequence[str], source: str | None = None,
               code: str | None = None, options: Sequence[str] = (), launch: str = "plain") -> SpecBuilder:
        decl: dict[str, Any] = {"entry": entry, "params": list(params)}
        if launch != "plain":
            decl["launch"] = launch
        if source is not None:
            decl["source"] = source
        if code is not None:
            decl["code"] = code
        if options:
            decl["options"] = list(options)
        self._data["kernels"][name] = decl
        return self

    def buffer(self, name: str, dtype: str, shape: Sequence[Expr], memory: str = "device") -> SpecBuilder:
        self._data["buffers"][name] = {"dtype": dtype, "shape": list(shape), "memory": memory}
        return self

    def _node(self, node: dict, after: Sequence[str]) -> SpecBuilder:
        if after:
            node["after"] = list(after)
        self._stack[-1].append(node)
        return self

    def launch(self, id: str, kernel: str, *, grid: Sequence[Expr], block: Sequence[Expr],
               args: dict[str, Expr], shared: Expr = 0, after: Sequence[str] = (),
               launch: str | None = None, variants: Sequence[dict] = ()) -> SpecBuilder:
        """A kernel node. ``variants``: ``[{"when": "batch >= 8", "kernel": ..., "grid": ..., ...}]``, the
        first whose ``when`` holds for the bound dims replaces the kernel and launch shape."""
        node = {"id": id, "kernel": kernel, "grid": list(grid), "block": list(block), "args": dict(args)}
        if shared != 0:
            node["shared"] = shared
        if launch is not None:
            node["launch"] = launch
        if variants:
            node["variants"] = [dict(v) for v in variants]
        return self._node(node, after)

    def check(self, expr: str, message: str) -> SpecBuilder:
        """A precondition on the dims (``"hidden % 8 == 0"``), checked whenever the spec is bound."""
        self._data.setdefault("checks", []).append({"expr": expr, "message": message})
        return self

    def memcpy(self, id: str, *, dst: str, src: str, after: Sequence[str] = ()) -> SpecBuilder:
        return self._node({"id": id, "memcpy": {"dst": dst, "src": src}}, after)

    def memset(self, id: str, *, dst: str, value: int | float = 0, after: Sequence[str] = ()) -> SpecBuilder:
        return self._node({"id": id, "memset": {"dst": dst, "value": value}}, after)

    def empty(self, id: str, *, after: Sequence[str] = ()) -> SpecBuilder:
        return self._node({"id": id, "empty": {}}, after)

    def child(self, id: str, *, reads: Sequence[str], writes: Sequence[str], body: Sequence[dict],
              after: Sequence[str] = ()) -> SpecBuilder:
        """A child-graph node: ``body`` is library calls (``{"call": "gemm", "args": {...}}``) recorded by
        stream capture; ``reads``/``writes`` must cover every view they touch."""
        child = {"reads": list(reads), "writes": list(writes), "body": [dict(c) for c in body]}
        return self._node({"id": id, "child": child}, after)

    @contextlib.contextmanager
    def repeat(self, var: str, count: Expr) -> Iterator[str]:
        """``with g.repeat("l", "layers") as l:`` — nodes added inside expand like YAML's ``repeat``;
        ``l`` is ``"{l}"``, a template that reads as the var in ids (``f"proj.{l}"``) and in expressions
        and views (``f"w[{l}]"``, ``f"{l} + 1"``) alike."""
        block: list = []
        self._stack[-1].append({"repeat": {"var": var, "count": count}, "nodes": block})
        self._stack.append(block)
        try:
            yield "{" + var + "}"
        finally:
            self._stack.pop()

    @contextlib.contextmanager
    def loop(self, id: str, *, max: Expr, until: str | None = None, unroll: Expr = 1,
             after: Sequence[str] = ()) -> Iterator[None]:
        """``with g.loop("decode", max="steps", until="done"):`` — nodes added inside form the loop's body
        (YAML's ``loop`` node): it runs up to ``max`` times in one launch, until ``until[0]`` is non-zero
        (``unroll`` body copies per conditional-node iteration)."""
        args: dict[str, Any] = {"max": max}
        if until is not None:
            args["until"] = until
        if unroll != 1:
            args["unroll"] = unroll
        body: list = []
        self._node({"id": id, "loop": args, "nodes": body}, after)
        self._stack.append(body)
        try:
            yield
        finally:
            self._stack.pop()

    def spec(self) -> GraphSpec:
        """The validated GraphSpec (schema issues raise SpecError, like YAML does)."""
        return from_dict(self._data, base_dir=self._base_dir)


#: The earlier name of :class:`SpecBuilder` (it builds a spec, not a CUDA graph).
Graph = SpecBuilder
