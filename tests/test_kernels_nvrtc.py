"""kernels.py on a CPU: NVRTC compiles to PTX without a GPU; PTX signatures are parsed and checked."""

from __future__ import annotations

import pytest
from helpers import needs_nvrtc, ptx_or_skip

from dagbuild import kernels
from dagbuild.errors import CompileError, DagbuildError, Issue, SpecError

SOURCE = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>

extern "C" __global__ void scale_f16(const __half* x, __half* y, int n, float alpha) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __float2half(__half2float(x[i]) * alpha);
}

extern "C" __global__ void mixed(const __nv_bfloat16* x, float* y, long long n, unsigned int k,
                                 double d, unsigned long long m) {
    if (threadIdx.x == 0) y[0] = __bfloat162float(x[0]) + (float)n + k + (float)d + (float)m;
}

struct Pair { int a; float b; };
extern "C" __global__ void by_value(Pair p, float* out) { out[0] = p.a + p.b; }

extern "C" __global__ void no_params() {}
"""


@pytest.fixture(scope="module")
def ptx() -> str:
    return ptx_or_skip(SOURCE, "demo")


# -- compile ---------------------------------------------------------------------------------------


@needs_nvrtc
def test_compile_with_fp16_bf16_headers(ptx):
    assert kernels.cuda_include_dir() is not None
    assert ".target sm_90" in ptx
    for entry in ("scale_f16", "mixed", "by_value", "no_params"):
        assert f".entry {entry}(" in ptx


@needs_nvrtc
def test_compile_other_arch_and_options():
    ptx = kernels.compile_ptx(
        'extern "C" __global__ void k(float* y) { y[0] = FOO; }', "k", arch="sm_80", options=["-DFOO=2.0f"]
    )
    assert ".target sm_80" in ptx
    assert kernels.ptx_entry_params(ptx, "k") == [".u64"]


def test_bad_arch_is_a_clear_error():
    with pytest.raises(DagbuildError, match="architecture"):
        kernels._arch_option("hopper")
    assert kernels._arch_option("sm_90a") == "-arch=compute_90a"
    assert kernels._arch_option("compute_80") == "-arch=compute_80"


@needs_nvrtc
def test_compile_error_carries_log_with_bad_line():
    src = 'extern "C" __global__ void broken(float* y) {\n    y[0] = 1.0f;\n    int z = undefined_symbol;\n}\n'
    with pytest.raises(CompileError) as exc:
        kernels.compile_ptx(src, "broken_kernel")
    err = exc.value
    assert err.kernel == "broken_kernel"
    assert "broken_kernel.cu(3)" in err.log  # file and line of the error
    assert "undefined_symbol" in err.log
    assert "broken_kernel" in str(err) and "undefined_symbol" in str(err)


# -- PTX params ------------------------------------------------------------------------------------


@needs_nvrtc
def test_ptx_entry_params(ptx):
    assert kernels.ptx_entry_params(ptx, "scale_f16") == [".u64", ".u64", ".u32", ".f32"]
    assert kernels.ptx_entry_params(ptx, "mixed") == [".u64", ".u64", ".u64", ".u32", ".f64", ".u64"]
    assert kernels.ptx_entry_params(ptx, "by_value") == [".b8[8]", ".u64"]
    assert kernels.ptx_entry_params(ptx, "no_params") == []


@needs_nvrtc
def test_missing_entry_names_it_and_lists_entries(ptx):
    with pytest.raises(SpecError) as exc:
        kernels.ptx_entry_params(ptx, "nope")
    assert exc.value.codes == ["signature"]
    msg = str(exc.value)
    assert "'nope'" in msg and "'scale_f16'" in msg and "'no_params'" in msg


def test_ptx_param_forms_without_nvrtc():
    ptx = """
    .visible .entry f(
        .param .u64 .ptr .global .align 1 f_param_0,
        .param .u64 .ptr .align 8 f_param_1,
        .param .s32 f_param_2,
        .param .align 16 .b8 f_param_3[16],
        .param .b64 f_param_4 // a comment
    )
    .maxntid 128, 1, 1
    { ret; }
    .entry g() { ret; }
    """
    assert kernels.ptx_entries(ptx) == {
        "f": [".u64", ".u64", ".s32", ".b8[16]", ".b64"],
        "g": [],
    }
    issues = kernels.check_signature(
        "k", "f", [("a", "ptr"), ("b", "ptr"), ("n", "i32"), ("s", "ptr"), ("m", "u64")], ptx
    )
    assert [i.field for i in issues] == ["s"]
    assert "aggregate" in issues[0].message and ".b8[16]" in issues[0].message


# -- check_signature --------------------------------------------------------------------------------


@needs_nvrtc
def test_check_signature_matches(ptx):
    assert (
        kernels.check_signature("demo", "scale_f16", [("x", "ptr"), ("y", "ptr"), ("n", "i32"), ("a", "f32")], ptx)
        == []
    )
    assert (
        kernels.check_signature(
            "demo",
            "mixed",
            [("x", "ptr"), ("y", "ptr"), ("n", "i64"), ("k", "u32"), ("d", "f64"), ("m", "u64")],
            ptx,
        )
        == []
    )
    assert kernels.check_signature("demo", "no_params", [], ptx) == []
    # 32-bit ints of either signedness match .u32; ptr and 64-bit ints share .u64
    assert (
        kernels.check_signature("demo", "scale_f16", [("x", "u64"), ("y", "i64"), ("n", "u32"), ("a", "f32")], ptx)
        == []
    )


@needs_nvrtc
def test_check_signature_count_mismatch(ptx):
    too_few = kernels.check_signature("demo", "scale_f16", [("x", "ptr"), ("y", "ptr"), ("n", "i32")], ptx)
    assert len(too_few) == 1
    (issue,) = too_few
    assert isinstance(issue, Issue) and issue.code == "signature"
    assert "3 param(s) declared" in issue.message and "takes 4" in issue.message
    assert "#3 (.f32)" in issue.message and "'demo'" in issue.message and "'scale_f16'" in issue.message

    too_many = kernels.check_signature(
        "demo", "scale_f16", [("x", "ptr"), ("y", "ptr"), ("n", "i32"), ("a", "f32"), ("extra", "i32")], ptx
    )
    assert [i.field for i in too_many] == ["extra"]
    assert "5 param(s) declared" in too_many[0].message and "'extra'" in too_many[0].message


@needs_nvrtc
def test_check_signature_ptr_vs_f32(ptx):
    issues = kernels.check_signature("demo", "scale_f16", [("x", "f32"), ("y", "ptr"), ("n", "i32"), ("a", "ptr")], ptx)
    assert [i.field for i in issues] == ["x", "a"]
    x, a = issues
    assert x.code == "signature"
    assert "'x'" in x.message and "f32" in x.message and ".u64" in x.message
    assert "'demo'" in x.message and "'scale_f16'" in x.message
    assert "'a'" in a.message and "ptr" in a.message and ".f32" in a.message


@needs_nvrtc
def test_check_signature_i32_vs_i64(ptx):
    issues = kernels.check_signature("demo", "scale_f16", [("x", "ptr"), ("y", "ptr"), ("n", "i64"), ("a", "f32")], ptx)
    assert len(issues) == 1
    assert issues[0].field == "n" and "i64" in issues[0].message and ".u32" in issues[0].message
    issues = kernels.check_signature(
        "demo",
        "mixed",
        [("x", "ptr"), ("y", "ptr"), ("n", "i32"), ("k", "u32"), ("d", "f64"), ("m", "u64")],
        ptx,
    )
    assert [(i.field, ".u64" in i.message) for i in issues] == [("n", True)]


@needs_nvrtc
def test_check_signature_f32_vs_f64_and_unknown_kind(ptx):
    issues = kernels.check_signature(
        "demo",
        "mixed",
        [("x", "ptr"), ("y", "ptr"), ("n", "i64"), ("k", "u32"), ("d", "f32"), ("m", "f16")],
        ptx,
    )
    assert [i.field for i in issues] == ["d", "m"]
    assert ".f64" in issues[0].message
    assert "unknown kind 'f16'" in issues[1].message


@needs_nvrtc
def test_check_signature_missing_entry_is_an_issue(ptx):
    issues = kernels.check_signature("demo", "scale", [("x", "ptr")], ptx)
    assert len(issues) == 1 and issues[0].code == "signature"
    assert "'scale'" in issues[0].message and "'scale_f16'" in issues[0].message


@needs_nvrtc
def test_mangled_entry_hint():
    ptx = kernels.compile_ptx("__global__ void plain_cxx(int n) {}", "m")
    issues = kernels.check_signature("m", "plain_cxx", [("n", "i32")], ptx)
    assert len(issues) == 1 and 'extern "C"' in issues[0].message
