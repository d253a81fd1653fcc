"""Kernels: compile them, check their declared params against the PTX ``.entry``, cache the modules.

Two compile paths:

* :func:`compile_ptx` runs NVRTC through ``cuda.bindings.nvrtc`` and returns PTX. It needs no GPU, so
  ``dagbuild validate``/``compile`` and the CPU tests use it to check a spec's kernel declarations.
* :func:`load_module` loads a module for the device that is current: the cubin of :func:`module_image`
  (one NVRTC compile gives the cubin and the PTX the checks read, both kept on disk, so a cache filled on a
  machine without a GPU by ``tools/prebuild.py`` serves a GPU machine), or CuPy's own compile where NVRTC
  or the cache directory is missing; :func:`function_handle` then gives the integer ``CUfunction`` that
  graph kernel nodes take.

:func:`ptx_entry_params`, :func:`check_signature` and :func:`waits_programmatically` are pure text
processing of PTX. :func:`check_plan` runs every check of a plan on the CPU (``dagbuild compile``);
:class:`ModuleCache` holds the loaded modules that executables (and all buckets of a pool) share.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dagbuild.errors import BuildError, CompileError, DagbuildError, DriverError, Issue, SpecError

if TYPE_CHECKING:
    from dagbuild.ir import Plan, PlanKernel

__all__ = [
    "KINDS",
    "NVRTC_INSTALL_HINT",
    "ModuleCache",
    "check_plan",
    "check_signature",
    "compile_cubin",
    "compile_ptx",
    "cuda_include_dir",
    "function_handle",
    "load_module",
    "module_image",
    "nvrtc_version",
    "ptx_entries",
    "ptx_entry_params",
]

NVRTC_INSTALL_HINT = "pip install 'dagbuild[nvrtc]'"
CUDA_INSTALL_HINT = "pip install 'dagbuild[cuda13]'"

#: The scalar kinds a spec may declare, and the PTX ``.param`` types each one matches.
KINDS: dict[str, frozenset[str]] = {
    "ptr": frozenset({".u64", ".s64", ".b64"}),
    "i64": frozenset({".u64", ".s64", ".b64"}),
    "u64": frozenset({".u64", ".s64", ".b64"}),
    "i32": frozenset({".u32", ".s32", ".b32"}),
    "u32": frozenset({".u32", ".s32", ".b32"}),
    "f32": frozenset({".f32"}),
    "f64": frozenset({".f64"}),
}

_HEADERS = ("cuda_fp16.h", "cuda_bf16.h")


# ----------------------------------------------------------------------------------------------------
# NVRTC (no GPU needed)
# ----------------------------------------------------------------------------------------------------


def _nvrtc() -> Any:
    """The ``cuda.bindings.nvrtc`` module, with its shared library loaded, or a DagbuildError."""
    try:
        from cuda.bindings import nvrtc
    except Exception as e:  # ImportError, or a broken install
        raise DagbuildError(
            f"NVRTC is not available: cuda-bindings is not importable ({type(e).__name__}: {e}); "
            f"install it with: {NVRTC_INSTALL_HINT}"
        ) from e
    try:
        err, _major, _minor = nvrtc.nvrtcVersion()  # loads libnvrtc
    except Exception as e:  # the library itself is missing (cuda-pathfinder raises its own error)
        raise DagbuildError(
            f"NVRTC library not found ({type(e).__name__}: {e}); install it with: {NVRTC_INSTALL_HINT}"
        ) from e
    if int(err) != 0:
        raise DagbuildError(f"nvrtcVersion failed ({err!r}); install NVRTC with: {NVRTC_INSTALL_HINT}")
    return nvrtc


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library that :func:`compile_ptx` uses."""
    _err, major, minor = _nvrtc().nvrtcVersion()
    return int(major), int(minor)


def _candidate_include_dirs() -> list[Path]:
    dirs: list[Path] = []
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        for base in spec.submodule_search_locations:
            # CUDA 13 wheels install under nvidia/cu13, CUDA 12 ones under nvidia/cuda_runtime
            for sub in ("cu13", "cu12", "cuda_runtime"):
                dirs.append(Path(base) / sub / "include")
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]) / "include")
    dirs.append(Path("/usr/local/cuda/include"))
    return dirs


