"""Compile kernels for AMD GPUs with hiprtc (no GPU needed) and check declared params against the code object.

The HIP counterpart of :mod:`dagbuild.kernels`' NVRTC path, through ctypes (no Python package needed):

* :func:`compile_hip` runs hiprtc and returns the AMDGPU code object (an ELF);
* :func:`code_object_kernels` reads each kernel's argument list from the code object's
  ``NT_AMDGPU_METADATA`` note (MessagePack, decoded here by :func:`msgpack_unpack`);
* :func:`check_signature_hip` compares a spec's declaration with it, like
  :func:`dagbuild.kernels.check_signature` does with PTX;
* :func:`check_plan_hip` does that for every kernel of a plan, like :func:`dagbuild.compile.check_plan`.

hiprtc is looked for as Debian/Ubuntu install it (``libamdhip64.so.5`` holds it in ROCm 5.x,
``libhiprtc.so.6``/``.7`` from ROCm 6 on), then under ``$ROCM_PATH``/``/opt/rocm``; ``DAGBUILD_HIPRTC``
names a library file to use instead. The architectures it knows come from the code-object manager
(``libamd_comgr``) that it uses: ROCm 5.2's hiprtc aborts the whole process on an architecture it does not
know, so :func:`compile_hip` refuses those first.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import struct
from collections.abc import Sequence
from typing import Any

from dagbuild.errors import CompileError, DagbuildError, Issue, SpecError
from dagbuild.kernels import compare_params, missing_entry_message

__all__ = [
    "HIPRTC_INSTALL_HINT",
    "KINDS_HIP",
    "check_plan_hip",
    "check_signature_hip",
    "code_object_kernels",
    "code_object_metadata",
    "compile_hip",
    "hiprtc_info",
    "known_archs",
    "msgpack_unpack",
]

HIPRTC_INSTALL_HINT = (
    "apt-get install libamdhip64-5 libhiprtc-builtins5 (Debian 12/13, Ubuntu: ROCm 5.x), or "
    "libhiprtc6 libhiprtc-builtins6 (Debian sid: ROCm 6.x), or install ROCm under /opt/rocm"
)

#: For each declarable kind, the code-object argument it must be: (value kind, size in bytes).
#: The metadata does not tell integers from floats of the same size, so i32/u32/f32 all match
#: ``by_value`` of 4 bytes (PTX tells f32 from i32; the NVRTC check catches that one).
KINDS_HIP: dict[str, tuple[str, int]] = {
    "ptr": ("global_buffer", 8),
    "i32": ("by_value", 4),
    "u32": ("by_value", 4),
    "i64": ("by_value", 8),
    "u64": ("by_value", 8),
    "f32": ("by_value", 4),
    "f64": ("by_value", 8),
}

#: An AMD GPU architecture name, with optional target features: ``gfx90a``, ``gfx90a:xnack-``.
ARCH_NAME = re.compile(r"^gfx[0-9a-f]+(?::[a-z0-9_]+[+-])*$")

# ----------------------------------------------------------------------------------------------------
# Finding the libraries
# ----------------------------------------------------------------------------------------------------

_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")
_HIPRTC_NAMES = ("libhiprtc.so.7", "libhiprtc.so.6", "libhiprtc.so", "libamdhip64.so.5", "libamdhip64.so")
_COMGR_NAMES = ("libamd_comgr.so.3", "libamd_comgr.so.2", "libamd_comgr.so")


def _rocm_dirs() -> list[str]:
    dirs = []
    for base in (os.environ.get("ROCM_PATH"), "/opt/rocm"):
        if base:
            dirs += [os.path.join(base, "lib"), os.path.join(base, "lib64")]
    return dirs


def _candidates(names: Sequence[str]) -> list[str]:
    """Library names for the dynamic loader first, then full paths in ROCm's directories."""
    out = list(names)
    for d in _rocm_dirs():
        out += [os.path.join(d, n) for n in names]
    return out


def _try_load(candidates: Sequence[str], symbol: str) -> tuple[ctypes.CDLL, str] | None:
    for cand in candidates:
        try:
            lib = ctypes.CDLL(cand)
        except OSError:
            continue
        if hasattr(lib, symbol):
            return lib, cand
    return None


