"""The spec format (version 1) as Pydantic models: what a user writes, before anything is bound.

A GraphSpec holds expressions, not numbers; :mod:`dagbuild.plan` binds them. Field names here are
the public YAML format: keep them stable.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    model_validator,
)

FORMAT_VERSION = 1

SCALAR_TYPES = ("i32", "u32", "i64", "u64", "f32", "f64")
ELEMENT_TYPES = (*SCALAR_TYPES, "f16", "bf16", "i8", "u8")
ITEMSIZE = {"i8": 1, "u8": 1, "f16": 2, "bf16": 2, "i32": 4, "u32": 4, "f32": 4,
            "i64": 8, "u64": 8, "f64": 8}

#: A number, or expression text evaluated by :mod:`dagbuild.expr`.
Expr = Union[StrictInt, StrictFloat, StrictStr]  # noqa: UP007  (pydantic needs the Union here)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, populate_by_name=True)


class KernelDecl(_Model):
    """A kernel: CUDA C++ source (a file or inline code), its extern "C" entry, its C-style params."""

    source: str | None = None
    code: str | None = None
    entry: str
    params: list[str]
    options: list[str] = Field(default_factory=list)
    launch: Literal["plain", "programmatic"] = Field(
        "plain", description="programmatic: the kernel calls griddepcontrol.wait (in every block, before it "
        "touches data another node writes), so edges from producer kernels may be programmatic")

    @model_validator(mode="after")
    def _one_source(self) -> KernelDecl:
        if (self.source is None) == (self.code is None):
            raise ValueError("give exactly one of `source` (a file) or `code` (inline source)")
        return self


class BufferDecl(_Model):
    """A named, typed, row-major array; ``memory: pinned`` puts it in page-locked host memory."""

    dtype: str
    shape: list[Expr]
    memory: Literal["device", "pinned"] = "device"


class _NodeBase(_Model):
    id: str
    after: list[str] = Field(default_factory=list)


class KernelNode(_NodeBase):
    kernel: str
    grid: list[Expr]
    block: list[Expr]
    shared: Expr = 0
    args: dict[str, Expr] = Field(default_factory=dict)


class MemcpyArgs(_Model):
    dst: str
    src: str


class MemcpyNode(_NodeBase):
    memcpy: MemcpyArgs


class MemsetArgs(_Model):
    dst: str
    value: StrictInt | StrictFloat = 0


class MemsetNode(_NodeBase):
    memset: MemsetArgs


class EmptyNode(_NodeBase):
    # required, with no default: ``to_dict`` (exclude_defaults) must keep the key that marks the node's kind
    empty: dict[str, Any]

    @model_validator(mode="after")
    def _really_empty(self) -> EmptyNode:
        if self.empty:
            raise ValueError("`empty` takes no settings: write `empty: {}`")
        return self


class RepeatArgs(_Model):
    var: str
    count: Expr


class RepeatBlock(_Model):
    """Expands ``nodes`` ``count`` times with ``var`` = 0..count-1; ids use ``{var}``."""

    repeat: RepeatArgs
    nodes: list[Node]


NODE_KINDS = ("kernel", "memcpy", "memset", "empty", "repeat")


def _node_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        found = [k for k in NODE_KINDS if k in value]
    else:
        found = [k for k in NODE_KINDS if getattr(value, k, None) is not None]
    return found[0] if len(found) == 1 else None


Node = Annotated[
    Union[  # noqa: UP007
        Annotated[KernelNode, Tag("kernel")],
        Annotated[MemcpyNode, Tag("memcpy")],
        Annotated[MemsetNode, Tag("memset")],
        Annotated[EmptyNode, Tag("empty")],
        Annotated[RepeatBlock, Tag("repeat")],
    ],
    Discriminator(
        _node_kind,
        custom_error_type="node_kind",
        custom_error_message="a node needs exactly one of the keys kernel, memcpy, memset, empty, repeat",
    ),
]
RepeatBlock.model_rebuild()

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class GraphSpec(_Model):
    """A whole decode-step (or any) DAG: dims, types, kernels, buffers and nodes in list order."""

    dagbuild: Literal[1] = Field(description="format version; must be 1")
    name: str
    dims: dict[str, StrictInt] = Field(default_factory=dict)
    types: dict[str, str] = Field(default_factory=dict,
                                  description="type parameters, e.g. {wt: f16}; usable as dtypes")
    deps: Literal["infer", "explicit"] = "infer"
    kernels: dict[str, KernelDecl] = Field(default_factory=dict)
    buffers: dict[str, BufferDecl] = Field(default_factory=dict)
    nodes: list[Node] = Field(default_factory=list)

    _base_dir: Path | None = PrivateAttr(default=None)
    _lines: dict[tuple, int] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _names(self) -> GraphSpec:
        for section in ("dims", "types", "buffers", "kernels"):
            for key in getattr(self, section):
                if not _NAME.match(key):
                    raise ValueError(f"{section} name {key!r} is not an identifier")
        return self

    def __eq__(self, other: object) -> bool:
        """Equal when every field is: the YAML line map and base directory are bookkeeping, not content."""
        if not isinstance(other, GraphSpec):
            return NotImplemented
        return self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]  (mutable, like any non-frozen model)

    @property
    def base_dir(self) -> Path | None:
        """Directory that relative kernel ``source`` paths resolve against (the YAML's folder)."""
        return self._base_dir

    def with_base_dir(self, path: Path | str | None) -> GraphSpec:
        self._base_dir = None if path is None else Path(path)
        return self

    def line_of(self, path: tuple) -> int | None:
        """YAML line of the deepest known prefix of ``path`` (e.g. ('nodes', 3, 'args', 'x'))."""
        for n in range(len(path), -1, -1):
            line = self._lines.get(tuple(path[:n]))
            if line is not None:
                return line
        return None

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_defaults=True, by_alias=True) | {"dagbuild": 1}

    def to_yaml(self) -> str:
        from .load import dump_yaml

        return dump_yaml(self)