@functools.cache
def cuda_include_dir() -> str | None:
    """The first directory holding ``cuda_fp16.h`` and ``cuda_bf16.h``: the ``nvidia-cuda-runtime``
    wheel first, then ``$CUDA_PATH``/``$CUDA_HOME``, then ``/usr/local/cuda``; None if none has them."""
    for d in _candidate_include_dirs():
        if all((d / h).is_file() for h in _HEADERS):
            return str(d)
    return None


_ARCH_RE = re.compile(r"^(?:sm|compute)_(\d{2,3})([af]?)$")


def _arch_option(arch: str, real: bool = False) -> str:
    """``-arch=compute_XX`` (PTX only), or with ``real`` ``-arch=sm_XX`` (PTX and a cubin)."""
    m = _ARCH_RE.match(arch.strip())
    if not m:
        raise DagbuildError(f"bad GPU architecture {arch!r}: expected e.g. 'sm_90', 'sm_90a' or 'compute_80'")
    return f"-arch={'sm' if real else 'compute'}_{m.group(1)}{m.group(2)}"


def supported_archs() -> list[int]:
    """The compute capabilities (``90`` for sm_90) the installed NVRTC compiles for; [] when NVRTC is not
    there (compiling then says what to install)."""
    try:
        err, archs = _nvrtc().nvrtcGetSupportedArchs()
    except Exception:
        return []
    return sorted(int(a) for a in archs) if int(err) == 0 else []


def check_arch(arch: str) -> None:
    """A DagbuildError unless ``arch`` is a CUDA architecture name this NVRTC compiles for."""
    _arch_option(arch)
    supported = supported_archs()
    if supported and int(_ARCH_RE.match(arch.strip()).group(1)) not in supported:  # type: ignore[union-attr]
        raise DagbuildError(f"this NVRTC cannot compile for {arch}; it supports "
                            f"{', '.join(f'sm_{a}' for a in supported)}")


def _text(buf: bytes) -> str:
    return buf.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def compile_ptx(source: str, kernel: str, arch: str = "sm_90", options: Sequence[str] = ()) -> str:
    """Compile CUDA C++ ``source`` to PTX with NVRTC (no GPU needed) and return the PTX text.

    ``kernel`` names the spec's kernel in messages; the program is named ``<kernel>.cu`` so that the
    log's lines read ``<kernel>.cu(LINE): error: ...``. Options: ``--std=c++17``, ``-arch=compute_XX``
    from ``arch``, ``-I`` to the CUDA headers (``cuda_fp16.h``/``cuda_bf16.h``) when found, then
    ``options``. Raises CompileError(kernel, log) with NVRTC's full log on failure.
    """
    return _compile(source, kernel, arch, options, cubin=False)[0]


def compile_cubin(source: str, kernel: str, arch: str = "sm_90", options: Sequence[str] = ()) -> tuple[str, bytes]:
    """(PTX, cubin) of one NVRTC compile for the real architecture ``arch`` (``-arch=sm_XX``; no GPU needed):
    the device code a GPU loads and the PTX its signature checks read, for the price of one compile."""
    ptx, cubin = _compile(source, kernel, arch, options, cubin=True)
    assert cubin is not None
    return ptx, cubin


