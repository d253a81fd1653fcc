"""ROCm without an AMD GPU: hiprtc compiles every shipped kernel for AMD GPUs and the code objects'
argument metadata is checked against the specs' declarations. hiprtc comes from Debian's ROCm packages
(`.ci/run` installs them); where it is absent the tests that need it skip, saying so."""

from __future__ import annotations

import struct

import pytest
from conftest import KERNELS, SPECS

from dagbuild import hiprtc
from dagbuild.errors import CompileError, DagbuildError, SpecError
from dagbuild.load import load_spec
from dagbuild.plan import plan
from dagbuild.sources import read_kernel_source


def _hiprtc_reason() -> str | None:
    try:
        hiprtc.hiprtc_info()
    except DagbuildError as e:
        return str(e)
    return None


REASON = _hiprtc_reason()
needs_hiprtc = pytest.mark.skipif(REASON is not None, reason=f"hiprtc unavailable: {REASON}")


def _knows(arch: str) -> bool:
    archs = hiprtc.known_archs() if REASON is None else None
    return archs is None or arch in archs


def _spec_cases() -> list[tuple[str, str | None]]:
    cases = []
    for path in sorted(SPECS.glob("*.yaml")):
        spec = load_spec(path)
        wts = ["f16", "bf16", "f32"] if "wt" in (spec.types or {}) else [None]
        cases += [(path.name, wt) for wt in wts]
    return cases


def _plan(name: str, wt: str | None):
    return plan(load_spec(SPECS / name), {"wt": wt} if wt else None)


# -- every shipped kernel compiles for AMD, with matching signatures -----------------------------------


@needs_hiprtc
@pytest.mark.parametrize(("name", "wt"), _spec_cases())
def test_every_shipped_spec_compiles_for_gfx90a(name, wt):
    p = _plan(name, wt)
    report = hiprtc.check_plan_hip(p, "gfx90a")
    assert set(report) == set(p.kernels)
    for k, info in report.items():
        assert info["entry"] == p.kernels[k].entry and info["code_object_bytes"] > 0
    if wt:  # the weight type reached the entries
        assert any(info["entry"].endswith(f"_{wt}") for info in report.values())


def test_every_weight_type_is_covered():
    assert {wt for name, wt in _spec_cases() if name == "llama_decode.yaml"} == {"f16", "bf16", "f32"}
    assert {"chain.yaml", "diamond.yaml", "fanout4.yaml", "layers.yaml"} <= {n for n, _ in _spec_cases()}


@needs_hiprtc
@pytest.mark.parametrize(("arch", "wave"), [("gfx90a", 64), ("gfx1030", 32), ("gfx1100", 32), ("gfx942", 64)])
def test_llama_kernels_wavefront_and_signatures(arch, wave):
    if not _knows(arch):
        pytest.skip(f"the installed hiprtc ({hiprtc.hiprtc_info()['version']}) does not know {arch}")
    code = hiprtc.compile_hip(read_kernel_source(KERNELS / "llama.cu"), "llama", arch)
    meta = hiprtc.code_object_metadata(code)
    assert meta["amdhsa.target"].endswith(arch) or f"--{arch}" in meta["amdhsa.target"]
    kernels = {k[".name"]: k for k in meta["amdhsa.kernels"]}
    for wt in ("f32", "f16", "bf16"):
        for base in ("embed", "rmsnorm", "gemv", "gemv_add", "gemvw", "gemvw_add"):
            assert f"{base}_{wt}" in kernels
    for k in kernels.values():
        assert k[".wavefront_size"] == wave
        assert k.get(".private_segment_fixed_size", 0) == 0, k[".name"]  # no scratch (spills, stack arrays)
    # the whole llama spec's signatures, against this arch's code object
    p = _plan("llama_decode.yaml", "bf16")
    for k in p.kernels.values():
        assert hiprtc.check_signature_hip(k.name, k.entry, [(q.name, q.kind) for q in k.params], code) == []


# -- refusals --------------------------------------------------------------------------------------------

