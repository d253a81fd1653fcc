"""How a plan's kernel nodes fill the SMs, from their cubins, without a GPU.

Why: in a graph of programmatic launches a node's blocks can only start (and prefetch before their
``griddepcontrol.wait``) where they fit beside the blocks of the node still running; where they do not, they
start only once those leave, and the step waits for them (the per-block traces of NOTES.md: attention's blocks
after qkv's). This models that per node: the blocks an SM holds by registers, shared memory, warps and block
slots (the CUDA occupancy rules), and how many of a node's blocks fit beside its predecessor's, spread evenly.

Registers and static shared memory are read from the cubin NVRTC builds (no GPU). Not modelled: thread-block
clusters (placed per GPC), the L1/shared-memory carveout the driver picks per launch, and where the block
scheduler really puts blocks (it is not documented: the even spread is a model).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from math import ceil

from .errors import BuildError
from .ir import KernelOp, Plan


@dataclass(frozen=True)
class SmLimits:
    """One SM's resources for resident blocks (CUDA occupancy calculator, per compute capability)."""

    regs: int = 65536
    reg_unit: int = 256  # registers are allocated per warp in units of this many
    warps: int = 64
    blocks: int = 32
    shared: int = 233472  # bytes of shared memory for blocks (228 KiB on sm_90)
    shared_unit: int = 128  # allocation granularity
    reserved: int = 1024  # bytes the system reserves per block (sm_80 on)


SM_LIMITS: dict[str, SmLimits] = {
    "sm_80": SmLimits(shared=167936),
    "sm_86": SmLimits(warps=48, blocks=16, shared=102400),
    "sm_89": SmLimits(warps=48, blocks=24, shared=102400),
    "sm_90": SmLimits(),
}


@dataclass(frozen=True)
class KernelResources:
    """What one entry of a cubin asks of an SM per thread and per block (as ptxas -v reports them)."""

    regs: int  # per thread
    static_shared: int  # bytes per block, besides the dynamic shared memory of a launch


# .nv.info record formats (value: none, a byte, a half-word, sized bytes) and the one attribute read here
# (EIATTR_REGCOUNT: symbol index, registers)
_EIATTR_REGCOUNT = 0x2F
_EIFMT_SVAL, _EIFMT_HVAL, _EIFMT_BVAL = 4, 3, 2


def cubin_resources(cubin: bytes) -> dict[str, KernelResources]:
    """Registers and static shared memory of every entry of an sm_XX cubin (ELF64): the global ``.nv.info``
    section's EIATTR_REGCOUNT records, keyed by the symbol index that ``.text.<entry>``'s sh_info holds, and the
    size of ``.nv.shared.<entry>``, which includes the 1 KiB the system reserves per block (checked against
    ptxas -v in tests/test_occupancy.py)."""
    if cubin[:4] != b"\x7fELF" or len(cubin) < 64 or cubin[4] != 2:
        raise ValueError("not an ELF64 cubin")
    (shoff,) = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]

    def name(offset: int) -> str:
        end = cubin.index(b"\0", names_at + offset)
        return cubin[names_at + offset:end].decode()

    sections = {name(h[0]): h for h in headers}
    regs_of_symbol: dict[int, int] = {}
    info = sections.get(".nv.info")
    if info is not None:
        data, i = cubin[info[4]:info[4] + info[5]], 0
        while i + 2 <= len(data):
            fmt, attr = data[i], data[i + 1]
            if fmt == _EIFMT_SVAL:
                (size,) = struct.unpack_from("<H", data, i + 2)
                if attr == _EIATTR_REGCOUNT and size == 8:
                    symbol, regs = struct.unpack_from("<II", data, i + 4)
                    regs_of_symbol[symbol] = regs
                i += 4 + size
            elif fmt in (_EIFMT_HVAL, _EIFMT_BVAL):
                i += 4
            else:
                i += 2
    out = {}
    for section, h in sections.items():
        if not section.startswith(".text."):
            continue
        entry = section.removeprefix(".text.")
        shared = sections.get(f".nv.shared.{entry}")
        static = 0 if shared is None else max(0, shared[5] - SmLimits.reserved)
        out[entry] = KernelResources(regs_of_symbol.get(h[7], 0), static)
    return out