def _compile(source: str, kernel: str, arch: str, options: Sequence[str], cubin: bool) -> tuple[str, bytes | None]:
    nvrtc = _nvrtc()
    opts = ["--std=c++17", _arch_option(arch, real=cubin)]
    inc = cuda_include_dir()
    if inc is not None:
        opts.append(f"-I{inc}")
    opts.extend(options)
    bopts = [o.encode() for o in opts]

    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), f"{kernel}.cu".encode(), 0, [], [])
    if int(err) != 0:
        raise CompileError(kernel, f"nvrtcCreateProgram failed: {_nvrtc_error(nvrtc, err)}")
    try:
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(bopts), bopts)
        log = _program_log(nvrtc, prog)
        if int(err) != 0:
            head = f"{_nvrtc_error(nvrtc, err)} (options: {' '.join(opts)})"
            raise CompileError(kernel, f"{log.rstrip()}\n{head}" if log.strip() else head)
        ptx = _text(_nvrtc_output(nvrtc, prog, kernel, "PTX"))
        return ptx, _nvrtc_output(nvrtc, prog, kernel, "CUBIN") if cubin else None
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _nvrtc_output(nvrtc: Any, prog: Any, kernel: str, what: str) -> bytes:
    """The PTX or CUBIN of a compiled program, as bytes."""
    err, size = getattr(nvrtc, f"nvrtcGet{what}Size")(prog)
    if int(err) != 0 or size == 0:
        raise CompileError(kernel, f"nvrtcGet{what}Size failed: {_nvrtc_error(nvrtc, err)} (size {size})")
    buf = b" " * size
    (err,) = getattr(nvrtc, f"nvrtcGet{what}")(prog, buf)
    if int(err) != 0:
        raise CompileError(kernel, f"nvrtcGet{what} failed: {_nvrtc_error(nvrtc, err)}")
    return buf


def _program_log(nvrtc: Any, prog: Any) -> str:
    err, size = nvrtc.nvrtcGetProgramLogSize(prog)
    if int(err) != 0 or size <= 1:
        return ""
    buf = b" " * size
    (err,) = nvrtc.nvrtcGetProgramLog(prog, buf)
    return _text(buf) if int(err) == 0 else ""


def _nvrtc_error(nvrtc: Any, err: Any) -> str:
    try:
        _e, msg = nvrtc.nvrtcGetErrorString(err)
        return msg.decode() if isinstance(msg, bytes) else str(msg)
    except Exception:
        return repr(err)


# ----------------------------------------------------------------------------------------------------
# PTX signatures (pure text)
# ----------------------------------------------------------------------------------------------------

# `.visible .entry name(` ... `)`; an entry with no params is `.entry name()`.
_ENTRY_RE = re.compile(r"\.entry\s+([A-Za-z_$%][\w$]*)\s*\(([^)]*)\)")
_COMMENT_RE = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)


@functools.lru_cache(maxsize=8)
def _uncommented(ptx: str) -> str:
    """``ptx`` without comments. Kept per PTX text: a module's PTX is megabytes, and a pool asks about it once
    per bucket and node (the string's hash is cached on the object, so a hit costs nothing)."""
    return _COMMENT_RE.sub("", ptx)


def ptx_entries(ptx: str) -> dict[str, list[str]]:
    """Every ``.entry`` of ``ptx``, in order, with its param types (see :func:`ptx_entry_params`)."""
    text = _uncommented(ptx)
    return {m.group(1): _parse_params(m.group(2)) for m in _ENTRY_RE.finditer(text)}


def _parse_params(body: str) -> list[str]:
    """Types of a PTX param list. Scalars give their type (``.u64``); ``.ptr`` annotations
    (``.param .u64 .ptr .global .align 1 x``) are dropped; aggregates passed by value
    (``.param .align 4 .b8 x[8]``) give ``.b8[8]``."""
    types: list[str] = []
    for decl in body.split(","):
        toks = decl.split()
        if not toks:
            continue
        ty: str | None = None
        i = 0
        while i < len(toks):
            t = toks[i]
            if t == ".param":
                pass
            elif t == ".align":
                i += 1  # skip N
            elif t == ".ptr":
                # `.ptr [.space] [.align N]` qualifies the pointer; the type came before it
                while i + 1 < len(toks) and toks[i + 1] in (".global", ".shared", ".const", ".local"):
                    i += 1
            elif t.startswith(".") and ty is None:
                ty = t
            i += 1
        name = toks[-1]
        m = re.search(r"\[(\d*)\]$", name)
        if ty is None:
            ty = ".b8"
        types.append(f"{ty}[{m.group(1)}]" if m else ty)
    return types