_SPEC = """\
dagbuild: 1
name: cuda_only
dims: {{n: 256}}
kernels:
  {kernel}:
    code: |
{code}
    entry: {entry}
    params: [{params}]
buffers:
  y: {{dtype: f32, shape: [n]}}
nodes:
  - id: the_node
    kernel: {kernel}
    grid: [1]
    block: [64]
    args: {{{args}}}
"""


def _tmp_spec(tmp_path, kernel, code, entry, params, args):
    body = "\n".join("      " + line for line in code.strip().splitlines())
    path = tmp_path / "spec.yaml"
    path.write_text(_SPEC.format(kernel=kernel, code=body, entry=entry, params=params, args=args))
    return plan(load_spec(path))


@needs_hiprtc
def test_inline_ptx_is_refused_with_the_compiler_message_and_node(tmp_path):
    p = _tmp_spec(
        tmp_path, "laneid",
        'extern "C" __global__ void laneid(float* y, int n) {\n'
        '    unsigned int l;\n'
        '    asm volatile("mov.u32 %0, %%laneid;" : "=r"(l));\n'
        "    if ((int)l < n) y[l] = (float)l;\n}",
        "laneid", "f32* y, i32 n", "y: y, n: n",
    )
    with pytest.raises(SpecError) as exc:
        hiprtc.check_plan_hip(p, "gfx90a")
    (issue,) = exc.value.issues
    assert issue.code == "compile" and issue.field == "kernels.laneid" and issue.nodes == ("the_node",)
    assert "kernel 'laneid' failed to compile" in issue.message
    assert "inline asm" in issue.message and "mov.u32" in issue.message  # the compiler's own words
    assert "the_node" in issue.message and "gfx90a" in issue.message


@needs_hiprtc
def test_cuda_shuffle_without_the_header_is_refused(tmp_path):
    p = _tmp_spec(
        tmp_path, "shfl",
        'extern "C" __global__ void shfl(float* y, int n) {\n'
        "    float v = y[threadIdx.x];\n"
        "    v += __shfl_xor_sync(0xffffffff, v, 1);\n"
        "    y[threadIdx.x] = v;\n}",
        "shfl", "f32* y, i32 n", "y: y, n: n",
    )
    with pytest.raises(SpecError) as exc:
        hiprtc.check_plan_hip(p, "gfx90a")
    (issue,) = exc.value.issues
    assert issue.code == "compile" and issue.nodes == ("the_node",)
    assert "__shfl_xor_sync" in issue.message and "shfl.hip:3:" in issue.message  # file and line


@needs_hiprtc
def test_cuda_headers_are_refused():
    with pytest.raises(CompileError) as exc:
        hiprtc.compile_hip('#include <cuda_fp16.h>\nextern "C" __global__ void k() {}\n', "fp16")
    assert "cuda_fp16.h" in exc.value.log and exc.value.kernel == "fp16"


@needs_hiprtc
def test_declared_vs_actual_mismatch_is_reported(tmp_path):
    text = (SPECS / "chain.yaml").read_text().replace(
        "params: [f32 a, const f32* x, f32* y, i32 n]", "params: [f32 a, const f32* x, i64 y, i64 n]"
    ).replace("../kernels/basic.cu", str(KERNELS / "basic.cu"))
    text = text.replace("args: {a: 0.5, x: x, y: y, n: n}", "args: {a: 0.5, x: x, y: 0, n: n}")
    bad = tmp_path / "chain_bad.yaml"
    bad.write_text(text)
    p = plan(load_spec(bad))
    with pytest.raises(SpecError) as exc:
        hiprtc.check_plan_hip(p, "gfx90a")
    issues = exc.value.issues
    assert [i.code for i in issues] == ["signature", "signature"]
    assert [i.field for i in issues] == ["y", "n"]
    assert "declared i64 (code object: by_value, 8 bytes) but the code-object argument is global_buffer, 8 bytes" \
        in issues[0].message
    assert "'saxpy'" in issues[1].message and "by_value, 4 bytes" in issues[1].message
    assert issues[0].nodes and all(n.startswith("step.") for n in issues[0].nodes)