def _library_path(lib: ctypes.CDLL, symbol: str) -> str:
    """The file a loaded library came from (dladdr of one of its symbols)."""

    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    try:
        libdl = ctypes.CDLL(None)
        info = DlInfo()
        addr = ctypes.cast(getattr(lib, symbol), ctypes.c_void_p)
        if libdl.dladdr(addr, ctypes.byref(info)) and info.dli_fname:
            return os.path.realpath(info.dli_fname.decode())
    except Exception:  # pragma: no cover - dladdr is in every glibc
        pass
    return lib._name


def _load_hiprtc() -> tuple[ctypes.CDLL, str]:
    """(library, its file). Raises DagbuildError saying what to install when hiprtc is not found."""
    override = os.environ.get("DAGBUILD_HIPRTC")
    cands = [override] if override else _candidates(_HIPRTC_NAMES)
    found = _try_load(cands, "hiprtcCreateProgram")
    if found is None:
        tried = ", ".join(cands if override else _HIPRTC_NAMES)
        raise DagbuildError(
            f"hiprtc (HIP runtime compilation) not found (tried {tried}"
            f"{'' if override else ', also under $ROCM_PATH and /opt/rocm'}); "
            f"install it with: {HIPRTC_INSTALL_HINT}"
        )
    lib, _name = found
    c_char_pp = ctypes.POINTER(ctypes.c_char_p)
    lib.hiprtcCreateProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_char_p,
                                        ctypes.c_int, c_char_pp, c_char_pp]
    lib.hiprtcCompileProgram.argtypes = [ctypes.c_void_p, ctypes.c_int, c_char_pp]
    lib.hiprtcDestroyProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    lib.hiprtcGetProgramLogSize.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
    lib.hiprtcGetProgramLog.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.hiprtcGetCodeSize.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
    lib.hiprtcGetCode.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.hiprtcGetErrorString.argtypes = [ctypes.c_int]
    lib.hiprtcGetErrorString.restype = ctypes.c_char_p
    return lib, _library_path(lib, "hiprtcCreateProgram")


@functools.cache
def _hiprtc() -> tuple[ctypes.CDLL, str]:
    return _load_hiprtc()


def _hiprtc_lib() -> ctypes.CDLL:
    try:
        return _hiprtc()[0]
    except DagbuildError:
        _hiprtc.cache_clear()  # found later (installed meanwhile, or a test's stand-in removed)
        raise


@functools.cache
def _comgr_isas() -> tuple[str, ...] | None:
    """Every ISA name the code-object manager knows (``amdgcn-amd-amdhsa--gfx90a...``), or None."""
    found = _try_load(_candidates(_COMGR_NAMES), "amd_comgr_get_isa_count")
    if found is None:
        return None
    lib = found[0]
    count = ctypes.c_size_t()
    if lib.amd_comgr_get_isa_count(ctypes.byref(count)) != 0:
        return None
    lib.amd_comgr_get_isa_name.argtypes = [ctypes.c_size_t, ctypes.POINTER(ctypes.c_char_p)]
    names = []
    for i in range(count.value):
        name = ctypes.c_char_p()
        if lib.amd_comgr_get_isa_name(i, ctypes.byref(name)) == 0 and name.value:
            names.append(name.value.decode())
    return tuple(names)


def known_archs() -> list[str] | None:
    """The ``gfx`` architectures the installed hiprtc can compile for (from its code-object manager,
    target features dropped, in its order), or None when that list cannot be had."""
    isas = _comgr_isas()
    if isas is None:
        return None
    out: list[str] = []
    for isa in isas:
        arch = isa.rsplit("-", 1)[-1].split(":", 1)[0]
        if arch.startswith("gfx") and arch not in out:
            out.append(arch)
    return out


def hiprtc_info() -> dict[str, Any]:
    """``{"library": file, "version": "5.2.21153" or None, "archs": known_archs()}``; DagbuildError
    (what to install) when hiprtc is missing."""
    _hiprtc_lib()
    path = _hiprtc()[1]
    m = re.search(r"\.so\.(\d+(?:\.\d+)+)$", path)
    return {"library": path, "version": m.group(1) if m else None, "archs": known_archs()}