def ptx_entry_params(ptx: str, entry: str) -> list[str]:
    """The PTX ``.param`` types of ``.entry entry(...)``, e.g. ``['.u64', '.u32', '.f32']``.

    A struct passed by value shows as ``'.b8[N]'``. Raises SpecError (code ``signature``) naming the
    entry and listing the entries that are there when ``entry`` is not in the PTX.
    """
    entries = ptx_entries(ptx)
    if entry not in entries:
        raise SpecError(Issue(code="signature", message=missing_entry_message(entry, entries)))
    return entries[entry]


def missing_entry_message(entry: str, entries: Sequence[str], kernel: str | None = None,
                          compiled: str = "the PTX") -> str:
    """Why ``entry`` is not among the ``entries`` of ``compiled`` code (the PTX, the code object), with the
    usual cause named when it shows (a C++-mangled name: no extern "C")."""
    where = f"kernel {kernel!r}: " if kernel else ""
    there = ", ".join(repr(e) for e in entries) or "none"
    hint = ""
    if any(e.startswith("_Z") and entry in e for e in entries):
        hint = ' (its name looks C++-mangled: declare the kernel extern "C")'
    return f"{where}entry {entry!r} is not in {compiled}{hint}; entries there: {there}"


def _ptx_type_ok(kind: str, ptx_type: str) -> bool:
    return ptx_type in KINDS.get(kind, frozenset())


def compare_params(kernel: str, entry: str, params: Sequence[tuple[str, str]], found: Sequence[Any],
                   what: tuple[str, str], text: Callable[[Any], str],
                   problem: Callable[[str, Any], str | None]) -> list[Issue]:
    """The declared ``(name, kind)`` params against the arguments ``found`` in a compiled entry (``what``:
    ``("PTX", "param")``, ``("code-object", "argument")``; ``text(arg)`` shows one): the count, then each param, where
    ``problem(kind, arg)`` says what is wrong with it (after "param 'x' (#i) ") or returns None. One Issue
    (code ``signature``, ``field`` = the param's name) per problem; the CUDA and HIP checks word alike."""
    where = f"kernel {kernel!r} (entry {entry!r})"
    issues: list[Issue] = []
    if len(params) != len(found):
        n, m = len(params), len(found)
        if n > m:
            pname, pkind = params[m]
            first = f"first declared param without a {what[0]} counterpart: {pname!r} ({pkind}, #{m})"
            fld: str | None = pname
        else:
            first = f"first {what[0]} {what[1]} not declared: #{n} ({text(found[n])})"
            fld = None
        issues.append(Issue(code="signature", field=fld,
                            message=f"{where}: {n} param(s) declared but the {what[0]} entry takes {m}; {first}"))
    for i, ((pname, kind), arg) in enumerate(zip(params, found, strict=False)):
        bad = problem(kind, arg)
        if bad:
            issues.append(Issue(code="signature", message=f"{where}: param {pname!r} (#{i}) {bad}", field=pname))
    return issues


def _ptx_param_problem(kind: str, ptype: str) -> str | None:
    if kind not in KINDS:
        return f"has unknown kind {kind!r}; expected one of {', '.join(KINDS)} (PTX type {ptype})"
    if ptype.endswith("]"):
        return (f"is declared {kind} but the PTX param is an aggregate passed by value ({ptype}), which dagbuild "
                "does not support; pass a pointer or scalars instead")
    if not _ptx_type_ok(kind, ptype):
        return f"is declared {kind} (PTX {'/'.join(sorted(KINDS[kind]))}) but the PTX param is {ptype}"
    return None


def check_signature(kernel: str, entry: str, params: Sequence[tuple[str, str]], ptx: str) -> list[Issue]:
    """Compare a kernel's declared params, ``(name, kind)`` pairs with kind in :data:`KINDS`, against
    the PTX ``.entry entry``: count and type class (ptr/64-bit ints ↔ ``.u64/.s64/.b64``, 32-bit ints
    ↔ ``.u32/.s32/.b32``, ``f32`` ↔ ``.f32``, ``f64`` ↔ ``.f64``). Returns one Issue (code
    ``signature``, ``field`` = the param's name) per problem; empty when they agree."""
    entries = ptx_entries(ptx)
    if entry not in entries:
        return [Issue(code="signature", message=missing_entry_message(entry, entries, kernel))]
    return compare_params(kernel, entry, params, entries[entry], ("PTX", "param"), str,
                          _ptx_param_problem)