@needs_hiprtc
def test_signature_count_and_missing_entry():
    code = hiprtc.compile_hip(read_kernel_source(KERNELS / "basic.cu"), "basic")
    issues = hiprtc.check_signature_hip("k", "saxpy", [("a", "f32"), ("x", "ptr"), ("y", "ptr")], code)
    assert len(issues) == 1 and "3 param(s) declared but the code-object entry takes 4" in issues[0].message
    assert "#3 (by_value, 4 bytes)" in issues[0].message
    issues = hiprtc.check_signature_hip("k", "nope", [], code)
    assert len(issues) == 1 and "'nope' is not in the code object" in issues[0].message
    assert "'saxpy'" in issues[0].message and "'gemv_f16'" in issues[0].message


@needs_hiprtc
def test_unknown_or_bad_arch_is_refused_before_hiprtc_runs():
    # ROCm 5.2's hiprtc aborts the process on an arch it does not know: dagbuild must refuse first
    with pytest.raises(DagbuildError, match="bad AMD GPU architecture"):
        hiprtc.compile_hip('extern "C" __global__ void k() {}', "k", arch="sm_90")
    archs = hiprtc.known_archs()
    if archs is None:
        pytest.skip("the installed hiprtc's architecture list cannot be had (no libamd_comgr)")
    assert "gfx90a" in archs
    with pytest.raises(DagbuildError, match="does not know architecture 'gfx9999'"):
        hiprtc.compile_hip('extern "C" __global__ void k() {}', "k", arch="gfx9999")


@needs_hiprtc
def test_port_header_macros_are_no_ops_on_hip():
    src = read_kernel_source(KERNELS / "basic.cu") + (
        '\nextern "C" __global__ void pdl(const db_bf16* w, db_bf16* o, db_f16* h, float* y) {\n'
        "    DB_GRID_TRIGGER();\n    DB_GRID_WAIT();\n"
        "    const float v = db_block_sum(to_float(w[threadIdx.x]), y);\n"
        "    o[threadIdx.x] = from_float<db_bf16>(v);\n    h[threadIdx.x] = from_float<db_f16>(db_warp_max(v));\n"
        "    y[threadIdx.x] = db_f16_bits_to_float(0x3c00u) + db_bf16_bits_to_float(0x3f80u);\n}\n"
    )
    code = hiprtc.compile_hip(src, "pdl")
    assert [a[".value_kind"] for a in hiprtc.code_object_kernels(code)["pdl"]][:4] == ["global_buffer"] * 4


# -- a missing hiprtc ------------------------------------------------------------------------------------


def test_missing_hiprtc_says_what_to_install(monkeypatch):
    monkeypatch.delenv("DAGBUILD_HIPRTC", raising=False)
    monkeypatch.setattr(hiprtc, "_try_load", lambda cands, symbol: None)
    hiprtc._hiprtc.cache_clear()
    try:
        for call in (lambda: hiprtc.compile_hip('extern "C" __global__ void k() {}', "k"),
                     hiprtc.hiprtc_info,
                     lambda: hiprtc.check_plan_hip(_plan("chain.yaml", None))):
            with pytest.raises(DagbuildError) as exc:
                call()
            msg = str(exc.value)
            assert "hiprtc (HIP runtime compilation) not found" in msg
            assert "apt-get install libamdhip64-5 libhiprtc-builtins5" in msg
            assert "Traceback" not in msg
    finally:
        hiprtc._hiprtc.cache_clear()


def test_hiprtc_override_that_is_not_hiprtc(monkeypatch, tmp_path):
    monkeypatch.setenv("DAGBUILD_HIPRTC", str(tmp_path / "libnothing.so"))
    hiprtc._hiprtc.cache_clear()
    try:
        with pytest.raises(DagbuildError, match="libnothing.so"):
            hiprtc.hiprtc_info()
    finally:
        monkeypatch.delenv("DAGBUILD_HIPRTC")
        hiprtc._hiprtc.cache_clear()


