"""kernels/llama_layer.cu (decode layers as one persistent kernel node: one a node, or the whole stack) and the
fused spec's `layer_kernel` switch without a GPU: NVRTC compile of every entry with the params the spec declares,
the PDL contract in the PTX (before griddepcontrol.wait only weight copies: TMA bulk copies into the ring,
cp.async of the norm weights), two blocks per SM by ptxas (at most 128 registers, no local memory), the graph it
binds to, and the checks."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import KERNELS, SPECS
from helpers import entry_bodies, entry_param_types, needs_nvrtc, ptx_or_skip, ptxas_resources

from dagbuild.dot import to_dot
from dagbuild.errors import SpecError
from dagbuild.llama.decode import llama_plan
from dagbuild.sources import read_kernel_source

SRC = KERNELS / "llama_layer.cu"
FUSED = SPECS / "llama_decode_fused.yaml"
TINY = yaml.safe_load((SPECS / "configs" / "llama_tiny.yaml").read_text())
P, N, F = ".u64", ".u32", ".f32"
LAYER_PARAMS = [P] * 17 + [N] * 8 + [F, F, N, ".u64"]  # ... eps, scale, layers, kv_stride
ENTRIES = [f"decode_layer_{wt}" for wt in ("f32", "f16", "bf16")]


@pytest.fixture(scope="module")
def ptx() -> str:
    return ptx_or_skip(read_kernel_source(SRC), "llama_layer")


@needs_nvrtc
def test_entries_and_params(ptx):
    entries = entry_param_types(ptx)
    for name in ENTRIES:
        assert entries[name] == LAYER_PARAMS, name


@needs_nvrtc
def test_only_weight_copies_before_the_wait(ptx):
    bodies = entry_bodies(ptx)
    for name in ENTRIES:
        body = bodies[name]
        assert body.count("griddepcontrol.wait") == 1 and "griddepcontrol.launch_dependents" in body, name
        head, tail = body.split("griddepcontrol.wait", 1)
        ops = set(re.findall(r"\b((?:ld|st|atom|red|prefetch)\.global(?:\.\w+)*|cp\.async[\w.:]*)", head))
        assert ops == {"cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes",
                       "cp.async.cg.shared.global", "cp.async.commit_group"}, (name, ops)
        # the ring: slots refilled by bulk copies after the wait too, each use waited for by its parity
        assert "mbarrier.try_wait.parity.shared::cta.b64" in tail and "cp.async.bulk" in tail, name
        assert "fence.proxy.async.shared::cta" in tail, name  # generic reads of a slot before its refill
        # produced data after the wait: through L2 (other blocks of this grid write it), arrivals acquire
        assert "ld.global.cg" in tail and "ld.acquire.gpu.global" in tail, name
        assert "trap;" in tail, name  # a grid that cannot be resident traps instead of hanging


@needs_nvrtc
def test_two_blocks_per_sm_and_no_local_memory():
    src = read_kernel_source(SRC)
    for define in ("", "#define DB_BLOCKTRACE\n#define LY_MARKS 3\n", "#define LY_GROUPS 1\n",
                   "#define LY_PROXY_FENCE 0\n#define LY_TRIGGER 3\n", "#define LY_DIAG 1\n",
                   "#define LY_GROUPS 4\n#define LY_L2_AHEAD 24\n", "#define LY_X_INFLIGHT 8\n",
                   "#define LY_GROUPS 4\n#define LY_TABLE 112\n",  # the spec's layer_stack
                   "#define LY_GROUPS 4\n#define LY_TABLE 112\n#define DB_BLOCKTRACE\n#define LY_MARKS 3\n"):
        props = ptxas_resources(define + src, "llama_layer")
        for name in ENTRIES:
            stack, st, ld, regs, _ = props[name]
            # a block-trace build (tools/blocktrace.py, diagnostics) of the stack may keep one 8-byte value on the
            # stack beside the stage table; every build that decodes has no local memory
            allowed = 8 if "DB_BLOCKTRACE" in define else 0
            assert stack <= allowed and st <= allowed and ld <= allowed, (define, name, props[name])
            assert regs <= 128, (define, name, regs)  # __launch_bounds__(256, 2): the next layer's block fits


def test_layer_kernel_switch_binds_one_node_per_layer():
    five = llama_plan({"batch": 1}, FUSED)
    one = llama_plan({"batch": 1, "layer_kernel": 1}, FUSED)
    layers = one.dims["layers"]
    assert not any(n.id.startswith(("layer.", "zero_layer_sync")) for n in five.nodes)
    ids = [n.id for n in one.nodes]
    assert [i for i in ids if i.startswith("layer.")] == [f"layer.{i}" for i in range(layers)]
    assert "zero_layer_sync.0" in ids and not any(i.startswith(("qkv.", "attn.", "down_proj.")) for i in ids)
    assert len(ids) == len(five.nodes) - 5 * layers + layers + 1
    node = next(n for n in one.nodes if n.id == "layer.3").op
    assert one.kernels[node.kernel].entry == "decode_layer_f16"
    assert node.grid == (132, 1, 1) and node.block == (256, 1, 1)
    # f16, TinyLlama: ring 4 x 16 KiB + (parts, barriers, x / act, norm weights at their f32 size): two a SM
    assert node.shared == 6400 + 4 * 7168 + 4 * 16384 and 2 * (node.shared + 1024) <= 233472
    assert {a.param.name: a.value for a in node.args}["layers"] == 1
    # every layer kernel follows the previous one programmatically; the memset zeroes the arrival counters
    dot = to_dot(one)
    assert dot.count("programmatic") >= layers
    assert '"zero_layer_sync.0" -> "layer.0"' in dot
    # batch > 1 keeps the five nodes a layer whatever layer_kernel says (below the GEMM path: gemm_batch 0)
    batched = llama_plan({"batch": 3, "cache_batch": 3, "layer_kernel": 1, "gemm_batch": 0}, FUSED)
    assert not any(n.id.startswith("layer.") for n in batched.nodes)
    assert sum(n.id.startswith("qkv.") for n in batched.nodes) == layers


def test_whole_stack_binds_one_node_over_the_stacked_buffers():
    """layer_kernel: 2 runs every layer in one node: whole weight / cache / counter buffers, the layer count and
    the cache's layer stride as args, one block a SM with stack_slots slots; batch > 1 keeps five nodes a layer."""
    five = llama_plan({"batch": 1}, FUSED)
    stack = llama_plan({"batch": 1, "layer_kernel": 2}, FUSED)
    d = stack.dims
    ids = [n.id for n in stack.nodes]
    assert ids == ["upload_tokens", "upload_pos", "embed", "zero_layer_sync.0", "layers.0", "lm_head", "argmax",
                   "download"]
    node = next(n for n in stack.nodes if n.id == "layers.0").op
    args = {a.param.name: a for a in node.args}
    assert args["layers"].value == d["layers"]
    assert args["kv_stride"].value == d["cache_batch"] * d["kv_heads"] * d["max_seq"] * d["head_dim"]
    for name in ("wqkv", "wo", "w_gate_up", "w_down", "attn_norm", "mlp_norm", "k_cache", "v_cache", "sync", "bias"):
        buf = {"sync": "layer_sync", "bias": "qkv_bias"}.get(name, name)
        assert args[name].view.buffer == buf, name
        assert args[name].view.nbytes == stack.buffers[buf].nbytes, name  # the whole stack, not one layer
    assert node.grid == (132, 1, 1) and node.shared == 6400 + 4 * 7168 + 12 * 16384 <= 232448
    assert node.shared + 3 * 32 * 8 <= 232448  # a -DDB_BLOCKTRACE build adds 768 B of static shared memory
    assert len(ids) == len(five.nodes) - 5 * d["layers"] + 2
    assert '"zero_layer_sync.0" -> "layers.0"' in to_dot(stack)
    batched = llama_plan({"batch": 3, "cache_batch": 3, "layer_kernel": 2, "gemm_batch": 0}, FUSED)
    assert sum(n.id.startswith("qkv.") for n in batched.nodes) == d["layers"]
    assert stack.kernels["layer_stack"].options == ("-DLY_GROUPS=4", "-DLY_TABLE=112")  # slots by fours
    for slots in (7, 10):
        with pytest.raises(SpecError, match="stack_slots must be 4, 8, 12 or 16"):
            llama_plan({"batch": 1, "layer_kernel": 2, "stack_slots": slots}, FUSED)
    with pytest.raises(SpecError, match="stack_slots: the whole-stack kernel's ring and its fixed part exceed 227 KiB"):
        llama_plan({"batch": 1, "layer_kernel": 2, "ffn": 8192}, FUSED)  # Llama-3.2-1B's ffn takes 8 slots
    llama_plan({"batch": 1, "layer_kernel": 2, "ffn": 8192, "stack_slots": 8}, FUSED)