# ----------------------------------------------------------------------------------------------------
# CuPy (GPU)
# ----------------------------------------------------------------------------------------------------


def load_module(source: str, kernel: str, options: Sequence[str] = ()) -> Any:
    """Compile ``source`` for the current device and load it; returns the ``cupy.RawModule``.

    Compiles with ``--std=c++17`` plus ``options``, now, so a bad kernel fails here with
    CompileError(kernel, log) rather than at first use. The cubin comes from :func:`module_image` (one
    NVRTC compile for the cubin and the PTX the signature checks read, both cached on disk); where NVRTC or
    the cache is missing, or the driver refuses the cached cubin, CuPy compiles the source instead.
    """
    try:
        import cupy
    except Exception as e:
        raise DagbuildError(
            f"CuPy is not importable ({type(e).__name__}: {e}); install it with: {CUDA_INSTALL_HINT}"
        ) from e
    from cupy.cuda.compiler import CompileException

    image = _device_image(source, kernel, tuple(options))
    if image is not None:
        module = cupy.RawModule(path=str(image))
        try:
            module.compile()  # loads the cubin
            return module
        except cupy.cuda.driver.CUDADriverError as e:  # e.g. a cubin of a newer toolkit than this driver
            logging.getLogger("dagbuild").warning("kernel %r: the driver refused the cached cubin %s (%s); "
                                                  "CuPy compiles the source instead", kernel, image.name, e)
    module = cupy.RawModule(code=source, options=("--std=c++17", *options))
    try:
        module.compile()
    except CompileException as e:
        raise CompileError(kernel, e.get_message() if hasattr(e, "get_message") else str(e)) from e
    except cupy.cuda.driver.CUDADriverError as e:  # e.g. cuModuleLoadData refusing the image
        raise DriverError("cuModuleLoadData", str(e), kernel=kernel) from e
    return module


def _device_image(source: str, kernel: str, options: tuple[str, ...]) -> Path | None:
    """The cached cubin for the current device, or None where this NVRTC cannot make it (not installed, an
    arch it does not know) or nothing can be cached."""
    arch = _device_arch() if cache_dir() is not None else None
    if arch is None:
        return None
    return module_image(source, kernel, arch, options)  # a CompileError here is the kernel's


def _device_arch() -> str | None:
    """``sm_XY`` of the current device where this NVRTC compiles for it, else None (no CuPy or no device)."""
    try:
        import cupy

        arch = f"sm_{cupy.cuda.Device().compute_capability}"
        return arch if int(arch[3:]) in supported_archs() else None
    except Exception:
        return None


def missing_images(kernels: Iterable[PlanKernel], arch: str | None = None) -> list[PlanKernel]:
    """Those of ``kernels`` whose module's cubin for ``arch`` (None: the current device's) is not in the cache
    (none where nothing can be cached or compiled)."""
    arch, root = arch or _device_arch(), cache_dir()
    if arch is None or root is None:
        return []
    return [k for k in kernels if not (root / f"{_digest(k.source, arch, k.options)}.cubin").is_file()]


#: Compiles side by side at most (each Llama module takes 250-600 MiB of host memory in NVRTC).
PREPARE_WORKERS = 8


def prepare_images(kernels: Iterable[PlanKernel], arch: str | None = None) -> int:
    """Compile side by side the cubins (with their PTX) of ``kernels``' modules that the cache does not hold
    yet, for ``arch`` (None: the current device's); returns how many were compiled.

    A fresh machine compiles every module it loads (NVRTC: 10-50 s each for the Llama kernels on a small
    CPU), and loading them one by one waits for the sum. NVRTC releases the GIL, so threads overlap (two
    compiles of llama_prefill.cu on 2 cores: 34.7 s one after the other, 17.2 s side by side). A module that
    fails here is left to :func:`load_module`, which raises its CompileError where the kernel is loaded."""
    arch = arch or _device_arch()
    if arch is None:
        return 0
    return _side_by_side(lambda src, name, opts: module_image(src, name, arch, opts), missing_images(kernels, arch))


