"""Buffer memory: allocation (an :class:`Arena`), accepting memory from outside, and views by name.

An executable binds every buffer of its plan to an :class:`ArrayRef` (base address, size, owner). Its
own buffers come from an :class:`Arena`; a pool allocates one arena at the largest bucket and hands it
to every bucket's executable, which then views prefixes of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .dtypes import ITEMSIZE, NP_DTYPE
from .errors import BuildError
from .ir import PlanBuffer

_ALSO_OK = {"bf16": {np.dtype(np.int16)}}  # bf16 bits may arrive as int16 (e.g. torch's view)


@dataclass(frozen=True)
class ArrayRef:
    """Where a buffer lives: its base address, byte size, and the object that keeps it alive."""

    ptr: int
    nbytes: int
    owner: Any
    external: bool = False


class Arena(Mapping):
    """Memory for a set of buffers, allocated together and freed together: device buffers as CuPy arrays,
    pinned buffers as NumPy arrays over page-locked memory; every byte starts at zero. A mapping of buffer
    name → array, so it can be an executable's ``bound``."""

    def __init__(self, buffers: Mapping[str, PlanBuffer]):
        import cupy
        import cupyx

        self.arrays: dict[str, Any] = {}
        device = False
        for name, b in buffers.items():
            dt = NP_DTYPE[b.dtype]
            if b.memory == "pinned":
                self.arrays[name] = cupyx.zeros_pinned(b.shape, dtype=dt)
            else:
                self.arrays[name] = cupy.zeros(b.shape, dtype=dt)
                device = True
        if device:  # the zero fills ran on CuPy's current stream; graphs run on their own
            cupy.cuda.get_current_stream().synchronize()

    def ref(self, name: str) -> ArrayRef:
        a = self.arrays[name]
        ptr = a.ctypes.data if isinstance(a, np.ndarray) else a.data.ptr
        return ArrayRef(int(ptr), int(a.nbytes), a)

    def __getitem__(self, name: str) -> Any:
        return self.arrays[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.arrays)

    def __len__(self) -> int:
        return len(self.arrays)

    def close(self) -> None:
        self.arrays.clear()


def array_ref(name: str, array: Any, dtype: str, need: int, exact: bool) -> ArrayRef:
    """Accept CuPy arrays, PyTorch tensors (``__cuda_array_interface__``) or DLPack producers as the
    memory of buffer ``name``: same dtype, C-contiguous, ``need`` bytes (at least, unless ``exact``)."""
    if type(array).__name__ == "ndarray" and type(array).__module__.startswith("cupy"):  # the common case
        got, want = array.dtype, np.dtype(NP_DTYPE[dtype])
        if (got == want or got in _ALSO_OK.get(dtype, set())) and array.flags.c_contiguous and (
                array.nbytes == need if exact else array.nbytes >= need):
            return ArrayRef(int(array.data.ptr), int(array.nbytes), array, external=True)
    iface = getattr(array, "__cuda_array_interface__", None)
    if iface is None and hasattr(array, "__dlpack__"):
        import cupy

        array = cupy.from_dlpack(array)
        iface = array.__cuda_array_interface__
    if iface is None:
        raise BuildError(f"buffer {name!r}: cannot bind a {type(array).__name__}; pass device memory "
                         "(a CuPy array, a PyTorch CUDA tensor, or anything with __cuda_array_interface__)",
                         buffer=name)
    got = np.dtype(iface["typestr"])
    want = np.dtype(NP_DTYPE[dtype])
    if got != want and got not in _ALSO_OK.get(dtype, set()):
        raise BuildError(f"buffer {name!r} is {dtype} (NumPy {want}), but the array bound to it is {got}",
                         buffer=name)
    shape = tuple(iface["shape"])
    nbytes = math.prod(shape) * got.itemsize
    strides = iface.get("strides")
    if strides is not None:
        expect = tuple(int(np.prod(shape[i + 1:])) * got.itemsize for i in range(len(shape)))
        if tuple(strides) != expect and nbytes:
            raise BuildError(f"buffer {name!r}: the array bound to it is not C-contiguous", buffer=name)
    if (nbytes != need) if exact else (nbytes < need):
        raise BuildError(f"buffer {name!r} needs {'exactly ' if exact else 'at least '}{need} bytes, "
                         f"but the array bound to it has {nbytes}", buffer=name)
    return ArrayRef(int(iface["data"][0]), nbytes, array, external=True)


def pinned_ref(name: str, array: Any, b: PlanBuffer) -> tuple[ArrayRef, np.ndarray]:
    """A pinned buffer bound to a NumPy array over page-locked memory (at least ``b.nbytes``): the ref and
    a view of the buffer's shape over its first bytes."""
    if not isinstance(array, np.ndarray) or array.nbytes < b.nbytes:
        raise BuildError(f"pinned buffer {name!r} must be bound to a NumPy array over pinned memory of at "
                         f"least {b.nbytes} bytes", buffer=name)
    flat = array.reshape(-1).view(np.uint8)[: b.nbytes].view(NP_DTYPE[b.dtype]).reshape(b.shape)
    return ArrayRef(flat.ctypes.data, b.nbytes, array, external=True), flat


def device_view(ref: ArrayRef, dtype: str, shape: tuple[int, ...]) -> Any:
    """A CuPy array of ``shape`` over the first bytes of ``ref`` (the memory stays owned by ref.owner)."""
    import cupy

    n = math.prod(shape) * ITEMSIZE[dtype]
    mem = cupy.cuda.UnownedMemory(ref.ptr, n, ref.owner)
    return cupy.ndarray(shape, dtype=NP_DTYPE[dtype], memptr=cupy.cuda.MemoryPointer(mem, 0))


class BufferMap(MutableMapping):
    """``exe.buffers``: buffer name → array. Views of memory bound from outside (a pool's arena) are made
    on first access: a pool bucket whose buffers nobody reads never pays for them."""

    def __init__(self) -> None:
        self._arrays: dict[str, Any] = {}
        self._lazy: dict[str, Any] = {}

    def set_lazy(self, name: str, make: Any) -> None:
        self._arrays.pop(name, None)
        self._lazy[name] = make

    def __getitem__(self, name: str) -> Any:
        if name in self._lazy:
            self._arrays[name] = self._lazy.pop(name)()
        return self._arrays[name]

    def __setitem__(self, name: str, array: Any) -> None:
        self._lazy.pop(name, None)
        self._arrays[name] = array

    def __delitem__(self, name: str) -> None:
        if self._lazy.pop(name, None) is None:
            del self._arrays[name]

    def __iter__(self) -> Iterator[str]:
        return iter([*self._arrays, *self._lazy])

    def __len__(self) -> int:
        return len(self._arrays) + len(self._lazy)

    def clear(self) -> None:
        self._arrays.clear()
        self._lazy.clear()