def _check_arch(arch: str) -> str:
    arch = arch.strip()
    if not ARCH_NAME.match(arch):
        raise DagbuildError(f"bad AMD GPU architecture {arch!r}: expected e.g. 'gfx90a', 'gfx942' or 'gfx1100'")
    archs = known_archs()
    if archs is not None and arch.split(":", 1)[0] not in archs:
        info = hiprtc_info()
        ver = f" (ROCm {info['version']})" if info["version"] else ""
        raise DagbuildError(
            f"the installed hiprtc{ver} does not know architecture {arch!r}; it knows: {', '.join(archs)}"
        )
    return arch


# ----------------------------------------------------------------------------------------------------
# Compiling
# ----------------------------------------------------------------------------------------------------


def _status(lib: ctypes.CDLL, err: int) -> str:
    try:
        s = lib.hiprtcGetErrorString(err)
        return s.decode() if s else f"hiprtcResult {err}"
    except Exception:  # pragma: no cover
        return f"hiprtcResult {err}"


def _log(lib: ctypes.CDLL, prog: ctypes.c_void_p) -> str:
    size = ctypes.c_size_t()
    if lib.hiprtcGetProgramLogSize(prog, ctypes.byref(size)) != 0 or size.value <= 1:
        return ""
    buf = ctypes.create_string_buffer(size.value + 1)
    if lib.hiprtcGetProgramLog(prog, buf) != 0:
        return ""
    return buf.value.decode("utf-8", errors="replace")


def compile_hip(source: str, kernel: str, arch: str = "gfx90a", options: Sequence[str] = ()) -> bytes:
    """Compile HIP C++ ``source`` for AMD GPU ``arch`` with hiprtc (no GPU needed); returns the code object.

    ``kernel`` names the spec's kernel in messages; the program is named ``<kernel>.hip`` and the log's
    locations read ``<kernel>.hip:LINE:COL`` (or the inlined header's name). Options:
    ``--offload-arch=<arch>``, ``-std=c++17``, then ``options``. Raises CompileError(kernel, log) with
    hiprtc's log on failure; DagbuildError for a malformed arch, one the installed hiprtc does not know,
    or a missing hiprtc (saying what to install)."""
    lib = _hiprtc_lib()
    arch = _check_arch(arch)
    opts = [f"--offload-arch={arch}", "-std=c++17", *options]
    name = f"{kernel}.hip"
    prog = ctypes.c_void_p()
    err = lib.hiprtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None)
    if err != 0:
        raise CompileError(kernel, f"hiprtcCreateProgram failed: {_status(lib, err)}")
    try:
        copts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        with _CapturedStderr() as cap:  # LLVM prints some errors (inline asm) to stderr, not to the log
            err = lib.hiprtcCompileProgram(prog, len(opts), copts)
        log = _clean_log(_log(lib, prog), name)
        if cap.text.strip():
            log = f"{log.rstrip()}\n{cap.text.strip()}" if log.strip() else cap.text
        if err != 0:
            head = f"{_status(lib, err)} (options: {' '.join(opts)})"
            raise CompileError(kernel, f"{log.rstrip()}\n{head}" if log.strip() else head)
        size = ctypes.c_size_t()
        err = lib.hiprtcGetCodeSize(prog, ctypes.byref(size))
        if err != 0 or size.value == 0:
            raise CompileError(kernel, f"hiprtcGetCodeSize failed: {_status(lib, err)}")
        buf = ctypes.create_string_buffer(size.value)
        err = lib.hiprtcGetCode(prog, buf)
        if err != 0:
            raise CompileError(kernel, f"hiprtcGetCode failed: {_status(lib, err)}")
        return buf.raw
    finally:
        lib.hiprtcDestroyProgram(ctypes.byref(prog))


class _CapturedStderr:
    """Captures what native code writes to file descriptor 2 while the block runs (``.text``)."""

    def __enter__(self) -> _CapturedStderr:
        import sys
        import tempfile

        self.text = ""
        try:
            sys.stderr.flush()
        except Exception:  # pragma: no cover
            pass
        try:
            self._tmp = tempfile.TemporaryFile()
            self._saved = os.dup(2)
            os.dup2(self._tmp.fileno(), 2)
        except OSError:  # pragma: no cover - no fd 2: nothing to capture
            self._saved = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is None:  # pragma: no cover
            return
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._tmp.seek(0)
        self.text = self._tmp.read().decode("utf-8", errors="replace")
        self._tmp.close()