def prepare_ptx(kernels: Iterable[PlanKernel], arch: str) -> int:
    """The PTX of ``kernels``' modules that neither this process nor the cache holds, compiled side by side for
    ``arch`` (what ``dagbuild compile`` and the signature checks read; see :func:`prepare_images`)."""
    root = cache_dir()
    todo = [k for k in kernels if (k.source, arch, tuple(k.options)) not in _PTX_CACHE and
            (root is None or not (root / f"{_digest(k.source, arch, k.options)}.ptx.gz").is_file())]
    return _side_by_side(lambda src, name, opts: plan_ptx(src, name, arch, opts), todo)


def _side_by_side(compile_one: Callable[[str, str, tuple[str, ...]], Any], kernels: list[PlanKernel]) -> int:
    """``compile_one(source, kernel name, options)`` once per module of ``kernels``, in threads; how many ran
    (none for a single module: it compiles as fast when it is needed). A module that fails is left to its
    caller, which raises its CompileError where the kernel is used."""
    todo: dict[tuple[str, tuple[str, ...]], str] = {}  # module → the first kernel that names it (errors name it)
    for k in kernels:
        todo.setdefault((k.source, tuple(k.options)), k.name)
    if len(todo) < 2:
        return 0

    def run(item: tuple[tuple[str, tuple[str, ...]], str]) -> None:
        (source, options), name = item
        try:
            compile_one(source, name, options)
        except DagbuildError:
            pass

    with ThreadPoolExecutor(min(len(todo), os.cpu_count() or 1, PREPARE_WORKERS)) as pool:
        list(pool.map(run, todo.items()))
    return len(todo)


def function_handle(module: Any, entry: str, kernel: str | None = None) -> int:
    """The driver ``CUfunction`` of ``entry`` in a module from :func:`load_module`, as an int."""
    try:
        fn = module.get_function(entry)
        return int(fn.kernel.ptr)
    except Exception as e:
        if type(e).__name__ == "CUDADriverError" and "NOT_FOUND" in str(e):
            who = f"kernel {kernel!r}: " if kernel else ""
            raise BuildError(f"{who}entry {entry!r} not found in the compiled module ({e})", code="signature") from e
        raise


# ----------------------------------------------------------------------------------------------------
# Programmatic launch (pure text)
# ----------------------------------------------------------------------------------------------------

_FUNC_START = re.compile(
    r"^\s*(?:\.visible\s+|\.weak\s+|\.extern\s+)*\.(?:entry|func)\b[^\n]*?([A-Za-z_$%][\w$]*)\s*\(", re.M)
_CALL = re.compile(r"\bcall(?:\.uni)?\s+(?:\([^)]*\)\s*,\s*)?([A-Za-z_$%][\w$]*)")


@functools.lru_cache(maxsize=8)
def _bodies(ptx: str) -> dict[str, str]:
    """Each ``.entry``/``.func`` name → its text up to the next one (shared: callers only read it)."""
    text = _uncommented(ptx)
    starts = [(m.start(), m.group(1)) for m in _FUNC_START.finditer(text)]
    return {name: text[a:b] for (a, name), (b, _) in zip(starts, [*starts[1:], (len(text), "")], strict=True)}


@functools.lru_cache(maxsize=1024)
def waits_programmatically(ptx: str, entry: str) -> bool:
    """Whether ``entry`` (or a function it calls) executes ``griddepcontrol.wait``: the instruction that
    makes a programmatic edge into its node safe."""
    bodies = _bodies(ptx)
    todo, seen = [entry], set()
    while todo:
        name = todo.pop()
        if name in seen or name not in bodies:
            continue
        seen.add(name)
        body = bodies[name]
        if "griddepcontrol.wait" in body:
            return True
        todo.extend(_CALL.findall(body))
    return False


