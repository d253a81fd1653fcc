"""kernels/port.cuh through NVRTC (CPU): the CUDA side of the portability header."""

from __future__ import annotations

from conftest import KERNELS
from helpers import needs_nvrtc

from dagbuild import kernels
from dagbuild.sources import read_kernel_source

pytestmark = needs_nvrtc

KERNEL = r"""
extern "C" __global__ void pdl(const db_bf16* w, db_bf16* o, db_f16* h, float* y) {
    DB_GRID_TRIGGER();
    DB_GRID_WAIT();
    __shared__ float sh[DB_MAX_WARPS];
    const float v = db_block_sum(to_float(w[threadIdx.x]), sh) + db_block_max(y[threadIdx.x], sh);
    o[threadIdx.x] = from_float<db_bf16>(v);
    h[threadIdx.x] = from_float<db_f16>(db_warp_max(v));
    y[threadIdx.x] = db_f16_bits_to_float(0x3c00u) + db_bf16_bits_to_float(0x3f80u) + (v < DB_NEG_INF);
}
"""


def _ptx(arch: str) -> str:
    return kernels.compile_ptx(read_kernel_source(KERNELS / "port.cuh") + KERNEL, "pdl", arch=arch)


def test_grid_dependency_macros_only_from_sm90():
    ptx90, ptx80 = _ptx("sm_90"), _ptx("sm_80")
    assert "griddepcontrol.wait" in ptx90 and "griddepcontrol.launch_dependents" in ptx90
    assert "griddepcontrol" not in ptx80
    assert "shfl.sync.bfly.b32" in ptx80  # the full-warp CUDA shuffle
    assert kernels.ptx_entry_params(ptx90, "pdl") == [".u64"] * 4