def _round_up(v: int, unit: int) -> int:
    return -(-v // unit) * unit


@dataclass(frozen=True)
class BlockShape:
    """One block of a launch: what it holds on an SM while resident."""

    threads: int
    regs: int  # per thread
    shared: int  # static + dynamic bytes

    def usage(self, limits: SmLimits) -> tuple[int, int, int]:
        """(registers, shared bytes, warps) one block takes from an SM."""
        warps = ceil(self.threads / 32)
        regs = warps * _round_up(max(self.regs, 1) * 32, limits.reg_unit)
        return regs, _round_up(self.shared, limits.shared_unit) + limits.reserved, warps


def blocks_beside(block: BlockShape, others: list[tuple[BlockShape, int]], limits: SmLimits) -> tuple[int, str]:
    """How many ``block``s an SM holds beside ``others`` ((shape, count) already resident there), and the
    resource that stops one more (registers, shared memory, warps or blocks)."""
    regs = shared = warps = blocks = 0
    for shape, count in others:
        r, s, w = shape.usage(limits)
        regs, shared, warps, blocks = regs + count * r, shared + count * s, warps + count * w, blocks + count
    r, s, w = block.usage(limits)
    room = {"registers": (limits.regs - regs) // r, "shared memory": (limits.shared - shared) // s,
            "warps": (limits.warps - warps) // w, "blocks": limits.blocks - blocks}
    limiter = min(room, key=lambda k: room[k])
    return max(0, room[limiter]), limiter


def spread(blocks: int, sms: int, per_sm: int) -> list[tuple[int, int]]:
    """(blocks on an SM, how many SMs) of a grid spread evenly over ``sms`` SMs, at most ``per_sm`` each."""
    resident = min(blocks, sms * per_sm)
    q, r = divmod(resident, sms)
    return [(c, n) for c, n in ((q + 1, r), (q, sms - r)) if n]


@dataclass(frozen=True)
class NodeOccupancy:
    """One kernel node: its launch, what an SM holds of it, and how much of it fits beside the node before."""

    node: str
    kernel: str
    blocks: int  # grid size
    threads: int
    regs: int
    shared: int  # static + dynamic bytes a block
    per_sm: int  # blocks an SM holds of this node alone
    limiter: str  # what stops one more block on an SM
    sms_used: int
    waves: int
    after: str | None  # the kernel node it launches behind (its last kernel predecessor in plan order)
    beside: int | None  # of its blocks, how many fit while every block of `after` is resident (even spread)
    beside_limiter: str | None  # what stops more of them on most SMs (None: all fit)
    resident: bool = False  # its kernel needs every block resident at once (``resident: true``)

    @property
    def fits_at_once(self) -> bool:
        """Whether every block can be resident at once on the modelled card (what a resident kernel needs)."""
        return self.waves <= 1


def plan_occupancy(plan: Plan, resources: dict[str, KernelResources], sms: int,
                   limits: SmLimits) -> list[NodeOccupancy]:
    """Per kernel node of ``plan``: residency alone and beside its predecessor. ``resources``: per kernel
    name of the plan (see :func:`kernel_resources`)."""
    if sms < 1:
        raise ValueError(f"sms must be a positive SM count, not {sms}")
    order = {n.id: i for i, n in enumerate(plan.nodes)}
    preds: dict[str, list[str]] = {}
    for u, v in plan.edges:
        preds.setdefault(v, []).append(u)
    shapes: dict[str, tuple[BlockShape, int, int]] = {}  # node -> (shape, grid blocks, per SM)
    rows = []
    for n in plan.nodes:
        op = n.op
        if not isinstance(op, KernelOp):
            continue
        res = resources[op.kernel]
        shape = BlockShape(op.threads, res.regs, res.static_shared + op.shared)
        blocks = op.grid[0] * op.grid[1] * op.grid[2]
        per_sm, limiter = blocks_beside(shape, [], limits)
        if per_sm < 1:
            raise BuildError(f"node {n.id!r} (kernel {op.kernel!r}): a block of {op.threads} threads, {res.regs} "
                             f"registers a thread and {shape.shared} bytes of shared memory does not fit an SM "
                             f"({limiter})", node=n.id)
        shapes[n.id] = (shape, blocks, per_sm)
        kernel_preds = [p for p in preds.get(n.id, []) if p in shapes]
        after = max(kernel_preds, key=order.__getitem__) if kernel_preds else None
        beside = beside_limiter = None
        if after is not None:
            a_shape, a_blocks, a_per_sm = shapes[after]
            beside, lims = 0, []
            for count, n_sms in spread(a_blocks, sms, a_per_sm):
                fit, lim = blocks_beside(shape, [(a_shape, count)], limits)
                beside += fit * n_sms
                lims.append((n_sms, lim))
            beside = min(beside, blocks)
            beside_limiter = max(lims)[1] if beside < blocks else None  # what binds on most of the SMs
        rows.append(NodeOccupancy(n.id, op.kernel, blocks, op.threads, res.regs, shape.shared, per_sm, limiter,
                                  min(blocks, sms), ceil(blocks / (sms * per_sm)), after, beside, beside_limiter,
                                  plan.kernels[op.kernel].resident))
    return rows


def kernel_resources(plan: Plan, arch: str) -> dict[str, KernelResources]:
    """Per kernel the plan's nodes run, its entry's registers and static shared memory, from the cubin NVRTC builds for
    ``arch`` (the kernel cache's, where there is one)."""
    from .kernels import check_arch, compile_cubin, module_image

    check_arch(arch)
    out, by_module = {}, {}
    used = {n.op.kernel for n in plan.nodes if isinstance(n.op, KernelOp)}
    for name, k in plan.kernels.items():
        if name not in used:  # a spec declares kernels its variants pick at other dims: not compiled here
            continue
        key = (k.source, k.options)
        if key not in by_module:
            path = module_image(k.source, k.name, arch, k.options)
            cubin = path.read_bytes() if path is not None else compile_cubin(k.source, k.name, arch, k.options)[1]
            by_module[key] = cubin_resources(cubin)
        entries = by_module[key]
        if k.entry not in entries:
            raise BuildError(f"kernel {name!r}: entry {k.entry!r} is not in its cubin")
        out[name] = entries[k.entry]
    return out


def format_occupancy(rows: list[NodeOccupancy], sms: int, others: int = 0) -> str:
    """A table: one line per kernel node; repeated layers (same kernels and shapes after the first) folded.
    ``others``: the plan's nodes that are not kernels (copies, child graphs: not modelled)."""
    head = (f"{'node':<16} {'kernel':<18} {'blocks':>6} {'thr':>4} {'regs':>4} {'smem':>7} {'/SM':>3} "
            f"{'limit':<13} {'waves':>5}  beside the node before (of its blocks)")
    lines, seen = [head], set()
    folded = 0
    for r in rows:
        sig = (r.node.split(".")[0], r.kernel, r.blocks, r.threads, r.regs, r.shared, r.after and r.after.split(".")[0],
               r.beside)
        if sig in seen:
            folded += 1
            continue
        seen.add(sig)
        beside = "-" if r.beside is None else (
            f"{r.beside}/{r.blocks} after {r.after}" + (f" ({r.beside_limiter})" if r.beside_limiter else ""))
        if r.resident:  # its blocks wait for each other: one that finds no SM would hang (the build refuses it)
            beside += (f"  [resident: all {r.blocks} fit at once]" if r.fits_at_once else
                       f"  [resident: only {sms * r.per_sm} of {r.blocks} fit at once: would hang, a build refuses it]")
        lines.append(f"{r.node:<16} {r.kernel:<18} {r.blocks:>6} {r.threads:>4} {r.regs:>4} {r.shared:>7} "
                     f"{r.per_sm:>3} {r.limiter:<13} {r.waves:>5}  {beside}")
    tail = f"; {others} nodes that are not kernels (copies, sets, child graphs) not modelled" if others else ""
    lines.append(f"{sms} SMs; {folded} more kernel nodes like those above (repeated layers) not shown{tail}")
    return "\n".join(lines)