# -- code objects without hiprtc: a hand-made ELF with an AMDGPU metadata note ----------------------------


def _mp(v) -> bytes:
    """A small MessagePack encoder for the tests (the decoder under test is dagbuild's)."""
    if v is None:
        return b"\xc0"
    if v is True or v is False:
        return b"\xc3" if v else b"\xc2"
    if isinstance(v, int):
        if 0 <= v <= 0x7F:
            return bytes([v])
        if -32 <= v < 0:
            return struct.pack("b", v)
        if 0 <= v < 2**16:
            return b"\xcd" + struct.pack(">H", v)
        if 0 <= v < 2**64:
            return b"\xcf" + struct.pack(">Q", v)
        return b"\xd3" + struct.pack(">q", v)
    if isinstance(v, float):
        return b"\xcb" + struct.pack(">d", v)
    if isinstance(v, str):
        b = v.encode()
        return (bytes([0xA0 | len(b)]) if len(b) < 32 else b"\xd9" + bytes([len(b)])) + b
    if isinstance(v, bytes):
        return b"\xc4" + bytes([len(v)]) + v
    if isinstance(v, list):
        head = bytes([0x90 | len(v)]) if len(v) < 16 else b"\xdc" + struct.pack(">H", len(v))
        return head + b"".join(_mp(x) for x in v)
    if isinstance(v, dict):
        head = bytes([0x80 | len(v)]) if len(v) < 16 else b"\xde" + struct.pack(">H", len(v))
        return head + b"".join(_mp(k) + _mp(x) for k, x in v.items())
    raise TypeError(v)


def _elf_with_note(desc: bytes, owner: bytes = b"AMDGPU", ntype: int = 32) -> bytes:
    name = owner + b"\0"
    note = struct.pack("<III", len(name), len(desc), ntype)
    note += name + b"\0" * (-len(name) % 4) + desc + b"\0" * (-len(desc) % 4)
    ehdr_size, shdr_size = 64, 64
    note_off = ehdr_size
    sh_off = note_off + len(note)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 3, 0xE0, 1, 0, 0, sh_off, 0, ehdr_size, 56, 0, shdr_size, 2, 0)
    null = b"\0" * shdr_size
    shdr = struct.pack("<IIQQQQIIQQ", 0, 7, 0, 0, note_off, len(note), 0, 0, 4, 0)
    return ehdr + note + null + shdr


def _arg(kind, size, offset=0):
    a = {".offset": offset, ".size": size, ".value_kind": kind}
    if kind == "global_buffer":
        a[".address_space"] = "global"
    return a


META = {
    "amdhsa.kernels": [
        {".name": "k", ".symbol": "k.kd", ".wavefront_size": 64, ".args": [
            _arg("global_buffer", 8), _arg("by_value", 4, 8), _arg("by_value", 8, 16), _arg("by_value", 16, 32),
            _arg("hidden_global_offset_x", 8, 48), _arg("hidden_multigrid_sync_arg", 8, 56)]},
        {".name": "_Z4minePfS_", ".symbol": "_Z4minePfS_.kd", ".args": []},
    ],
    "amdhsa.target": "amdgcn-amd-amdhsa--gfx90a",
    "amdhsa.version": [1, 2],
}


def test_code_object_metadata_from_a_hand_made_elf():
    co = _elf_with_note(_mp(META))
    assert hiprtc.code_object_metadata(co) == META
    kernels = hiprtc.code_object_kernels(co)
    assert list(kernels) == ["k", "_Z4minePfS_"] and len(kernels["k"]) == 6  # hidden args listed here