# ----------------------------------------------------------------------------------------------------
# Checks of a plan's kernels (no GPU)
# ----------------------------------------------------------------------------------------------------

_PTX_CACHE: dict[tuple, str] = {}


def cache_dir() -> Path | None:
    """Where compiled kernels (PTX for the signature checks, cubins for the GPU) are kept between runs
    (``DAGBUILD_CACHE_DIR``; empty disables)."""
    env = os.environ.get("DAGBUILD_CACHE_DIR")
    if env == "":
        return None
    return Path(env) if env else Path.home() / ".cache" / "dagbuild"


def _digest(source: str, arch: str, options: Sequence[str]) -> str:
    """The cache name of one compile. NVRTC's major version is part of it, its minor version is not: a
    cubin of one CUDA major loads on every driver of that major (minor version compatibility), and the
    params a PTX declares do not change between minor releases, so a cache filled with one toolkit serves
    a machine with another minor release (tools/prebuild.py)."""
    return _digest_of(source, arch, tuple(options), nvrtc_version()[0])


@functools.lru_cache(maxsize=256)
def _digest_of(source: str, arch: str, options: tuple[str, ...], major: int) -> str:
    return hashlib.sha256(repr((source, arch, options, major)).encode()).hexdigest()[:32]


def _load_cached(root: Path | None, name: str) -> bytes | None:
    try:
        return (root / name).read_bytes() if root is not None else None
    except OSError:
        return None


def _store_cached(root: Path | None, name: str, data: bytes) -> bool:
    """Write atomically (a reader never sees half a file); False where the directory is not writable (a
    read-only home only costs a recompile next time)."""
    if root is None:
        return False
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f"{name}.{os.getpid()}.{threading.get_ident()}.tmp"  # prepare_images writes from threads
        tmp.write_bytes(data)
        tmp.replace(root / name)
        return True
    except OSError:
        return False


def plan_ptx(source: str, kernel: str, arch: str, options: tuple[str, ...]) -> str:
    """PTX of a kernel source, compiled once per source/arch/options in this process (whichever spec
    kernel asks first names it in errors), and kept on disk (gzip) between runs."""
    key = (source, arch, tuple(options))
    if key in _PTX_CACHE:
        return _PTX_CACHE[key]
    root = cache_dir()
    data = _load_cached(root, f"{_digest(source, arch, options)}.ptx.gz")
    if data is not None:
        _PTX_CACHE[key] = gzip.decompress(data).decode()
        return _PTX_CACHE[key]
    return _keep_ptx(root, source, arch, options, compile_ptx(source, kernel, arch=arch, options=options))


def _keep_ptx(root: Path | None, source: str, arch: str, options: Sequence[str], ptx: str) -> str:
    """A compile's PTX into this process's cache and (gzip) the directory's, where plan_ptx looks."""
    _PTX_CACHE[(source, arch, tuple(options))] = ptx
    _store_cached(root, f"{_digest(source, arch, options)}.ptx.gz", gzip.compress(ptx.encode(), 6))
    return ptx


def module_image(source: str, kernel: str, arch: str, options: Sequence[str] = ()) -> Path | None:
    """The cubin of ``source`` for ``arch`` (e.g. ``sm_90``) in :func:`cache_dir`, compiled where it is not
    there yet, together with its PTX (which :func:`plan_ptx` then finds); None without a writable cache
    directory. Needs NVRTC, no GPU: ``tools/prebuild.py`` fills a cache for a GPU machine to use."""
    root = cache_dir()
    if root is None:
        return None
    digest = _digest(source, arch, options)
    path = root / f"{digest}.cubin"
    if path.is_file():
        return path
    ptx, cubin = compile_cubin(source, kernel, arch, options)
    _keep_ptx(root, source, arch, options, ptx)
    return path if _store_cached(root, path.name, cubin) else None


