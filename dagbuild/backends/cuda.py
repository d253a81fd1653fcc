"""The CUDA driver backend: the only module that calls ``cuda.bindings``.

It builds CUDA graphs explicitly, node by node, and updates instantiated graphs in place. Its vocabulary
is primitives only: pointers, function handles and streams are ints; grids and blocks are 3-tuples;
kernel arguments are ``(kind, value)`` pairs with kind in :data:`ARG_KINDS`. Graphs, executable graphs and
nodes are the driver's own handle objects (``CUgraph``, ``CUgraphExec``, ``CUgraphNode``); nodes hash
and compare by value, and :meth:`CudaBackend.node_id` gives their integer address.

Building and updating read alike::

    node = be.add_kernel(graph, deps, func, grid, block, shared, args)
    be.set_kernel(exec_, node, func, grid, block, shared, new_args)

Every driver call goes through :meth:`CudaBackend._check`, which raises :class:`DriverError` naming the
call and the status (e.g. ``CUDA_ERROR_INVALID_VALUE (invalid argument)``).

Ownership: the backend owns nothing but the handles it returns; callers destroy graphs
(:meth:`~CudaBackend.graph_destroy`) and executable graphs (:meth:`~CudaBackend.exec_destroy`) they created.
Device memory belongs to CuPy. The CUDA context is CuPy's primary context of ``device``, retained by the
runtime, so :meth:`~CudaBackend.close` has nothing to free.
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
import tempfile
from collections.abc import Sequence
from typing import Any

from dagbuild import dtypes
from dagbuild.errors import BuildError, DagbuildError, DriverError

__all__ = ["ARG_KINDS", "CudaBackend", "PackedArgs", "load_driver", "pack_args"]

INSTALL_HINT = "pip install 'dagbuild[cuda13]'"

_CTYPE = {"Q": ctypes.c_uint64, "q": ctypes.c_int64, "I": ctypes.c_uint32, "i": ctypes.c_int32,
          "f": ctypes.c_float, "d": ctypes.c_double}
#: ctypes storage type of each kernel-argument kind (the kinds and their layout come from dagbuild.dtypes).
ARG_KINDS: dict[str, type] = {k: _CTYPE[dtypes.struct_code(k)] for k in dtypes.ARG_KINDS}


# ----------------------------------------------------------------------------------------------------
# Kernel-argument packing (pure ctypes, no driver)
# ----------------------------------------------------------------------------------------------------


class PackedArgs:
    """Kernel arguments packed C-style into one buffer that starts with the ``void*`` array pointing at each.

    ``address`` is what ``kernelParams`` takes (0 when there are no arguments). The driver copies the
    values during the add/set call, so this object need only outlive that call.
    """

    __slots__ = ("buffer", "_kinds", "_offsets")

    def __init__(self, buffer: Any, kinds: tuple[str, ...], offsets: tuple[int, ...]):
        self.buffer, self._kinds, self._offsets = buffer, kinds, offsets

    @property
    def argv(self) -> Any:
        """The ``void*`` array at the buffer's start, as ctypes (for inspection)."""
        return (ctypes.c_void_p * len(self._offsets)).from_buffer(self.buffer) if self._offsets else None

    @property
    def storage(self) -> list[Any]:
        """Each argument as a ctypes object over the packed buffer (for inspection)."""
        return [ARG_KINDS[k].from_buffer(self.buffer, o) for k, o in zip(self._kinds, self._offsets, strict=True)]

    @property
    def address(self) -> int:
        return ctypes.addressof(self.buffer) if self._offsets else 0

    def __len__(self) -> int:
        return len(self._offsets)


@functools.lru_cache(maxsize=1024)
def _layout(kinds: tuple[str, ...]) -> tuple[struct.Struct, tuple[int, ...]]:
    """A native-aligned struct of the ``void*`` array (one u64 an argument) then the values, and each
    value's byte offset in it."""
    prefix = f"@{len(kinds)}Q"
    offsets = []
    for k in kinds:
        code = dtypes.struct_code(k)
        offsets.append(struct.calcsize(prefix + "0" + code))  # aligned start of the next field
        prefix += code
    return struct.Struct(prefix), tuple(offsets)


