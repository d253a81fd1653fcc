"""dagbuild.occupancy: cubin resources against ptxas, the occupancy arithmetic, the fused spec's residency, the CLI."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import KERNELS, SPECS
from helpers import needs_nvrtc, ptxas_resources_and_cubin

from dagbuild.cli import main
from dagbuild.errors import BuildError
from dagbuild.load import load_spec
from dagbuild.occupancy import (
    SM_LIMITS,
    BlockShape,
    KernelResources,
    blocks_beside,
    cubin_resources,
    format_occupancy,
    kernel_resources,
    plan_occupancy,
    spread,
)
from dagbuild.plan import plan
from dagbuild.sources import read_kernel_source

H100 = SM_LIMITS["sm_90"]
FUSED = SPECS / "llama_decode_fused.yaml"


# ---- arithmetic (no compiler) ----------------------------------------------------------------------------


def test_block_usage_rounds_as_the_hardware_allocates():
    # registers per warp in units of 256 (107 a thread -> 112), shared memory in 128-byte units plus 1 KiB a block
    assert BlockShape(256, 107, 106496).usage(H100) == (8 * 3584, 106496 + 1024, 8)
    assert BlockShape(33, 1, 1).usage(H100) == (2 * 256, 128 + 1024, 2)


@pytest.mark.parametrize("shape, per_sm, limiter", [
    (BlockShape(256, 128, 0), 2, "registers"),
    (BlockShape(256, 32, 106496), 2, "shared memory"),
    (BlockShape(1024, 16, 0), 2, "warps"),
    (BlockShape(32, 16, 0), 32, "blocks"),
])
def test_blocks_an_sm_holds(shape, per_sm, limiter):
    assert blocks_beside(shape, [], H100) == (per_sm, limiter)


def test_blocks_beside_others_share_every_resource():
    gemv = BlockShape(256, 107, 106496)  # 28,672 registers and 107,520 bytes a block
    attn = BlockShape(256, 80, 12304)  # 20,480 registers
    assert blocks_beside(attn, [(gemv, 2)], H100) == (0, "registers")  # 57,344 + 20,480 > 65,536
    assert blocks_beside(attn, [(gemv, 1)], H100) == (1, "registers")
    lean = BlockShape(256, 80, 106496)
    assert blocks_beside(attn, [(lean, 2)], H100)[0] == 1  # 3 x 20,480 registers; 2 x 107,520 + 13,440 bytes
    assert blocks_beside(lean, [(lean, 2)], H100) == (0, "shared memory")


def test_spread_is_even_and_capped():
    assert spread(160, 132, 2) == [(2, 28), (1, 104)]
    assert spread(128, 132, 2) == [(1, 128), (0, 4)]
    assert spread(1000, 132, 2) == [(2, 132)]  # more than one wave: every SM full
    assert spread(264, 132, 2) == [(2, 132)]


def test_cubin_resources_refuses_what_is_not_a_cubin():
    with pytest.raises(ValueError, match="not an ELF64 cubin"):
        cubin_resources(b"//\n.version 8.0\n")


def _fanout_plan():
    return plan(load_spec(SPECS / "fanout4.yaml"), {})


def test_a_block_that_fits_no_sm_names_its_node():
    p = _fanout_plan()
    fat = {name: KernelResources(regs=255, static_shared=0) for name in p.kernels}
    node = next(n for n in p.nodes if hasattr(n.op, "kernel"))
    big = dataclasses.replace(node.op, block=(1024, 1, 1))
    p.nodes[p.nodes.index(node)] = dataclasses.replace(node, op=big)
    named = rf"node '{node.id}' \(kernel '{big.kernel}'\).*does not fit an SM \(registers\)"
    with pytest.raises(BuildError, match=named):
        plan_occupancy(p, fat, 132, H100)
    with pytest.raises(ValueError, match="sms must be a positive"):
        plan_occupancy(p, fat, 0, H100)


def test_rows_follow_the_plan_and_its_edges():
    p = _fanout_plan()
    rows = plan_occupancy(p, {name: KernelResources(32, 0) for name in p.kernels}, 132, H100)
    kernel_nodes = [n.id for n in p.nodes if hasattr(n.op, "kernel")]
    assert [r.node for r in rows] == kernel_nodes
    preds = {v: u for u, v in p.edges}
    for r in rows:
        assert r.after == (preds[r.node] if preds.get(r.node) in kernel_nodes else None)
        assert r.beside is None or 0 <= r.beside <= r.blocks
    text = format_occupancy(rows, 132, len(p.nodes) - len(rows))
    assert text.splitlines()[1].startswith(rows[0].node)
    assert text.endswith(f"{len(p.nodes) - len(rows)} nodes that are not kernels (copies, sets, child graphs) not "
                         "modelled") == (len(p.nodes) > len(rows))


# ---- against the compiler --------------------------------------------------------------------------------


@needs_nvrtc
def test_cubin_resources_are_what_ptxas_reports():
    """Registers and static shared memory of every fused kernel entry (ptxas -v and the cubin of one compile)."""
    expected, cubin = ptxas_resources_and_cubin(read_kernel_source(KERNELS / "llama_fused.cu"), "llama_fused")
    found = cubin_resources(cubin)
    assert set(found) == set(expected) and any(r.static_shared for r in found.values())
    for entry, (_, _, _, regs, rest) in expected.items():
        smem = int(rest.split(" bytes smem")[0].rsplit(" ", 1)[-1]) if "bytes smem" in rest else 0
        assert found[entry] == KernelResources(regs, smem), entry


@needs_nvrtc
def test_fused_batch_one_attention_waits_for_qkv_registers_unless_the_gemvs_take_80():
    """The fused spec at batch 1: attention's blocks do not all fit beside qkv's (registers); built at three
    blocks an SM's registers (tried on an H100: 1.8 % slower, NOTES.md), the batch-1 GEMVs leave room for all."""
    p = plan(load_spec(FUSED), {})
    rows = {r.node: r for r in plan_occupancy(p, kernel_resources(p, "sm_90"), 132, H100)}
    attn = rows["attn.3"]
    assert attn.after == "qkv.3" and attn.beside < attn.blocks and attn.beside_limiter == "registers"
    assert rows["qkv.3"].after == "down_proj.2" and rows["o_proj.3"].after == "attn.3"
    for name in ("qkv_1", "gate_up_1", "gemv_norm_1"):  # one module (gemv_res_1 adds FW_STAGES: another)
        k = p.kernels[name]
        p.kernels[name] = dataclasses.replace(k, options=(*k.options, "-DFW_MIN_BLOCKS=3"))
    lean = {r.node: r for r in plan_occupancy(p, kernel_resources(p, "sm_90"), 132, H100)}
    assert lean["qkv.3"].regs <= 80 and lean["attn.3"].beside == lean["attn.3"].blocks


