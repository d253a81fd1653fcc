"""dagbuild.sources.read_kernel_source: quoted includes inlined once, confined to the source's directory."""

from __future__ import annotations

import os

import pytest
from conftest import KERNELS

from dagbuild.errors import DagbuildError
from dagbuild.sources import SUFFIXES, SourceError, read_kernel_source


def _write(path, text: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_file_without_includes_comes_back_unchanged(tmp_path):
    text = '#include <cuda_fp16.h>\n// #include "not_here.cuh" in a comment\nextern "C" __global__ void k() {}\n'
    assert read_kernel_source(_write(tmp_path / "k.cu", text)) == text


def test_quoted_include_is_inlined_with_line_directives(tmp_path):
    _write(tmp_path / "a.cuh", "#pragma once\n#define A 1\n")
    src = _write(tmp_path / "k.cu", 'line1\n#include "a.cuh"\nline3\n')
    out = read_kernel_source(src)
    assert out == 'line1\n#line 1 "a.cuh"\n\n#define A 1\n#line 3 "k.cu"\nline3\n'
    assert "#pragma once" not in out  # a warning in a main file otherwise


def test_each_file_inlined_once_and_cycles_end(tmp_path):
    _write(tmp_path / "a.cuh", '#include "b.cuh"\nint a;\n')
    _write(tmp_path / "b.cuh", '#include "a.cuh"\nint b;\n')  # a cycle
    src = _write(tmp_path / "k.cu", '#include "a.cuh"\n#include "b.cuh"\n#include "a.cuh"\nint k;\n')
    out = read_kernel_source(src)
    assert out.count("int a;") == 1 and out.count("int b;") == 1 and out.count("int k;") == 1
    assert out.index("int b;") < out.index("int a;") < out.index("int k;")
    assert "already inlined" in out


def test_system_includes_stay_and_include_spellings(tmp_path):
    _write(tmp_path / "sub" / "x.h", "int x;\n")
    src = _write(tmp_path / "k.hip", '#include <hip/hip_runtime.h>\n  #  include   "sub/x.h"  // note\nint k;\n')
    out = read_kernel_source(src)
    assert out.startswith("#include <hip/hip_runtime.h>\n")
    assert "int x;" in out and '#line 1 "sub/x.h"' in out


def test_nested_include_resolves_from_the_including_file(tmp_path):
    _write(tmp_path / "port.cuh", "int port;\n")
    _write(tmp_path / "detail" / "d.cuh", '#include "../port.cuh"\nint d;\n')  # still inside the root
    src = _write(tmp_path / "k.cu", '#include "detail/d.cuh"\n')
    out = read_kernel_source(src)
    assert "int port;" in out and "int d;" in out


def test_crlf_and_no_final_newline(tmp_path):
    _write(tmp_path / "a.cuh", b"int a;")  # no newline at the end
    src = _write(tmp_path / "k.cu", b'#include "a.cuh"\r\nint k;')
    out = read_kernel_source(src)
    assert "int a;\n" in out and out.endswith("int k;\n")


@pytest.mark.parametrize("name", ["k.py", "k.txt", "k", "k.cu.bak"])
def test_top_level_suffix_refused_without_echoing_content(tmp_path, name):
    src = _write(tmp_path / name, "SECRET-CONTENT\n")
    with pytest.raises(SourceError) as exc:
        read_kernel_source(src)
    msg = str(exc.value)
    assert str(src) in msg and "SECRET" not in msg
    for suffix in SUFFIXES:
        assert suffix in msg
    assert isinstance(exc.value, DagbuildError)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        read_kernel_source(tmp_path / "nope.cu")
    (tmp_path / "dir.cu").mkdir()
    with pytest.raises(SourceError, match="directory"):
        read_kernel_source(tmp_path / "dir.cu")


def test_non_utf8_is_a_clear_error(tmp_path):
    src = _write(tmp_path / "k.cu", b"int a;\nint \xff\xfe b;\n")
    with pytest.raises(SourceError) as exc:
        read_kernel_source(src)
    assert "not UTF-8" in str(exc.value) and "line 2" in str(exc.value) and str(src) in str(exc.value)
    _write(tmp_path / "bad.cuh", b"\x80\n")
    src2 = _write(tmp_path / "k2.cu", '\n#include "bad.cuh"\n')
    with pytest.raises(SourceError, match="bad.cuh.*not UTF-8"):
        read_kernel_source(src2)


def test_include_errors_name_file_and_line(tmp_path):
    outside = _write(tmp_path / "outside.cuh", "int o;\n")
    root = tmp_path / "kernels"
    _write(root / "x.py", "print()\n")
    cases = {
        '#include "../outside.cuh"': "outside the kernel source's directory",
        f'#include "{outside}"': "absolute path",
        '#include "x.py"': "suffix '.py'",
        '#include "missing.cuh"': "file not found",
        '#include ""': "empty #include",
    }
    for i, (line, expect) in enumerate(cases.items()):
        src = _write(root / f"k{i}.cu", f"// header\n\n{line}\n")
        with pytest.raises(SourceError) as exc:
            read_kernel_source(src)
        msg = str(exc.value)
        assert expect in msg, msg
        assert f"{src}:3" in msg and exc.value.line == 3 and exc.value.path == src.resolve()


def test_symlink_escaping_the_directory_is_refused(tmp_path):
    _write(tmp_path / "secret.cuh", "int s;\n")
    root = tmp_path / "kernels"
    root.mkdir()
    os.symlink(tmp_path / "secret.cuh", root / "link.cuh")
    src = _write(root / "k.cu", '#include "link.cuh"\n')
    with pytest.raises(SourceError, match="outside"):
        read_kernel_source(src)


def test_shipped_kernels_inline_port_header():
    for name in ("llama.cu", "basic.cu"):
        out = read_kernel_source(KERNELS / name)
        assert not any(line.startswith('#include "') for line in out.splitlines())
        assert out.count("DB_GRID_WAIT()") >= 1 and out.count("#define DB_HIP 1") == 1
        assert "#include <cuda_fp16.h>" in out  # inside port.cuh's CUDA branch only
        assert "cuda_fp16.h" not in (KERNELS / name).read_text()