def pack_args(args: Sequence[tuple[str, int | float]]) -> PackedArgs:
    """Pack ``(kind, value)`` kernel arguments; ints are range-checked for their kind.

    The common case is one ``struct.pack_into`` (which refuses a float, or an int out of its kind's range,
    for an integer kind); anything it refuses goes through the checks below, which name the argument at
    fault. A build packs every kernel node of every bucket, so this path is kept short."""
    if not args:
        return PackedArgs(None, (), ())
    try:
        kinds = tuple([k for k, _ in args])
        layout, offsets = _layout(kinds)
        buf = ctypes.create_string_buffer(layout.size)
        base = ctypes.addressof(buf)
        layout.pack_into(buf, 0, *[base + o for o in offsets], *[v for _, v in args])
        return PackedArgs(buf, kinds, offsets)
    except (KeyError, TypeError, ValueError, OverflowError, struct.error):
        pass
    for i, arg in enumerate(args):  # explain what the fast path refused
        try:
            kind, value = arg
        except (TypeError, ValueError):
            raise BuildError(f"kernel argument #{i} must be a (kind, value) pair, got {arg!r}", code="args") from None
        if kind not in ARG_KINDS:
            raise BuildError(
                f"kernel argument #{i} has unknown kind {kind!r}; expected one of {', '.join(ARG_KINDS)}",
                code="args",
            )
        rng = dtypes.int_range(kind)
        if rng is not None:
            try:
                v = value.__index__()  # ints, numpy ints; not floats
            except (AttributeError, TypeError):
                raise BuildError(
                    f"kernel argument #{i} ({kind}) must be an integer, got {value!r}", code="args"
                ) from None
            lo, hi = rng
            if not lo <= v <= hi:
                raise BuildError(f"kernel argument #{i} ({kind}) = {v} is out of range [{lo}, {hi}]", code="args")
        else:
            try:
                float(value)
            except (TypeError, ValueError):
                raise BuildError(
                    f"kernel argument #{i} ({kind}) must be a number, got {value!r}", code="args"
                ) from None
    raise BuildError(f"kernel arguments {list(args)!r} could not be packed (a float too large for f32?)",
                     code="args")


def _dim3(name: str, dims: Sequence[int]) -> tuple[int, int, int]:
    d = tuple(int(v) for v in dims)
    if not 1 <= len(d) <= 3 or any(v < 1 for v in d):
        raise BuildError(f"{name} must be 1 to 3 positive ints, got {tuple(dims)!r}", code="launch")
    return (d + (1, 1))[:3]  # type: ignore[return-value]


def memcpy_params(drv: Any, dst: int, src: int, nbytes: int, unified: Any) -> Any:
    """A ``CUDA_MEMCPY3D`` for a 1-D copy of ``nbytes``, both sides of memory type ``unified`` (the driver's
    own enum value: CUDA's and HIP's differ in type, not in meaning)."""
    nbytes = int(nbytes)
    if nbytes <= 0:
        raise BuildError(f"memcpy of {nbytes} bytes: the driver needs > 0 (use an empty node)", code="memcpy")
    c = drv.CUDA_MEMCPY3D()
    c.srcMemoryType = unified
    c.srcDevice = int(src)
    c.srcPitch = nbytes
    c.srcHeight = 1
    c.dstMemoryType = unified
    c.dstDevice = int(dst)
    c.dstPitch = nbytes
    c.dstHeight = 1
    c.WidthInBytes = nbytes
    c.Height = 1
    c.Depth = 1
    return c


def load_driver() -> Any:
    """The driver-API module: ``cuda.bindings.driver`` (cuda-bindings ≥ 12.6), else ``cuda.cuda``
    (older cuda-python, and the HIP interop layer that mirrors it)."""
    try:
        from cuda.bindings import driver

        return driver
    except ImportError:
        pass
    try:
        from cuda import cuda as driver  # type: ignore[no-redef]

        return driver
    except ImportError as e:
        raise DagbuildError(f"cuda-bindings is not importable ({e}); install it with: {INSTALL_HINT}") from e


# ----------------------------------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------------------------------