# comgr compiles a temporary file: /tmp/comgr-XXXXXX/input/CompileSource (ROCm 5) or the program name.
_TMP_SOURCE_RE = re.compile(r"(?:/[^\s:]*/)?input/CompileSource\b|\bCompileSource\b")


def _clean_log(log: str, name: str) -> str:
    return _TMP_SOURCE_RE.sub(name, log)


# ----------------------------------------------------------------------------------------------------
# Code objects: ELF notes and MessagePack
# ----------------------------------------------------------------------------------------------------

NT_AMDGPU_METADATA = 32
_BUNDLE_MAGIC = b"__CLANG_OFFLOAD_BUNDLE__"


def _elf_image(code_object: bytes) -> bytes:
    """The AMDGPU ELF inside ``code_object`` (itself, or the amdgcn entry of a clang offload bundle)."""
    data = bytes(code_object)
    if data.startswith(_BUNDLE_MAGIC):
        (n,) = struct.unpack_from("<Q", data, len(_BUNDLE_MAGIC))
        pos = len(_BUNDLE_MAGIC) + 8
        for _ in range(n):
            off, size, idlen = struct.unpack_from("<QQQ", data, pos)
            ident = data[pos + 24: pos + 24 + idlen].decode(errors="replace")
            pos += 24 + idlen
            if "amdgcn" in ident and size:
                return data[off: off + size]
        raise DagbuildError("the offload bundle holds no amdgcn code object")
    if data.startswith(b"CCOB"):
        raise DagbuildError("the code object is a compressed offload bundle, which dagbuild cannot read")
    return data


def _notes(elf: bytes) -> list[tuple[str, int, bytes]]:
    """(owner, type, descriptor) of every note in the ELF's SHT_NOTE sections (PT_NOTE if none)."""
    if elf[:4] != b"\x7fELF":
        raise DagbuildError("not an ELF code object (no \\x7fELF magic)")
    if elf[4] != 2 or elf[5] != 1:
        raise DagbuildError("not a 64-bit little-endian ELF code object")
    try:
        e_phoff, e_shoff = struct.unpack_from("<QQ", elf, 0x20)
        e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHHH", elf, 0x36)
        areas = []
        for i in range(e_shnum):
            sh = e_shoff + i * e_shentsize
            (sh_type,) = struct.unpack_from("<I", elf, sh + 4)
            sh_offset, sh_size = struct.unpack_from("<QQ", elf, sh + 0x18)
            if sh_type == 7:  # SHT_NOTE
                areas.append((sh_offset, sh_size))
        if not areas:
            for i in range(e_phnum):
                ph = e_phoff + i * e_phentsize
                (p_type,) = struct.unpack_from("<I", elf, ph)
                p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from("<QQQQ", elf, ph + 8)
                if p_type == 4:  # PT_NOTE
                    areas.append((p_offset, p_filesz))
        notes = []
        for off, size in areas:
            pos, end = off, off + size
            while pos + 12 <= end:
                namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
                pos += 12
                owner = elf[pos: pos + namesz].rstrip(b"\0").decode(errors="replace")
                pos += (namesz + 3) & ~3
                desc = elf[pos: pos + descsz]
                pos += (descsz + 3) & ~3
                notes.append((owner, ntype, desc))
        return notes
    except struct.error as e:
        raise DagbuildError(f"truncated ELF code object ({e})") from None


def code_object_metadata(code_object: bytes) -> dict:
    """The decoded ``NT_AMDGPU_METADATA`` note of a code object (code object v3+): ``amdhsa.version``,
    ``amdhsa.target``, ``amdhsa.kernels`` (each with ``.name``, ``.symbol``, ``.args``,
    ``.wavefront_size``, ...)."""
    for owner, ntype, desc in _notes(_elf_image(code_object)):
        if owner == "AMDGPU" and ntype == NT_AMDGPU_METADATA:
            meta = msgpack_unpack(desc)
            if not isinstance(meta, dict):
                raise DagbuildError("the AMDGPU metadata note is not a map")
            return meta
    raise DagbuildError("the code object has no NT_AMDGPU_METADATA note (code object v3 or later expected)")


