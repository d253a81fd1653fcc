"""The compiled-kernel cache on the CPU: one NVRTC compile gives the cubin a GPU loads and the PTX the checks
read, both kept on disk under one name that a machine with another NVRTC minor release finds too; load_module
takes the cached cubin and falls back to CuPy's compile where the driver refuses it (a stand-in CuPy here)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from dagbuild import kernels

pytest.importorskip("cuda.bindings.nvrtc")
try:
    kernels.nvrtc_version()
except Exception as e:  # noqa: BLE001 - any reason NVRTC cannot load is a reason to skip
    pytest.skip(f"NVRTC is not loadable: {e}", allow_module_level=True)

SOURCE = 'extern "C" __global__ void twice(const float* x, float* y, int n) {\n' \
         '    int i = blockIdx.x * blockDim.x + threadIdx.x;\n    if (i < n) y[i] = 2.0f * x[i];\n}\n'


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGBUILD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_PTX_CACHE", {})
    return tmp_path


def no_compile(*_a, **_k):
    raise AssertionError("compiled although the cache holds it")


def test_one_compile_gives_the_cubin_and_the_ptx_of_the_checks():
    ptx, cubin = kernels.compile_cubin(SOURCE, "twice", "sm_90")
    assert cubin[:4] == b"\x7fELF"
    assert kernels.ptx_entry_params(ptx, "twice") == kernels.ptx_entry_params(
        kernels.compile_ptx(SOURCE, "twice", "sm_90"), "twice")


def test_module_image_is_compiled_once_and_its_ptx_serves_the_signature_check(cache, monkeypatch):
    image = kernels.module_image(SOURCE, "twice", "sm_90", ("-DUNUSED=1",))
    assert image is not None and image.parent == cache and image.read_bytes()[:4] == b"\x7fELF"
    assert sorted(p.suffixes[-1] for p in cache.iterdir()) == [".cubin", ".gz"]
    monkeypatch.setattr(kernels, "compile_cubin", no_compile)
    monkeypatch.setattr(kernels, "compile_ptx", no_compile)
    assert kernels.module_image(SOURCE, "twice", "sm_90", ("-DUNUSED=1",)) == image
    monkeypatch.setattr(kernels, "_PTX_CACHE", {})  # a fresh process: the PTX comes from the disk
    ptx = kernels.plan_ptx(SOURCE, "twice", "sm_90", ("-DUNUSED=1",))
    assert len(kernels.ptx_entry_params(ptx, "twice")) == 3
    with pytest.raises(AssertionError, match="compiled although"):  # other options: another module
        kernels.module_image(SOURCE, "twice", "sm_90", ())


def test_the_cache_name_holds_nvrtc_major_not_minor(monkeypatch):
    names = {}
    for version in ((13, 0), (13, 5), (12, 9)):
        monkeypatch.setattr(kernels, "nvrtc_version", lambda v=version: v)
        names[version] = kernels._digest(SOURCE, "sm_90", ())
    assert names[(13, 0)] == names[(13, 5)] != names[(12, 9)]
    assert kernels._digest(SOURCE, "sm_90", ()) != kernels._digest(SOURCE, "sm_80", ())
    assert kernels._digest(SOURCE, "sm_90", ()) != kernels._digest(SOURCE + " ", "sm_90", ())


def test_without_a_cache_directory_nothing_is_written(monkeypatch):
    monkeypatch.setenv("DAGBUILD_CACHE_DIR", "")
    assert kernels.module_image(SOURCE, "twice", "sm_90") is None


def fake_cupy(refuse_path: bool) -> tuple[types.ModuleType, types.ModuleType]:
    """A stand-in for the CuPy that load_module uses: RawModule(path=) or (code=), Device().compute_capability."""
    class DriverError(Exception):
        pass

    class CompileException(Exception):
        pass

    class RawModule:
        made: list[tuple[str, object]] = []

        def __init__(self, *, code=None, path=None, options=()):
            self.how = ("path", path) if path is not None else ("code", options)
            RawModule.made.append(self.how)

        def compile(self):
            if self.how[0] == "path" and refuse_path:
                raise DriverError("CUDA_ERROR_UNSUPPORTED_PTX_VERSION")

    cupy = types.ModuleType("cupy")
    cupy.RawModule = RawModule
    cupy.cuda = types.SimpleNamespace(Device=lambda: types.SimpleNamespace(compute_capability="90"),
                                      driver=types.SimpleNamespace(CUDADriverError=DriverError))
    compiler = types.ModuleType("cupy.cuda.compiler")
    compiler.CompileException = CompileException
    return cupy, compiler


@pytest.mark.parametrize("refuse", [False, True], ids=["cubin", "driver-refuses"])
def test_load_module_loads_the_cached_cubin_else_compiles_with_cupy(cache, monkeypatch, refuse, caplog):
    cupy, compiler = fake_cupy(refuse)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cupy.cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.compiler", compiler)
    module = kernels.load_module(SOURCE, "twice", ("-DX=1",))
    made = cupy.RawModule.made
    assert made[0][0] == "path" and Path(made[0][1]).parent == cache
    if refuse:
        assert made[1] == ("code", ("--std=c++17", "-DX=1")) and module.how == made[1]
        assert "refused the cached cubin" in caplog.text
    else:
        assert len(made) == 1 and module.how == made[0]


def test_load_module_compiles_with_cupy_without_a_cache(monkeypatch):
    cupy, compiler = fake_cupy(False)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cupy.cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.compiler", compiler)
    monkeypatch.setenv("DAGBUILD_CACHE_DIR", "")
    kernels.load_module(SOURCE, "twice")
    assert cupy.RawModule.made == [("code", ("--std=c++17",))]


def test_prebuild_names_every_module_of_the_shipped_specs():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        import prebuild
    finally:
        sys.path.pop(0)
    mods = prebuild.modules()
    sources = [src for src, _ in mods]
    assert len(mods) == len(set(mods)) >= 8
    assert any("decode_layer_impl" in s for s in sources)  # the layer kernel
    assert any(opts == ("-DMMA_CLUSTER=8",) for _, opts in mods)  # the batched module as the spec builds it


def test_prebuild_names_what_blocktrace_compiles_for_each_knob():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        import prebuild
    finally:
        sys.path.pop(0)
    mods = prebuild.traced_modules({"layer_kernel": 2}, ["LY_DIAG=1", "LY_DIAG=1,LY_PROXY_FENCE=0"])
    options = sorted(opts for _, opts in mods)
    # the step's three modules (llama_fused.cu for embed and argmax, and its batch-1 form for the LM head, with
    # -DFW_ONE_ROW=1 -DDB_EVICT_FIRST=1; llama_layer.cu for the stack, whose spec kernel passes -DLY_GROUPS=4
    # -DLY_TABLE=112), each with the trace alone, with the knob, and with both knobs of a comma-joined variant
    trace, diag, both = ("-DDB_BLOCKTRACE",), ("-DLY_DIAG=1",), ("-DLY_DIAG=1", "-DLY_PROXY_FENCE=0")
    stack = ("-DLY_GROUPS=4", "-DLY_TABLE=112")
    one = ("-DFW_ONE_ROW=1", "-DDB_EVICT_FIRST=1")
    assert options == sorted([trace, trace + diag, trace + both, one + trace, one + trace + diag, one + trace + both,
                              stack + trace, stack + trace + diag, stack + trace + both])


def test_compile_error_survives_a_worker_process():
    """tools/prebuild.py compiles in worker processes: a kernel's CompileError must reach the parent whole (it
    is pickled there), not as a broken pool."""
    import pickle

    from dagbuild.errors import CompileError

    e = pickle.loads(pickle.dumps(CompileError("gemv_res_mma", "llama_batched.cu(12): error: x is undefined")))
    assert isinstance(e, CompileError) and e.kernel == "gemv_res_mma" and "x is undefined" in e.log
    assert str(e).startswith("kernel 'gemv_res_mma' failed to compile:")


def _kernel(name: str, source: str = SOURCE, options: tuple[str, ...] = ()):
    from dagbuild.ir import Param, PlanKernel

    params = (Param("x", "f32", True, True), Param("y", "f32", True, False), Param("n", "i32", False, False))
    return PlanKernel(name, "twice", params, source, None, options)


def test_prepare_images_compiles_the_missing_modules_side_by_side_once(cache, monkeypatch):
    """A fresh machine's modules compile in threads before they are loaded one by one (NVRTC releases the GIL);
    kernels of one module compile once, a cached one not again, a broken one is left to load_module."""
    import threading

    threads = set()
    real = kernels.compile_cubin

    def compile_cubin(*a, **k):
        threads.add(threading.get_ident())
        return real(*a, **k)

    monkeypatch.setattr(kernels, "compile_cubin", compile_cubin)
    monkeypatch.setattr(kernels.os, "cpu_count", lambda: 4)
    ks = [_kernel("a", options=("-DV=1",)), _kernel("b", options=("-DV=1",)), _kernel("c", options=("-DV=2",)),
          _kernel("bad", source="this is not CUDA"), _kernel("d", options=("-DV=3",))]
    assert [k.name for k in kernels.missing_images(ks, "sm_90")] == ["a", "b", "c", "bad", "d"]
    assert kernels.prepare_images(ks, "sm_90") == 4  # modules V=1 (a and b), V=2, the broken one, V=3
    assert len(threads) > 1 and threading.get_ident() not in threads
    assert [k.name for k in kernels.missing_images(ks, "sm_90")] == ["bad"]
    assert len(list(cache.glob("*.cubin"))) == 3 and not list(cache.glob("*.tmp"))
    monkeypatch.setattr(kernels, "compile_cubin", no_compile)
    monkeypatch.setattr(kernels, "compile_ptx", no_compile)
    assert kernels.plan_ptx(SOURCE, "c", "sm_90", ("-DV=2",))  # each compile's PTX is kept for the checks
    assert kernels.prepare_images(ks[:3], "sm_90") == 0
    with pytest.raises(kernels.CompileError):  # the broken module's error comes where it is loaded
        monkeypatch.setattr(kernels, "compile_cubin", real)
        kernels.module_image("this is not CUDA", "bad", "sm_90")


def test_prepare_images_does_nothing_without_a_cache_a_device_or_a_second_module(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "compile_cubin", no_compile)
    two = [_kernel("a", options=("-DV=1",)), _kernel("c", options=("-DV=2",))]
    monkeypatch.setenv("DAGBUILD_CACHE_DIR", "")
    assert kernels.prepare_images(two, "sm_90") == 0 and kernels.missing_images(two, "sm_90") == []
    monkeypatch.setenv("DAGBUILD_CACHE_DIR", str(tmp_path))
    assert kernels.prepare_images(two[:1], "sm_90") == 0  # one module compiles as fast when it is loaded
    if kernels._device_arch() is None:  # no GPU here: no device arch to compile for
        assert kernels.prepare_images(two) == 0


def test_prepare_ptx_compiles_each_missing_module_once_side_by_side(cache, monkeypatch):
    """dagbuild compile's PTX: the modules neither this process nor the cache holds compile in threads first."""
    import threading

    threads, real = [], kernels.compile_ptx

    def compile_ptx(*a, **k):
        threads.append(threading.get_ident())
        return real(*a, **k)

    monkeypatch.setattr(kernels, "compile_ptx", compile_ptx)
    monkeypatch.setattr(kernels.os, "cpu_count", lambda: 2)
    ks = [_kernel("a", options=("-DV=1",)), _kernel("b", options=("-DV=1",)), _kernel("c", options=("-DV=2",))]
    assert kernels.prepare_ptx(ks, "sm_90") == 2 and len(threads) == 2
    assert threading.get_ident() not in threads
    assert kernels.prepare_ptx(ks, "sm_90") == 0  # now in this process
    monkeypatch.setattr(kernels, "_PTX_CACHE", {})
    assert kernels.prepare_ptx(ks, "sm_90") == 0  # and on disk
    assert len(threads) == 2