class CudaBackend:
    """Explicit CUDA graph construction and update through the driver API (see the module docstring)."""

    name = "cuda"
    #: whether the backend can build conditional (IF/WHILE) nodes
    conditional_nodes = True
    #: whether the backend can make programmatic (early-launch) kernel → kernel edges
    programmatic_edges = True

    def __init__(self, device: int = 0):
        try:
            import cupy
        except Exception as e:
            raise DagbuildError(f"CuPy is not importable ({type(e).__name__}: {e}); install: {INSTALL_HINT}") from e
        self._drv = load_driver()
        self._streams: dict[int, Any] = {}
        self.device = int(device)
        cupy.cuda.Device(self.device).use()
        cupy.cuda.Device(self.device).synchronize()  # makes sure the primary context exists and is current
        self._check("cuInit", self._drv.cuInit(0))
        self._ctx = self._check("cuCtxGetCurrent", self._drv.cuCtxGetCurrent())
        if int(self._ctx) == 0:
            raise DriverError("cuCtxGetCurrent", "no current CUDA context after CuPy selected the device")
        self._dev = self._check("cuCtxGetDevice", self._drv.cuCtxGetDevice())
        self._blas: Any = None  # made on the first library call (child graphs)
        self._capture_stream: Any = None
        self._bodies: dict[Any, Any] | None = None  # child bodies kept by their calls (keep_child_bodies)

    # -- errors ---------------------------------------------------------------------------------------

    def _status(self, err: Any) -> str:
        name = getattr(err, "name", None) or f"CUresult {int(err)}"
        try:
            e2, text = self._drv.cuGetErrorString(err)
            if int(e2) == 0 and text:
                return f"{name} ({text.decode() if isinstance(text, bytes) else text})"
        except Exception:
            pass
        return name

    def _check(self, call: str, result: Any) -> Any:
        """Unpack a driver call's ``(err, *outs)``: raise DriverError(call, status) unless err is success;
        return None, the one output, or a tuple of outputs."""
        if not isinstance(result, tuple):
            result = (result,)
        err, outs = result[0], result[1:]
        if int(err) != 0:
            raise DriverError(call, self._status(err))
        if not outs:
            return None
        return outs[0] if len(outs) == 1 else outs

    # -- handles --------------------------------------------------------------------------------------

    def _node(self, node: Any) -> Any:
        return node if isinstance(node, self._drv.CUgraphNode) else self._drv.CUgraphNode(init_value=int(node))

    def _deps(self, deps: Sequence[Any]) -> list[Any]:
        seen: set[int] = set()
        out = []
        for d in deps:
            n = self._node(d)
            if int(n) not in seen:  # the driver refuses duplicate dependencies
                seen.add(int(n))
                out.append(n)
        return out

    def _stream(self, stream: int) -> Any:
        """The driver's handle object for a stream address, made once per stream (launch is per step)."""
        handle = self._streams.get(stream)
        if handle is None:
            handle = self._streams[stream] = self._drv.CUstream(init_value=int(stream))
        return handle

    @staticmethod
    def node_id(node: Any) -> int:
        """A node's integer address (stable for the node's lifetime; use it as a dict key)."""
        return int(node)

    # -- device ---------------------------------------------------------------------------------------

    def _attr(self, name: str) -> int:
        attr = getattr(self._drv.CUdevice_attribute, f"CU_DEVICE_ATTRIBUTE_{name}")
        return int(self._check("cuDeviceGetAttribute", self._drv.cuDeviceGetAttribute(attr, self._dev)))

    def limits(self) -> dict:
        """Launch limits and identity of the device."""
        raw = self._check("cuDeviceGetName", self._drv.cuDeviceGetName(256, self._dev))
        name = raw.split(b"\0", 1)[0].decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        return {
            "name": name,
            "compute_capability": (
                self._attr("COMPUTE_CAPABILITY_MAJOR"),
                self._attr("COMPUTE_CAPABILITY_MINOR"),
            ),
            "max_threads_per_block": self._attr("MAX_THREADS_PER_BLOCK"),
            "max_block_dim": tuple(self._attr(f"MAX_BLOCK_DIM_{a}") for a in "XYZ"),
            "max_grid_dim": tuple(self._attr(f"MAX_GRID_DIM_{a}") for a in "XYZ"),
            "max_shared_per_block": self._attr("MAX_SHARED_MEMORY_PER_BLOCK"),
            "max_shared_per_block_optin": self._attr("MAX_SHARED_MEMORY_PER_BLOCK_OPTIN"),
            "multiprocessor_count": self._attr("MULTIPROCESSOR_COUNT"),
            "warp_size": self._attr("WARP_SIZE"),
        }

    def set_max_dynamic_shared(self, func: int, nbytes: int) -> None:
        """Let ``func`` launch with up to ``nbytes`` of dynamic shared memory (needed above 48 KiB)."""
        attr = self._drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        self._check(
            "cuFuncSetAttribute",
            self._drv.cuFuncSetAttribute(self._drv.CUfunction(init_value=int(func)), attr, int(nbytes)),
        )

    def max_active_blocks(self, func: int, threads: int, shared: int) -> int | None:
        """How many blocks of ``func`` one SM holds at once with ``threads`` threads and ``shared`` bytes of
        dynamic shared memory (registers, shared memory and block limits); None where the driver cannot say."""
        call = getattr(self._drv, "cuOccupancyMaxActiveBlocksPerMultiprocessor", None)
        if call is None:
            return None
        return int(self._check("cuOccupancyMaxActiveBlocksPerMultiprocessor",
                               call(self._drv.CUfunction(init_value=int(func)), int(threads), int(shared))))

    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) device memory in bytes."""
        free, total = self._check("cuMemGetInfo", self._drv.cuMemGetInfo())
        return int(free), int(total)

    def synchronize(self, stream: int) -> None:
        self._check("cuStreamSynchronize", self._drv.cuStreamSynchronize(self._stream(stream)))

    # -- struct builders (shared by add_* and set_*) ---------------------------------------------------

    def _kernel_params(
        self,
        func: int,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        shared: int,
        argv_address: int,
    ) -> Any:
        """The kernel-node params struct. The one place where HIP differs (see backends/hip.py)."""
        p = self._drv.CUDA_KERNEL_NODE_PARAMS()
        p.func = self._drv.CUfunction(init_value=int(func))
        p.gridDimX, p.gridDimY, p.gridDimZ = grid
        p.blockDimX, p.blockDimY, p.blockDimZ = block
        p.sharedMemBytes = int(shared)
        p.kernelParams = int(argv_address)
        p.extra = 0
        return p

    def _kernel_node(self, func, grid, block, shared, args) -> tuple[Any, PackedArgs]:
        packed = pack_args(args)
        if int(shared) < 0:
            raise BuildError(f"shared memory bytes must be >= 0, got {shared}", code="launch")
        p = self._kernel_params(int(func), _dim3("grid", grid), _dim3("block", block), int(shared), packed.address)
        return p, packed  # the caller keeps `packed` alive through the driver call

    def _memcpy_params(self, dst: int, src: int, nbytes: int) -> Any:
        # the direction follows from the addresses (UVA)
        return memcpy_params(self._drv, dst, src, nbytes, self._drv.CUmemorytype.CU_MEMORYTYPE_UNIFIED)

    def _memset_params(self, dst: int, value: int, element_size: int, count: int) -> Any:
        element_size, count, value = int(element_size), int(count), int(value)
        if element_size not in (1, 2, 4):
            raise BuildError(f"memset element size must be 1, 2 or 4 bytes, got {element_size}", code="memset")
        if count <= 0:
            raise BuildError(f"memset of {count} elements: the driver needs > 0", code="memset")
        if not 0 <= value < 2 ** (8 * element_size):
            raise BuildError(
                f"memset value {value:#x} does not fit {element_size} byte(s); give the unsigned bit pattern",
                code="memset",
            )
        m = self._drv.CUDA_MEMSET_NODE_PARAMS()
        m.dst = int(dst)
        m.value = value
        m.elementSize = element_size
        m.width = count
        m.height = 1
        m.pitch = count * element_size  # unused for height 1
        return m

    # -- graph building -------------------------------------------------------------------------------

    def graph_create(self) -> Any:
        return self._check("cuGraphCreate", self._drv.cuGraphCreate(0))

    def graph_destroy(self, graph: Any) -> None:
        self._check("cuGraphDestroy", self._drv.cuGraphDestroy(graph))

    def add_kernel(self, graph, deps, func, grid, block, shared, args) -> Any:
        p, packed = self._kernel_node(func, grid, block, shared, args)
        d = self._deps(deps)
        node = self._check("cuGraphAddKernelNode", self._drv.cuGraphAddKernelNode(graph, d, len(d), p))
        del packed  # the driver has copied the argument values
        return node

    def add_memcpy(self, graph, deps, dst: int, src: int, nbytes: int) -> Any:
        c = self._memcpy_params(dst, src, nbytes)
        d = self._deps(deps)
        return self._check("cuGraphAddMemcpyNode", self._drv.cuGraphAddMemcpyNode(graph, d, len(d), c, self._ctx))

    def add_memset(self, graph, deps, dst: int, value: int, element_size: int, count: int) -> Any:
        m = self._memset_params(dst, value, element_size, count)
        d = self._deps(deps)
        return self._check("cuGraphAddMemsetNode", self._drv.cuGraphAddMemsetNode(graph, d, len(d), m, self._ctx))

    def add_empty(self, graph, deps) -> Any:
        d = self._deps(deps)
        return self._check("cuGraphAddEmptyNode", self._drv.cuGraphAddEmptyNode(graph, d, len(d)))

    def _edge_data(self, kind: str) -> Any:
        edge = self._drv.CUgraphEdgeData()  # a default one is a plain edge
        if kind == "programmatic":
            # The PROGRAMMATIC port (not LAUNCH_ORDER): the consumer may launch once every block of the
            # producer has executed griddepcontrol.launch_dependents (or exited), so the producer decides how
            # early; its griddepcontrol.wait still waits for the producer's completion and memory.
            edge.type = self._drv.CUgraphDependencyType.CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC
            edge.from_port = int(self._drv.CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC)
        elif kind != "plain":
            raise BuildError(f"unknown edge kind {kind!r}; expected plain or programmatic", code="edge")
        return edge

    def add_dependency(self, graph, src, dst, kind: str = "plain") -> None:
        """One edge ``src → dst`` of ``kind`` (``plain`` or ``programmatic``: kernel nodes only)."""
        edge = self._edge_data(kind)
        drv = self._drv
        add = getattr(drv, "cuGraphAddDependencies_v2", None) or drv.cuGraphAddDependencies  # 12.x has _v2
        self._check("cuGraphAddDependencies", add(graph, [self._node(src)], [self._node(dst)], [edge], 1))

    # -- child graphs: library work recorded by stream capture ----------------------------------------

    def _library(self) -> Any:
        from dagbuild.backends.blas import Blas

        return Blas(hip=self.name == "hip")

    def library_call(self, call: str, args: Any, stream: int) -> None:
        """Issue one library call (``call``, ``args`` as ``((name, dtype, value), ...)``) on ``stream``."""
        if self._blas is None:
            self._blas = self._library()
        self._blas.run(call, {name: (dtype, value) for name, dtype, value in args}, int(stream))

    def capture(self, calls: Sequence[tuple[str, Any]]) -> Any:
        """A new graph holding ``calls`` (``(call, args)`` pairs), recorded by stream capture on a stream of
        the backend's own (relaxed mode: libraries may make calls that global mode refuses). The caller
        destroys it. (Recording on threads, each with its own stream and handle, measured slower: NOTES.md,
        2026-12-07 ninth.)"""
        drv = self._drv
        if self._capture_stream is None:
            flags = int(drv.CUstream_flags.CU_STREAM_NON_BLOCKING)
            self._capture_stream = self._check("cuStreamCreate", drv.cuStreamCreate(flags))
        s = self._capture_stream
        mode = drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED
        self._check("cuStreamBeginCapture", drv.cuStreamBeginCapture(s, mode))
        try:
            for call, args in calls:
                self.library_call(call, args, int(s))
        except BaseException:
            err, g = drv.cuStreamEndCapture(s)
            if int(err) == 0 and g is not None and int(g):
                drv.cuGraphDestroy(g)
            raise
        return self._check("cuStreamEndCapture", drv.cuStreamEndCapture(s))

    def keep_child_bodies(self) -> None:
        """From now on keep each recorded child body, by its calls, until drop_child_bodies(): graphs whose child
        calls are equal then share one recording (a pool's buckets with one padded GEMM row count: the fused
        spec's gemm_pad; cuBLAS spends ~26 µs of host time on a repeated GEMM capture)."""
        if self._bodies is None:
            self._bodies = {}

    def drop_child_bodies(self) -> None:
        """Free the kept child bodies (the nodes made from them hold clones) and stop keeping them."""
        bodies, self._bodies = self._bodies or {}, None
        for g in bodies.values():
            self.graph_destroy(g)

    def add_child_graph(self, graph, deps, calls) -> Any:
        """Add ``calls`` as one child-graph node (the node holds a clone of the graph): recorded now, or the
        body kept from equal calls (keep_child_bodies)."""
        kept = self._bodies
        body = kept.get(calls) if kept is not None else None
        fresh = body is None
        if fresh:
            body = self.capture(calls)
        try:
            d = self._deps(deps)
            return self._check("cuGraphAddChildGraphNode", self._drv.cuGraphAddChildGraphNode(graph, d, len(d), body))
        finally:
            if fresh and kept is not None:
                kept[calls] = body
            elif fresh:
                self.graph_destroy(body)

    def set_child_graph(self, exec_, node, calls) -> None:
        """Record ``calls`` again and update the child node of an executable graph in place. The driver
        needs the same topology as before (a library that picks other kernels for the new arguments makes
        the update fail: the DriverError says so)."""
        child = self.capture(calls)
        try:
            self._check("cuGraphExecChildGraphNodeSetParams",
                        self._drv.cuGraphExecChildGraphNodeSetParams(exec_, self._node(node), child))
        finally:
            self.graph_destroy(child)

    # -- conditional (WHILE) nodes: a spec's loop node ---------------------------------------------------

    def conditional_handle(self, graph: Any) -> Any:
        """A condition handle for a conditional node that will be added to ``graph`` (reset to 0 at every
        launch; a kernel sets it with cudaGraphSetConditional). ``int(handle)`` is the kernels' argument."""
        drv = self._drv
        return self._check("cuGraphConditionalHandleCreate", drv.cuGraphConditionalHandleCreate(
            graph, self._ctx, 0, int(drv.CU_GRAPH_COND_ASSIGN_DEFAULT)))

    def add_while(self, graph, deps, handle: Any) -> tuple[Any, Any]:
        """A WHILE conditional node after ``deps``: (node, body graph). The body runs while the handle's
        value is non-zero when the node starts and after each run of the body."""
        drv = self._drv
        params = drv.CUgraphNodeParams()
        params.type = drv.CUgraphNodeType.CU_GRAPH_NODE_TYPE_CONDITIONAL
        params.conditional.handle = handle
        params.conditional.type = drv.CUgraphConditionalNodeType.CU_GRAPH_COND_TYPE_WHILE
        params.conditional.size = 1
        params.conditional.ctx = self._ctx
        d = self._deps(deps)
        add = getattr(drv, "cuGraphAddNode_v2", None) or drv.cuGraphAddNode  # 12.x: _v2 takes edge data
        node = self._check("cuGraphAddNode", add(graph, d, None, len(d), params))
        return node, params.conditional.phGraph_out[0]

    # -- executable graphs ----------------------------------------------------------------------------

    def instantiate(self, graph: Any) -> Any:
        """Instantiate ``graph`` (flags 0). On failure the DriverError's detail gives the driver's
        CUgraphInstantiateResult and the failing node's type and address, and ``err.err_node`` holds
        that node (None when the driver named none)."""
        drv = self._drv
        if not hasattr(drv, "cuGraphInstantiateWithParams"):
            return self._check("cuGraphInstantiate", drv.cuGraphInstantiate(graph, 0))
        params = drv.CUDA_GRAPH_INSTANTIATE_PARAMS()
        params.flags = 0
        result = drv.cuGraphInstantiateWithParams(graph, params)
        if int(result[0]) == 0:
            return result[1]
        detail = []
        res = params.result_out
        detail.append(f"instantiate result {getattr(res, 'name', res)}")
        err_node = params.hErrNode_out
        if err_node is not None and int(err_node) != 0:
            try:
                kind = self.node_type(err_node)
            except DagbuildError:
                kind = "?"
            detail.append(f"failing node: {kind} node {int(err_node):#x}")
        else:
            err_node = None
        e = DriverError("cuGraphInstantiateWithParams", self._status(result[0]), detail="; ".join(detail))
        e.err_node = err_node  # type: ignore[attr-defined]
        raise e

    def exec_destroy(self, exec_: Any) -> None:
        self._check("cuGraphExecDestroy", self._drv.cuGraphExecDestroy(exec_))

    def upload(self, exec_: Any, stream: int) -> None:
        self._check("cuGraphUpload", self._drv.cuGraphUpload(exec_, self._stream(stream)))

    def launch(self, exec_: Any, stream: int) -> None:
        self._check("cuGraphLaunch", self._drv.cuGraphLaunch(exec_, self._stream(stream)))

    # -- in-place updates of an executable graph --------------------------------------------------------

    def set_kernel(self, exec_, node, func, grid, block, shared, args) -> None:
        p, packed = self._kernel_node(func, grid, block, shared, args)
        self._check(
            "cuGraphExecKernelNodeSetParams",
            self._drv.cuGraphExecKernelNodeSetParams(exec_, self._node(node), p),
        )
        del packed

    def set_memcpy(self, exec_, node, dst: int, src: int, nbytes: int) -> None:
        c = self._memcpy_params(dst, src, nbytes)
        self._check(
            "cuGraphExecMemcpyNodeSetParams",
            self._drv.cuGraphExecMemcpyNodeSetParams(exec_, self._node(node), c, self._ctx),
        )

    def set_memset(self, exec_, node, dst: int, value: int, element_size: int, count: int) -> None:
        m = self._memset_params(dst, value, element_size, count)
        self._check(
            "cuGraphExecMemsetNodeSetParams",
            self._drv.cuGraphExecMemsetNodeSetParams(exec_, self._node(node), m, self._ctx),
        )

    # -- introspection --------------------------------------------------------------------------------

    def debug_dot(self, graph: Any, flags: int | None = None) -> str:
        """The driver's DOT description of ``graph`` (verbose unless ``flags`` says otherwise)."""
        if flags is None:
            flags = int(self._drv.CUgraphDebugDot_flags.CU_GRAPH_DEBUG_DOT_FLAGS_VERBOSE)
        fd, path = tempfile.mkstemp(prefix="dagbuild-", suffix=".dot")
        os.close(fd)
        try:
            self._check("cuGraphDebugDotPrint", self._drv.cuGraphDebugDotPrint(graph, path.encode(), int(flags)))
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass

    def graph_nodes(self, graph: Any) -> list:
        """All nodes of ``graph`` (driver order)."""
        _nodes, count = self._check("cuGraphGetNodes", self._drv.cuGraphGetNodes(graph, 0))
        if int(count) == 0:
            return []
        nodes, count = self._check("cuGraphGetNodes", self._drv.cuGraphGetNodes(graph, int(count)))
        return list(nodes)[: int(count)]

    def node_type(self, node: Any) -> str:
        """``kernel``, ``memcpy``, ``memset``, ``empty``, ``host``, ``graph``, ``conditional``, ...: the
        CUgraphNodeType name without its ``CU_GRAPH_NODE_TYPE_`` prefix, lower-cased."""
        t = self._check("cuGraphNodeGetType", self._drv.cuGraphNodeGetType(self._node(node)))
        name = getattr(t, "name", None)
        return name.removeprefix("CU_GRAPH_NODE_TYPE_").lower() if name else str(int(t))

    def node_deps(self, graph: Any, node: Any) -> list:
        """The nodes ``node`` depends on. ``graph`` is unused by CUDA (kept for symmetry)."""
        return [d for d, _ in self.node_dep_edges(node)]

    def node_dep_edges(self, node: Any) -> list[tuple[Any, str]]:
        """The nodes ``node`` depends on, each with its edge kind (``plain`` or ``programmatic``)."""
        n = self._node(node)
        first = self._check("cuGraphNodeGetDependencies", self._drv.cuGraphNodeGetDependencies(n, 0))
        count = int(first[-1])
        if count == 0:
            return []
        outs = self._check("cuGraphNodeGetDependencies", self._drv.cuGraphNodeGetDependencies(n, count))
        deps = list(outs[0])[: int(outs[-1])]
        if len(outs) < 3:  # CUDA 12 bindings: no edge data
            return [(d, "plain") for d in deps]
        programmatic = int(self._drv.CUgraphDependencyType.CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC)
        return [(d, "programmatic" if int(e.type) == programmatic else "plain")
                for d, e in zip(deps, list(outs[1])[: len(deps)], strict=True)]

    def close(self) -> None:
        """Free the kept child bodies, the BLAS handle and the capture stream; callers destroy the graphs and
        executables they made; the context is CuPy's."""
        self.drop_child_bodies()
        if self._blas is not None:
            self._blas.close()
            self._blas = None
        if self._capture_stream is not None:
            self._check("cuStreamDestroy", self._drv.cuStreamDestroy(self._capture_stream))
            self._capture_stream = None