def test_check_signature_excludes_hidden_args_and_flags_aggregates():
    co = _elf_with_note(_mp(META))
    ok = [("p", "ptr"), ("n", "i32"), ("m", "u64")]
    issues = hiprtc.check_signature_hip("kern", "k", ok + [("s", "ptr")], co)
    assert [i.field for i in issues] == ["s"] and "aggregate passed by value (by_value, 16 bytes)" in issues[0].message
    issues = hiprtc.check_signature_hip("kern", "k", ok + [("s", "ptr"), ("extra", "i32")], co)
    assert "5 param(s) declared but the code-object entry takes 4" in issues[0].message and issues[0].field == "extra"
    issues = hiprtc.check_signature_hip("kern", "k", [("p", "f16"), ("n", "f32"), ("m", "f64"), ("s", "ptr")], co)
    assert "unknown kind 'f16'" in issues[0].message and len(issues) == 2  # f32/f64 match by size
    issues = hiprtc.check_signature_hip("kern", "mine", [], co)
    assert "C++-mangled" in issues[0].message and "kernel 'kern'" in issues[0].message


def test_offload_bundle_and_bad_code_objects():
    elf = _elf_with_note(_mp(META))
    ident = b"hipv4-amdgcn-amd-amdhsa--gfx90a"
    host = b"host-x86_64-unknown-linux-gnu-"
    header_len = 24 + 8 + 2 * 24 + len(ident) + len(host)
    bundle = b"__CLANG_OFFLOAD_BUNDLE__" + struct.pack("<Q", 2)
    bundle += struct.pack("<QQQ", header_len, 0, len(host)) + host
    bundle += struct.pack("<QQQ", header_len, len(elf), len(ident)) + ident
    assert hiprtc.code_object_kernels(bundle + elf)["k"][0][".value_kind"] == "global_buffer"
    with pytest.raises(DagbuildError, match="not an ELF"):
        hiprtc.code_object_kernels(b"PTX text")
    with pytest.raises(DagbuildError, match="no NT_AMDGPU_METADATA"):
        hiprtc.code_object_kernels(_elf_with_note(b"x", owner=b"GNU", ntype=1))
    with pytest.raises(DagbuildError, match="truncated"):
        hiprtc.code_object_kernels(_elf_with_note(_mp(META))[:70])


@pytest.mark.parametrize("value", [
    0, 127, -1, -32, 300, 70000, 2**40, -(2**40), 1.5, "", "x" * 40, b"\x00\x01", [], [1, [2, "a"]],
    list(range(20)), {"a": {"b": [None, True, False]}}, {str(i): i for i in range(20)},
])
def test_msgpack_roundtrip(value):
    assert hiprtc.msgpack_unpack(_mp(value)) == value


def test_msgpack_other_forms_and_errors():
    assert hiprtc.msgpack_unpack(b"\xca" + struct.pack(">f", 0.5)) == 0.5
    assert hiprtc.msgpack_unpack(b"\xd0\xff") == -1 and hiprtc.msgpack_unpack(b"\xcc\xff") == 255
    assert hiprtc.msgpack_unpack(b"\xdb" + struct.pack(">I", 2) + b"hi") == "hi"
    assert hiprtc.msgpack_unpack(b"\xdd" + struct.pack(">I", 1) + b"\x01") == [1]
    with pytest.raises(DagbuildError, match="truncated"):
        hiprtc.msgpack_unpack(b"\x92\x01")
    with pytest.raises(DagbuildError, match="trailing"):
        hiprtc.msgpack_unpack(b"\x01\x02")
    with pytest.raises(DagbuildError, match="unsupported type byte 0xd4"):
        hiprtc.msgpack_unpack(b"\xd4\x01\x02")


def test_bad_arch_names_need_no_hiprtc(monkeypatch):
    monkeypatch.setattr(hiprtc, "known_archs", lambda: None)
    for bad in ("sm_90", "gfx", "GFX90A", "gfx90a;rm"):
        with pytest.raises(DagbuildError, match="bad AMD GPU architecture"):
            hiprtc._check_arch(bad)
    assert hiprtc._check_arch("gfx90a:xnack-") == "gfx90a:xnack-"
    assert hiprtc._check_arch("gfx942") == "gfx942"  # without a list, hiprtc decides