def test_layer_kernel_shapes_it_cannot_take_are_refused_by_name():
    with pytest.raises(SpecError, match="layer_kernel: a block of the layer kernel keeps at most 1024 partial sums"):
        llama_plan({**TINY, "batch": 1, "layer_kernel": 1, "sms": 4}, FUSED)
    with pytest.raises(SpecError, match="layer_kernel: a block of the layer kernel keeps at most 1024 partial sums"):
        llama_plan({"batch": 1, "layer_kernel": 1, "ffn": 32768}, FUSED)  # down: 8 pairs x 16 chunks
    with pytest.raises(SpecError, match="layer_kernel must be 0"):
        llama_plan({"batch": 1, "layer_kernel": 3}, FUSED)
    with pytest.raises(SpecError, match="layer_slots must be 2, 4, 6 or 8"):
        llama_plan({"batch": 1, "layer_kernel": 1, "layer_slots": 5}, FUSED)
    llama_plan({**TINY, "batch": 1, "layer_kernel": 1, "sms": 11, "heads": 16}, FUSED)  # the GPU test's 11 blocks
    # the same dims are fine with the five-node layers
    llama_plan({**TINY, "batch": 1, "layer_kernel": 0, "sms": 4}, FUSED)


@pytest.mark.parametrize("lk,node", [(1, "layer.0"), (2, "layers.0")])
def test_layer_kernel_in_the_loop_body(lk, node):
    """K tokens per launch: the counters' memset runs in the loop body, before each step's layer kernels."""
    from dagbuild.llama.loop import looped_plan

    lp = looped_plan(llama_plan({"batch": 1, "layer_kernel": lk}, FUSED), 16)
    scope = {n.id: n.scope for n in lp.nodes}
    assert scope["zero_layer_sync.0"] == scope[node] == scope["sample"] is not None