def check_kernel(k: PlanKernel, arch: str) -> list[Issue]:
    """``signature`` issues for one kernel (empty when it matches); CompileError if it does not compile."""
    ptx = plan_ptx(k.source, k.name, arch, k.options)
    return [Issue(i.code, i.message, i.nodes, i.buffer, k.line, i.field or f"kernels.{k.name}")
            for i in check_signature(k.name, k.entry, [(p.name, p.kind) for p in k.params], ptx)]


def programmatic_issues(plan: Plan, arch: str) -> list[Issue]:
    """A node with a programmatic edge into it must run a kernel whose PTX has ``griddepcontrol.wait``:
    without the wait the edge is a silent race."""
    issues: list[Issue] = []
    programmatic = plan.analysis.programmatic if plan.analysis else frozenset()
    into: dict[str, str] = {}
    for u, v in sorted(programmatic):
        into.setdefault(v, u)
    for n in plan.nodes:
        if n.id not in into:
            continue
        k = plan.kernels[n.op.kernel]  # type: ignore[union-attr]
        if not waits_programmatically(plan_ptx(k.source, k.name, arch, k.options), k.entry):
            issues.append(Issue(
                "signature", f"node {n.id!r} (kernel {k.name!r}, entry {k.entry!r}) launches programmatically "
                f"after {into[n.id]!r}, but the entry never executes griddepcontrol.wait: without it the "
                "programmatic edge is a race. Call it before touching produced data, or declare `launch: plain`",
                nodes=(n.id,), line=plan.spec.line_of(n.path), field="launch"))
    return issues


def check_plan(plan: Plan, arch: str = "sm_90") -> dict[str, dict]:
    """Compile and check every kernel of a plan (signatures, programmatic waits); raise SpecError
    listing every problem. Returns per kernel: entry, param count, PTX bytes."""
    check_arch(arch)  # a bad arch is the caller's mistake, not a kernel's
    prepare_ptx(plan.kernels.values(), arch)
    issues, report = [], {}
    for name, k in plan.kernels.items():
        try:
            found = check_kernel(k, arch)
        except CompileError as e:
            issues.append(Issue("compile", str(e), line=k.line, field=f"kernels.{name}"))
            continue
        issues += found
        report[name] = {"entry": k.entry, "params": len(k.params),
                        "ptx_bytes": len(plan_ptx(k.source, k.name, arch, k.options))}
    if not issues:
        issues = programmatic_issues(plan, arch)
    if issues:
        raise SpecError(issues)
    return report


# ----------------------------------------------------------------------------------------------------
# Loaded modules, shared between executables
# ----------------------------------------------------------------------------------------------------


class ModuleCache:
    """Compiled modules and function handles, shared by every executable that is given it (a pool).

    Keyed by source text and options: one module per source, however many spec kernels name it."""

    def __init__(self) -> None:
        self.modules: dict[tuple, Any] = {}
        self.functions: dict[tuple, int] = {}
        self.checked: set[tuple] = set()

    def module(self, k: PlanKernel) -> Any:
        key = (k.source, k.options)
        if key not in self.modules:
            self.modules[key] = load_module(k.source, k.name, k.options)
        return self.modules[key]

    def prepare(self, kernels: Iterable[PlanKernel]) -> int:
        """Compile side by side the modules of ``kernels`` not loaded here yet (:func:`prepare_images`), so that
        loading them one by one afterwards finds their cubins."""
        todo = [k for k in kernels if (k.source, k.options) not in self.modules]
        return prepare_images(todo) if len(todo) > 1 else 0  # one module compiles as fast when it is loaded

    def function(self, k: PlanKernel, arch: str | None) -> int:
        """The ``CUfunction`` of ``k``'s entry; with ``arch``, its signature is checked first (once)."""
        module = self.module(k)
        if arch and (k.source, k.options, k.entry, k.params) not in self.checked:
            issues = check_kernel(k, arch)
            if issues:
                raise SpecError(issues)
            self.checked.add((k.source, k.options, k.entry, k.params))
        fkey = (k.source, k.options, k.entry)
        if fkey not in self.functions:
            self.functions[fkey] = function_handle(module, k.entry, kernel=k.name)
        return self.functions[fkey]

    def clear(self) -> None:
        self.modules.clear()
        self.functions.clear()