@needs_nvrtc
def test_cli_prints_a_row_per_kernel_of_a_layer(capsys):
    assert main(["occupancy", str(FUSED)]) == 0
    out = capsys.readouterr().out
    for node in ("embed", "qkv.0", "attn.0", "o_proj.0", "gate_up.0", "down_proj.0", "lm_head", "argmax"):
        assert f"\n{node} " in out, node
    assert "attn.0           attn" in out and "after qkv.0 (registers)" in out
    assert "132 SMs" in out


def test_cli_refuses_bad_counts_and_arches(capsys):
    with pytest.raises(SystemExit):
        main(["occupancy", str(FUSED), "--sms", "0"])
    assert "--sms" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["occupancy", str(FUSED), "--arch", "sm_75"])
    assert "invalid choice: 'sm_75'" in capsys.readouterr().err
    assert main(["occupancy", str(FUSED), "--set", "sms=0"]) == 1
    assert "sms (the SM count the grids are sized for) must be positive" in capsys.readouterr().err


def test_a_resident_kernel_that_cannot_fit_at_once_is_flagged():
    """A `resident: true` kernel's blocks wait for each other: the table says whether they all fit at once."""
    p = _fanout_plan()
    node = next(n for n in p.nodes if hasattr(n.op, "kernel"))
    p.kernels[node.op.kernel] = dataclasses.replace(p.kernels[node.op.kernel], resident=True)
    res = {name: KernelResources(32, 0) for name in p.kernels}
    p.nodes[p.nodes.index(node)] = dataclasses.replace(node, op=dataclasses.replace(node.op, grid=(300, 1, 1),
                                                                                   block=(256, 1, 1)))
    row = next(r for r in plan_occupancy(p, res, 132, H100) if r.node == node.id)
    assert row.resident and row.per_sm == 8 and row.fits_at_once  # 256 threads: 8 an SM by warps
    assert "[resident: all 300 fit at once]" in format_occupancy([row], 132)
    row = next(r for r in plan_occupancy(p, res, 32, H100) if r.node == node.id)
    assert not row.fits_at_once
    assert "[resident: only 256 of 300 fit at once: would hang" in format_occupancy([row], 32)


@needs_nvrtc
def test_an_entry_missing_from_its_cubin_names_the_kernel():
    p = _fanout_plan()
    name = next(n.op.kernel for n in p.nodes if hasattr(n.op, "kernel"))
    p.kernels[name] = dataclasses.replace(p.kernels[name], entry="no_such_entry")
    with pytest.raises(BuildError, match=rf"kernel '{name}': entry 'no_such_entry' is not in its cubin"):
        kernel_resources(p, "sm_90")