@pytest.mark.parametrize("config", ["tinyllama", "llama32_1b", "llama_tiny"])
@pytest.mark.parametrize("wt", ["f16", "bf16", "f32"])
def test_spec_shared_memory_gives_the_kernel_its_slots(config, wt):
    """The spec's `shared` against the kernel's own layout (llama_layer.cu: LY_HEAD, LY_MAX_CELLS, xs with the
    norm weights in its tail): `layer_slots` slots for every weight type, and two blocks a SM."""
    dims = yaml.safe_load((SPECS / "configs" / f"{config}.yaml").read_text())
    p = llama_plan({**dims, "wt": wt, "batch": 1, "layer_kernel": 1}, FUSED)
    d, size = p.dims, {"f16": 2, "bf16": 2, "f32": 4}[wt]
    shared = next(n for n in p.nodes if n.id == "layer.0").op.shared
    norm_off = (max(d["hidden"], d["heads"] * d["head_dim"], 8 * 256 + 4 * 256) + 3) & ~3
    xs_floats = max(d["ffn"], norm_off + (2 * d["hidden"] * size + 15) // 16 * 4)
    fixed = (16 * 8 + 16 * 4 + 4 * 64 + 64 + 112 * 16) + 1024 * 4 + 4 * xs_floats
    assert min(16, (shared - fixed) // 16384) // 2 * 2 == d["layer_slots"]
    assert 2 * (shared + 1024) <= 233472  # two blocks a SM: 228 KiB, 1 KiB reserved a block
    # the whole stack in one node: stack_slots slots (a multiple of its four warp groups, as many as fit 227 KiB;
    # an ffn of 8192 takes 8)
    slots = 12 if d["ffn"] <= 5632 else 8
    p = llama_plan({**dims, "wt": wt, "batch": 1, "layer_kernel": 2, "stack_slots": slots}, FUSED)
    shared = next(n for n in p.nodes if n.id == "layers.0").op.shared
    assert min(16, (shared - fixed) // 16384) // 4 * 4 == slots and shared <= 232448


def test_resident_kernels_are_declared_and_checked_against_the_device():
    """`resident: true` reaches the plan; the executable refuses a grid of such a kernel that the device cannot
    hold at once (checked here with a stand-in backend: the occupancy the driver would report)."""
    from dagbuild.executable import Executable

    p = llama_plan({"batch": 1, "layer_kernel": 1}, FUSED)
    assert p.kernels["layer"].resident and not p.kernels["qkv"].resident

    class Device:  # what CudaBackend.max_active_blocks would say
        def __init__(self, per_sm):
            self.per_sm = per_sm

        calls = 0

        def max_active_blocks(self, func, threads, shared):
            assert (func, threads) == ("f", 256)
            Device.calls += 1
            return self.per_sm

    exe = Executable.__new__(Executable)  # no GPU: only the check's inputs
    exe.plan, exe.limits, exe._funcs = p, {"multiprocessor_count": 132}, {"layer": "f"}
    node = next(n for n in p.nodes if n.id == "layer.0")
    for per_sm, ok in ((2, True), (1, True), (None, True), (0, False)):
        exe.backend = Device(per_sm)
        assert (exe._resident_problem(node.op) is None) == ok, per_sm
    exe.backend, Device.calls = Device(0), 0
    with pytest.raises(SpecError) as err:
        exe._check_resident()
    assert Device.calls == 1  # one query for the 22 nodes of one launch shape
    assert err.value.codes == ["launch_config"] * p.dims["layers"]
    assert "node 'layer.0': its 132 blocks wait for each other" in str(err.value)
    assert "holds 0 of them a SM x 132 SMs = 0" in str(err.value)


@needs_nvrtc
def test_a_stage_table_beyond_its_room_is_refused_by_name():
    """LY_TABLE above the 112 entries LY_HEAD (and the spec's `shared`) keep for it: a compile error naming it."""
    from dagbuild.errors import CompileError
    from dagbuild.kernels import compile_ptx

    with pytest.raises(CompileError, match="LY_TABLE"):
        compile_ptx("#define LY_TABLE 113\n" + read_kernel_source(SRC), "llama_layer")
