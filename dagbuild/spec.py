"""The spec format (version 1) as Pydantic models: what a user writes, before anything is bound.

A GraphSpec holds expressions, not numbers; :mod:`dagbuild.plan` binds them. Field names here are
the public YAML format: keep them stable.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    field_validator,
    model_validator,
)

FORMAT_VERSION = 1
#: Documented limit: a spec may expand to at most this many graph nodes (``repeat`` multiplied out).
MAX_NODES = 200_000

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
    resident: StrictBool = Field(
        False, description="true: the kernel's blocks wait for each other (a persistent grid), so every block of "
        "a launch must be resident at once; the builder refuses a grid larger than the device holds")

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


_BAD_ID = re.compile(r"[\x00-\x1f\x7f]")


class _NodeBase(_Model):
    id: StrictStr
    after: list[StrictStr] = Field(default_factory=list)
    launch: Literal["plain", "programmatic"] | None = Field(
        None, description="kernel nodes: overrides the kernel's `launch` (programmatic edges join kernels only)")

    @field_validator("id")
    @classmethod
    def _id_text(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("a node id must not be empty")
        if _BAD_ID.search(v):
            raise ValueError(f"node id {v!r} contains a control character")
        return v


class KernelVariant(_Model):
    """Another kernel and launch shape for a kernel node, chosen by the dims (e.g. a tensor-core GEMM for
    ``batch >= 8``): each bucket of a pool binds the kernel that suits it, validated like any node."""

    when: StrictStr = Field(description="condition over dims (and repeat vars), e.g. \"batch >= 8\"")
    kernel: str
    grid: list[Expr] | None = Field(None, description="default: the node's grid")
    block: list[Expr] | None = Field(None, description="default: the node's block")
    shared: Expr | None = Field(None, description="default: the node's shared")
    args: dict[str, Expr] = Field(default_factory=dict, description="args added to or replacing the node's")
    launch: Literal["plain", "programmatic"] | None = None


class KernelNode(_NodeBase):
    kernel: str
    grid: list[Expr]
    block: list[Expr]
    shared: Expr = 0
    args: dict[str, Expr] = Field(default_factory=dict)
    variants: list[KernelVariant] = Field(
        default_factory=list, description="the first variant whose `when` holds replaces kernel, grid, block, "
        "shared (and adds args); none holds: the node's own kernel")


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


class LibCallSpec(_Model):
    """One library call of a child graph's body: ``{call: gemm, args: {a: h, b: "w[l]", c: y, m: rows, ...}}``."""

    call: StrictStr
    args: dict[str, Expr] = Field(default_factory=dict)


class ChildArgs(_Model):
    reads: list[StrictStr] = Field(default_factory=list, description="views the body reads")
    writes: list[StrictStr] = Field(default_factory=list, description="views the body writes (or reads and writes)")
    body: list[LibCallSpec] = Field(min_length=1, description="library calls recorded by stream capture, in order")


class ChildNode(_NodeBase):
    """A child-graph node: library calls (cuBLAS GEMMs, ...) recorded once by stream capture and inserted as
    one node; its declared ``reads``/``writes`` are what edge inference and race checks see."""

    child: ChildArgs


class RepeatArgs(_Model):
    var: str
    count: Expr


class RepeatBlock(_Model):
    """Expands ``nodes`` ``count`` times with ``var`` = 0..count-1; ids use ``{var}``. A count of 0 leaves the
    block out, so a dim can choose between two sets of nodes; a block whose count is 0 or 1 (such a switch) may
    keep plain ids."""

    repeat: RepeatArgs
    nodes: list[Node]


class LoopArgs(_Model):
    """``max``: iterations at most (an integer expression ≥ 1); ``until``: a one-element i32/u32 device
    buffer (or view) that the body writes; the loop ends when it is non-zero (checked before every
    iteration). Without ``until`` the body runs exactly ``max`` times. ``unroll``: body copies per
    conditional-node iteration (a divisor of ``max``): the driver's per-iteration cost is paid once per
    ``unroll`` runs of the body; the copies after a stop run, so (as in the unrolled fallback) the body's
    kernels must do nothing once ``until`` is set."""

    max: Expr
    until: StrictStr | None = None
    unroll: Expr = 1


class LoopNode(_NodeBase):
    """A device-side loop: ``nodes`` (its body, a graph of its own) runs up to ``loop.max`` times in one
    launch (a CUDA WHILE conditional node; unrolled ``max`` times where there are none)."""

    loop: LoopArgs
    nodes: list[Node]


