"""Kernel source files as one self-contained text.

:func:`read_kernel_source` reads a ``.cu``/``.cuh``/``.hip``/``.h``/``.hpp`` file and inlines its quoted
includes (``#include "port.cuh"``) textually, each file once, so that NVRTC, CuPy (``RawModule(code=...)``)
and hiprtc all compile the same text (none of them is told where the file was), and a cache keyed by the
source text sees a change to any header.

Rules:

* only quoted includes are inlined; ``#include <...>`` (system and toolkit headers) stays as written;
* an included file must lie next to the top-level file or below its directory (after resolving ``..``
  and symbolic links), and have one of :data:`SUFFIXES`; it is looked up relative to the file that
  includes it;
* every file is inlined at most once (``#pragma once`` semantics for every file, cycles included); its
  ``#pragma once`` line is dropped;
* includes are found line by line (``#`` first on the line, after blanks); preprocessor conditionals are
  not evaluated, so an include inside ``#if 0`` is still inlined (harmlessly, once);
* ``#line`` directives around each inlined file keep compiler messages pointing at the real file and line
  (file names relative to the top-level file's directory); a file with no quoted include comes back
  unchanged.

Every problem is a :class:`SourceError` (a DagbuildError) naming the file, and for an include its line.
"""

from __future__ import annotations

import re
from pathlib import Path

from dagbuild.errors import DagbuildError

__all__ = ["SUFFIXES", "SourceError", "read_kernel_source"]

#: The file suffixes a kernel source or an included header may have.
SUFFIXES: tuple[str, ...] = (".cu", ".cuh", ".hip", ".h", ".hpp")

_INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"\n]*)"[ \t]*(?://.*|/\*.*)?$')
_PRAGMA_ONCE_RE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once\b.*$")


class SourceError(DagbuildError):
    """A kernel source file could not be read or one of its includes could not be inlined.

    ``path`` is the file at fault (the including file for a bad include) and ``line`` the line of the
    include (1-based), when there is one."""

    def __init__(self, message: str, path: Path | None = None, line: int | None = None):
        self.path, self.line = path, line
        super().__init__(message)


def _suffix_ok(path: Path) -> bool:
    return path.suffix in SUFFIXES


def _allowed() -> str:
    return ", ".join(SUFFIXES)


def _read_text(path: Path, where: str) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SourceError(f"{where}kernel source {str(path)!r} not found", path) from None
    except IsADirectoryError:
        raise SourceError(f"{where}kernel source {str(path)!r} is a directory, not a file", path) from None
    except OSError as e:
        raise SourceError(f"{where}kernel source {str(path)!r} cannot be read ({e.strerror or e})", path) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SourceError(
            f"kernel source {str(path)!r} is not UTF-8 text (byte {e.start}, line {line}); "
            f"save it as UTF-8",
            path,
            line,
        ) from None


def read_kernel_source(path: Path | str) -> str:
    """The text of kernel source ``path`` with its quoted includes inlined (see the module docstring).

    Raises SourceError when ``path`` has another suffix than :data:`SUFFIXES` (the message names the path
    and the allowed suffixes, never the file's content), is missing or not UTF-8, or when an include is
    missing, escapes the file's directory, has a disallowed suffix or is not UTF-8 (naming the including
    file and the include's line)."""
    top = Path(path)
    if not _suffix_ok(top):
        raise SourceError(
            f"kernel source {str(top)!r} has suffix {top.suffix or '(none)'!r}; "
            f"a kernel source must be one of: {_allowed()}",
            top,
        )
    text = _read_text(top, "")
    if not any(_INCLUDE_RE.match(line) for line in text.splitlines()):
        return text  # nothing to inline: the file as it is
    try:
        root = top.resolve(strict=True).parent
    except OSError as e:  # pragma: no cover - it was just read
        raise SourceError(f"kernel source {str(top)!r} cannot be resolved ({e})", top) from None
    seen: set[Path] = {top.resolve()}
    out: list[str] = []
    _inline(top.resolve(), text, root, seen, out)
    return "".join(out)


def _display(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # pragma: no cover - every inlined file lies below root
        return path.as_posix()


def _inline(path: Path, text: str, root: Path, seen: set[Path], out: list[str]) -> None:
    name = _display(path, root)
    lines = text.splitlines(keepends=True)
    for lineno, line in enumerate(lines, 1):
        if _PRAGMA_ONCE_RE.match(line):
            out.append("\n")  # keeps the line count; every file is inlined once anyway
            continue
        m = _INCLUDE_RE.match(line.rstrip("\r\n"))
        if not m:
            out.append(line)
            continue
        target = _resolve_include(m.group(1), path, lineno, root)
        if target not in seen:
            seen.add(target)
            child = _read_text(target, f"{path}:{lineno}: #include \"{m.group(1)}\": ")
            out.append(f'#line 1 "{_display(target, root)}"\n')
            _inline(target, child, root, seen, out)
            if out and not out[-1].endswith("\n"):
                out.append("\n")
        else:
            out.append(f"// {line.strip()} (already inlined above)\n")
        out.append(f'#line {lineno + 1} "{name}"\n')
    if lines and not lines[-1].endswith(("\n", "\r")):
        out.append("\n")


def _resolve_include(name: str, including: Path, lineno: int, root: Path) -> Path:
    where = f"{including}:{lineno}"
    if not name.strip():
        raise SourceError(f'{where}: empty #include ""', including, lineno)
    rel = Path(name)
    if rel.is_absolute():
        raise SourceError(
            f'{where}: #include "{name}" is an absolute path; include files next to the kernel source or '
            f"below its directory ({root}) by relative path",
            including,
            lineno,
        )
    candidate = including.parent / rel
    if not _suffix_ok(candidate):
        raise SourceError(
            f'{where}: #include "{name}" has suffix {candidate.suffix or "(none)"!r}; '
            f"an included file must be one of: {_allowed()}",
            including,
            lineno,
        )
    try:
        target = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise SourceError(f'{where}: #include "{name}": file not found (looked at {candidate})',
                          including, lineno) from None
    except OSError as e:
        raise SourceError(f'{where}: #include "{name}" cannot be resolved ({e})', including, lineno) from None
    try:
        target.relative_to(root)
    except ValueError:
        raise SourceError(
            f'{where}: #include "{name}" resolves to {target}, outside the kernel source\'s directory '
            f"{root}; only files next to it or below it are inlined",
            including,
            lineno,
        ) from None
    if not target.is_file():
        raise SourceError(f'{where}: #include "{name}" is not a file ({target})', including, lineno)
    if not _suffix_ok(target):  # a symlink with an allowed name to a file with another one
        raise SourceError(
            f'{where}: #include "{name}" resolves to {target}, whose suffix is not one of: {_allowed()}',
            including,
            lineno,
        )
    return target
