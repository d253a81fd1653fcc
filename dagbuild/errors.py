"""Every error dagbuild raises: one base class, and issues that name their culprit."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Issue:
    """One problem found in a spec: what kind (``code``), and which nodes, buffer and line."""

    code: str
    message: str
    nodes: tuple[str, ...] = ()
    buffer: str | None = None
    line: int | None = None
    field: str | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["nodes"] = list(self.nodes)
        return d

    def __str__(self) -> str:
        where = f" (line {self.line})" if self.line is not None else ""
        return f"[{self.code}] {self.message}{where}"


class DagbuildError(Exception):
    """Base of every error dagbuild raises on purpose."""


class SpecError(DagbuildError):
    """A spec is invalid; ``issues`` lists every independent problem found."""

    def __init__(self, issues: list[Issue] | Issue):
        self.issues: list[Issue] = [issues] if isinstance(issues, Issue) else list(issues)
        super().__init__("\n".join(str(i) for i in self.issues) or "invalid spec")

    @property
    def codes(self) -> list[str]:
        return [i.code for i in self.issues]


class CompileError(DagbuildError):
    """A kernel failed to compile; the message carries the compiler log."""

    def __init__(self, kernel: str, log: str):
        self.kernel, self.log = kernel, log
        super().__init__(f"kernel {kernel!r} failed to compile:\n{log.strip()}")

    def __reduce__(self):  # picklable: tools/prebuild.py compiles in worker processes
        return (type(self), (self.kernel, self.log))


class DriverError(DagbuildError):
    """A CUDA/HIP driver call failed. ``node``/``kernel`` name the spec node when known."""

    def __init__(self, call: str, status: str, node: str | None = None, kernel: str | None = None,
                 detail: str = ""):
        self.call, self.status, self.node, self.kernel = call, status, node, kernel
        where = ""
        if node is not None:
            where = f" at node {node!r}" + (f" (kernel {kernel!r})" if kernel else "")
        super().__init__(f"{call} failed{where}: {status}" + (f"; {detail}" if detail else ""))


class BuildError(DagbuildError):
    """Building or updating an executable failed for a reason dagbuild checks itself."""

    def __init__(self, message: str, node: str | None = None, buffer: str | None = None,
                 code: str = "build"):
        self.node, self.buffer, self.code = node, buffer, code
        super().__init__(message)
