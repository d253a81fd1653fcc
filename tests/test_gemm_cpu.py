"""kernels/gemm.cu built by NVRTC without a GPU: every split and row run fits its registers without spills, each
block requests its weight tiles before the grid-dependency wait, and a cluster's last barrier carries no fence.

These pin what made the GEMMs fast on the H100 (NOTES.md, 2026-12-06): a spill or a fence there costs device time
that only a benchmark on a lent GPU would show."""

from __future__ import annotations

import pytest
from conftest import KERNELS
from helpers import entry_bodies, needs_nvrtc, ptx_or_skip, ptxas_resources

from dagbuild.sources import read_kernel_source

SRC = KERNELS / "gemm.cu"
ENTRIES = [f"gemm_{epi}_{wt}" for epi in ("store", "add", "silu") for wt in ("f32", "f16", "bf16")]


def _source(split: int, row: int) -> str:
    """gemm.cu as the spec builds it (-DGT_SPLIT, -DGT_ROW), the options written as defines."""
    return f"#define GT_SPLIT {split}\n#define GT_ROW {row}\n" + read_kernel_source(SRC)


@needs_nvrtc
@pytest.mark.parametrize("row", [128, 256])
@pytest.mark.parametrize("split", [1, 2, 4, 8])
def test_every_build_fits_registers_without_spills(split, row):
    props = ptxas_resources(_source(split, row), f"gemm_k{split}")
    for name in ENTRIES:
        stack, st, ld, regs, _ = props[name]
        assert (stack, st, ld) == (0, 0, 0), (name, split, row)
        assert regs <= 255, (name, regs)


@needs_nvrtc
@pytest.mark.parametrize("split", [1, 4])
def test_weights_before_the_wait_and_a_relaxed_last_barrier(split):
    bodies = entry_bodies(ptx_or_skip(_source(split, 256), f"gemm_k{split}"))
    for name in ENTRIES:
        body = bodies[name]
        wait = body.index("griddepcontrol.wait")
        assert "cp.async.cg.shared.global" in body[:wait], name  # the first weight k-tiles
        if split > 1:  # partials summed through distributed shared memory; the last barrier only counts arrivals
            assert f".reqnctapercluster {split}, 1, 1" in body and "mapa.u64" in body, name
            assert body.count("barrier.cluster.arrive.relaxed") == 1, name
            assert body.count("barrier.cluster.arrive") == 2, name
        else:
            assert ".reqnctapercluster" not in body and "barrier.cluster" not in body, name