def code_object_kernels(code_object: bytes) -> dict[str, list[dict]]:
    """Each kernel of a code object, by name, with its argument metadata in order: dicts with
    ``.size``, ``.offset``, ``.value_kind`` (``global_buffer``, ``by_value``, ``hidden_*``, ...) and, for
    pointers, ``.address_space``. Hidden arguments (``.value_kind`` ``hidden_*``) are included."""
    meta = code_object_metadata(code_object)
    return {k.get(".name", k.get(".symbol", "?")): list(k.get(".args", [])) for k in meta.get("amdhsa.kernels", [])}


# -- MessagePack (the subset the AMDGPU metadata uses, and the rest of the format but ext types) --------


def msgpack_unpack(data: bytes) -> Any:
    """Decode one MessagePack value (maps, arrays, str, bin, ints, floats, nil, bools; not ext types)."""
    value, pos = _mp(bytes(data), 0)
    if pos != len(data):
        raise DagbuildError(f"msgpack: {len(data) - pos} trailing byte(s) after the value")
    return value


def _mp(d: bytes, p: int) -> tuple[Any, int]:
    try:
        b = d[p]
    except IndexError:
        raise DagbuildError("msgpack: truncated data") from None
    p += 1
    if b <= 0x7F:
        return b, p
    if b >= 0xE0:
        return b - 0x100, p
    if 0x80 <= b <= 0x8F:
        return _mp_map(d, p, b & 0x0F)
    if 0x90 <= b <= 0x9F:
        return _mp_array(d, p, b & 0x0F)
    if 0xA0 <= b <= 0xBF:
        return _mp_str(d, p, b & 0x1F)
    fixed = {
        0xCC: "B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
        0xD0: "b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q",
        0xCA: ">f", 0xCB: ">d",
    }
    if b in fixed:
        fmt = fixed[b]
        n = struct.calcsize(fmt)
        _need(d, p, n)
        return struct.unpack_from(fmt, d, p)[0], p + n
    if b == 0xC0:
        return None, p
    if b == 0xC2:
        return False, p
    if b == 0xC3:
        return True, p
    lengths = {0xD9: (">B", "str"), 0xDA: (">H", "str"), 0xDB: (">I", "str"),
               0xC4: (">B", "bin"), 0xC5: (">H", "bin"), 0xC6: (">I", "bin"),
               0xDC: (">H", "array"), 0xDD: (">I", "array"), 0xDE: (">H", "map"), 0xDF: (">I", "map")}
    if b in lengths:
        fmt, what = lengths[b]
        n = struct.calcsize(fmt)
        _need(d, p, n)
        (length,) = struct.unpack_from(fmt, d, p)
        p += n
        if what == "str":
            return _mp_str(d, p, length)
        if what == "bin":
            _need(d, p, length)
            return d[p: p + length], p + length
        if what == "array":
            return _mp_array(d, p, length)
        return _mp_map(d, p, length)
    raise DagbuildError(f"msgpack: unsupported type byte {b:#04x} at offset {p - 1}")


def _need(d: bytes, p: int, n: int) -> None:
    if p + n > len(d):
        raise DagbuildError("msgpack: truncated data")


def _mp_str(d: bytes, p: int, n: int) -> tuple[str, int]:
    _need(d, p, n)
    return d[p: p + n].decode("utf-8", errors="replace"), p + n


def _mp_array(d: bytes, p: int, n: int) -> tuple[list, int]:
    out = []
    for _ in range(n):
        v, p = _mp(d, p)
        out.append(v)
    return out, p


def _mp_map(d: bytes, p: int, n: int) -> tuple[dict, int]:
    out = {}
    for _ in range(n):
        k, p = _mp(d, p)
        v, p = _mp(d, p)
        out[k if not isinstance(k, list) else tuple(k)] = v
    return out, p


# ----------------------------------------------------------------------------------------------------
# Signatures
# ----------------------------------------------------------------------------------------------------


def _visible_args(args: list[dict]) -> list[dict]:
    return [a for a in args if not str(a.get(".value_kind", "")).startswith("hidden_")]


def _arg_text(a: dict) -> str:
    return f"{a.get('.value_kind', '?')}, {a.get('.size', '?')} bytes"