NODE_KINDS = ("kernel", "memcpy", "memset", "empty", "child", "repeat", "loop")


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
        Annotated[ChildNode, Tag("child")],
        Annotated[RepeatBlock, Tag("repeat")],
        Annotated[LoopNode, Tag("loop")],
    ],
    Discriminator(
        _node_kind,
        custom_error_type="node_kind",
        custom_error_message="a node needs exactly one of the keys kernel, memcpy, memset, empty, child, repeat, loop",
    ),
]
RepeatBlock.model_rebuild()
LoopNode.model_rebuild()

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: A spec's name: it becomes file names (``<name>.dot``), so no paths, no hidden files.
SPEC_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")


class Check(_Model):
    """A precondition on the dims, checked when a spec is bound: ``{expr: "hidden % 8 == 0", message: ...}``."""

    expr: StrictStr
    message: StrictStr


class GraphSpec(_Model):
    """A whole decode-step (or any) DAG: dims, types, kernels, buffers and nodes in list order."""

    dagbuild: Literal[1] = Field(description="format version; must be 1")
    name: StrictStr = Field(description="letters, digits, _ . - (it names output files)")
    runner: StrictStr | None = Field(None, description="what `dagbuild run` does with it, e.g. llama_decode; "
                                     "none: build and launch")
    dims: dict[str, StrictInt] = Field(default_factory=dict)
    consts: dict[str, StrictFloat | StrictInt] = Field(
        default_factory=dict, description="named floats (e.g. {rms_eps: 1.0e-5}) for scalar kernel args; "
        "overridable like dims; never usable where an integer is needed (sizes, grids, indices)")
    types: dict[str, str] = Field(default_factory=dict,
                                  description="type parameters, e.g. {wt: f16}; usable as dtypes")
    deps: Literal["infer", "explicit"] = "infer"
    kernels: dict[str, KernelDecl] = Field(default_factory=dict)
    buffers: dict[str, BufferDecl] = Field(default_factory=dict)
    nodes: list[Node] = Field(default_factory=list)
    checks: list[Check] = Field(default_factory=list, description="preconditions on the dims")

    _base_dir: Path | None = PrivateAttr(default=None)
    _lines: dict[tuple, int] = PrivateAttr(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _spec_name(cls, v: str) -> str:
        if not SPEC_NAME.match(v):
            raise ValueError(f"spec name {v!r} must be 1-128 of A-Z a-z 0-9 _ . - and not start with . or -"
                             " (it names output files)")
        return v

    @field_validator("consts")
    @classmethod
    def _floats(cls, v: dict) -> dict:
        """Consts are floats (a whole number is taken as one), finite: so no integer place accepts them."""
        out = {}
        for key, value in v.items():
            if not math.isfinite(value):
                raise ValueError(f"const {key!r} = {value!r} must be a finite number")
            out[key] = float(value)
        return out

    @model_validator(mode="after")
    def _const_names(self) -> GraphSpec:
        for key in self.consts:
            if key in self.dims or key in self.types:
                raise ValueError(f"const {key!r} is also a {'dim' if key in self.dims else 'type'}: "
                                 "a name means one thing")
        return self

    @field_validator("dims", "consts", "types", "buffers", "kernels")
    @classmethod
    def _keys(cls, v: dict, info: Any) -> dict:
        for key in v:
            if not _NAME.match(key):
                raise ValueError(f"{info.field_name} name {key!r} is not an ASCII identifier "
                                 "(A-Z a-z 0-9 _, not starting with a digit)")
        return v

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
        """YAML text that :func:`dagbuild.load.parse_spec` reads back to an equal GraphSpec."""
        data = self.to_dict()
        order = ["dagbuild", "name", "runner", "dims", "consts", "types", "deps", "checks", "kernels", "buffers",
                 "nodes"]
        data = {k: data[k] for k in order if k in data} | {k: v for k, v in data.items() if k not in order}
        return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=100)


class _Dumper(yaml.SafeDumper):
    """Short lists of scalars in flow style, multi-line strings (inline kernel code) as blocks."""


def _flow_small(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(x, int | float | str) and not (isinstance(x, str) and "\n" in x) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


_Dumper.add_representer(list, _flow_small)
_Dumper.add_representer(str, _str)