def check_signature_hip(kernel: str, entry: str, params: Sequence[tuple[str, str]],
                        code_object: bytes) -> list[Issue]:
    """Compare a kernel's declared params, ``(name, kind)`` pairs with kind in :data:`KINDS_HIP`, with
    the arguments of ``entry`` in an AMDGPU code object: count (hidden arguments excluded), value kind
    (``ptr`` ↔ ``global_buffer``, scalars ↔ ``by_value``) and size (4 bytes for i32/u32/f32, 8 for the
    rest). Returns one Issue (code ``signature``, ``field`` = the param's name) per problem, worded as
    :func:`dagbuild.kernels.check_signature` words them; empty when they agree."""
    kernels = code_object_kernels(code_object)
    if entry not in kernels:
        return [Issue(code="signature", message=missing_entry_message(entry, list(kernels), kernel, "the code object"))]
    return compare_params(kernel, entry, params, _visible_args(kernels[entry]), ("code-object", "argument"),
                          _arg_text, _hip_arg_problem)


def _hip_arg_problem(kind: str, arg: dict) -> str | None:
    vkind, size = arg.get(".value_kind"), arg.get(".size")
    if kind not in KINDS_HIP:
        return (f"has unknown kind {kind!r}; expected one of {', '.join(KINDS_HIP)} (code-object argument: "
                f"{_arg_text(arg)})")
    want_kind, want_size = KINDS_HIP[kind]
    if vkind == "by_value" and size not in (4, 8):
        return (f"is declared {kind} but the code-object argument is an aggregate passed by value "
                f"({_arg_text(arg)}), which dagbuild does not support; pass a pointer or scalars instead")
    if vkind != want_kind or size != want_size:
        return (f"is declared {kind} (code object: {want_kind}, {want_size} bytes) but the code-object argument "
                f"is {_arg_text(arg)}")
    return None


# ----------------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------------


_CODE_OBJECTS: dict[tuple[str, str, tuple[str, ...]], tuple[str, bytes | CompileError]] = {}


def _code_object(source: str, kernel: str, arch: str, options: tuple[str, ...]) -> bytes:
    """compile_hip, once per (source, arch, options) in this process: the kernels of one source file
    share one compile (and one failure, re-raised under each kernel's name)."""
    key = (source, arch, options)
    if key not in _CODE_OBJECTS:
        if len(_CODE_OBJECTS) >= 64:
            _CODE_OBJECTS.pop(next(iter(_CODE_OBJECTS)))
        try:
            _CODE_OBJECTS[key] = (kernel, compile_hip(source, kernel, arch=arch, options=options))
        except CompileError as e:
            _CODE_OBJECTS[key] = (kernel, e)
    first, result = _CODE_OBJECTS[key]
    if isinstance(result, CompileError):
        raise CompileError(kernel, result.log.replace(f"{first}.hip", f"{kernel}.hip"))
    return result


def check_plan_hip(plan: Any, arch: str = "gfx90a") -> dict[str, dict]:
    """Compile every kernel of a plan with hiprtc for ``arch`` and check its declared params against the
    code object. Returns ``{kernel: {"entry", "params", "code_object_bytes"}}``; raises SpecError listing
    every issue: ``signature`` ones, and ``compile`` ones (the compiler's log, ``field`` =
    ``kernels.<name>``, ``nodes`` = the nodes that launch it). A missing hiprtc or an unknown arch is a
    DagbuildError before anything is compiled."""
    _hiprtc_lib()
    _check_arch(arch)
    issues: list[Issue] = []
    report: dict[str, dict] = {}
    users: dict[str, list[str]] = {}
    for node in plan.nodes:
        kernel = getattr(node.op, "kernel", None)
        if kernel is not None:
            users.setdefault(kernel, []).append(node.id)
    for name, k in plan.kernels.items():
        try:
            code = _code_object(k.source, k.name, arch, tuple(k.options))  # includes inlined by the binder
        except CompileError as e:
            nodes = users.get(name, [])
            used = f" (launched by node(s) {', '.join(repr(n) for n in nodes[:5])}" \
                   f"{', ...' if len(nodes) > 5 else ''})" if nodes else ""
            issues.append(Issue("compile", f"{e} [for {arch}{used}]", nodes=tuple(nodes), line=k.line,
                                field=f"kernels.{name}"))
            continue
        found = check_signature_hip(k.name, k.entry, [(p.name, p.kind) for p in k.params], code)
        issues += [Issue(i.code, i.message, tuple(users.get(name, [])), i.buffer, k.line, i.field) for i in found]
        report[name] = {"entry": k.entry, "params": len(k.params), "code_object_bytes": len(code)}
    if issues:
        raise SpecError(issues)
    return report
