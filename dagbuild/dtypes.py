"""The one dtype table: element sizes, NumPy types, integer ranges, packing codes, bf16 rounding.

Every layer reads its dtype facts from here (spec checks, binding, buffers, argument packing, the
NumPy references), so an integer range or a rounding rule is written once.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DType:
    """One element type. ``int_range`` is closed (``lo <= v <= hi``); None for floats."""

    name: str
    itemsize: int
    numpy: Any  # NumPy storage type (bf16 is held as raw uint16 bits)
    int_range: tuple[int, int] | None = None
    struct_code: str | None = None  # struct format of a scalar kernel argument; None: not a scalar type
    float_max: float | None = None  # largest finite value of a float type


def _int(name: str, bits: int, signed: bool, np_type: Any, code: str | None) -> DType:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return DType(name, bits // 8, np_type, (lo, hi), code)


DTYPES: dict[str, DType] = {
    "i8": _int("i8", 8, True, np.int8, None),
    "u8": _int("u8", 8, False, np.uint8, None),
    "i32": _int("i32", 32, True, np.int32, "i"),
    "u32": _int("u32", 32, False, np.uint32, "I"),
    "i64": _int("i64", 64, True, np.int64, "q"),
    "u64": _int("u64", 64, False, np.uint64, "Q"),
    "f16": DType("f16", 2, np.float16, float_max=65504.0),
    "bf16": DType("bf16", 2, np.uint16, float_max=3.3895313892515355e38),
    "f32": DType("f32", 4, np.float32, struct_code="f", float_max=3.4028234663852886e38),
    "f64": DType("f64", 8, np.float64, struct_code="d", float_max=1.7976931348623157e308),
}

#: Types a scalar kernel parameter may have, and every element type of a buffer.
SCALAR_TYPES = tuple(n for n, d in DTYPES.items() if d.struct_code is not None)
ELEMENT_TYPES = tuple(DTYPES)
ITEMSIZE = {n: d.itemsize for n, d in DTYPES.items()}
NP_DTYPE = {n: d.numpy for n, d in DTYPES.items()}
INT_RANGE = {n: d.int_range for n, d in DTYPES.items() if d.int_range is not None}

#: Argument kinds the backends pack: a pointer (``ptr``, 64-bit address) or a scalar type.
ARG_KINDS = ("ptr", *SCALAR_TYPES)
POINTER_RANGE = (0, 2**64 - 1)


def struct_code(kind: str) -> str:
    """The ``struct`` format character of an argument kind (``ptr`` is a u64 address)."""
    return "Q" if kind == "ptr" else DTYPES[kind].struct_code  # type: ignore[return-value]


def int_range(kind: str) -> tuple[int, int] | None:
    """Closed range of an integer argument kind (``ptr`` included); None for floats."""
    return POINTER_RANGE if kind == "ptr" else DTYPES[kind].int_range


def check_scalar(dtype: str, value: Any) -> int | float:
    """``value`` as a ``dtype`` scalar, or ValueError saying why it is not one.

    Integers must be whole numbers (``2.0`` is refused: a float where an integer is needed is a
    mistake in a spec) within the closed range; floats must be finite in ``dtype`` unless they are
    already infinite or NaN (an explicit ``inf`` is the user's choice, an overflow is not).
    """
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{value!r} is not a number")
    d = DTYPES[dtype]
    if d.int_range is not None:
        if not isinstance(value, int | np.integer):
            raise ValueError(f"{value!r} is not an integer, but {dtype} needs one")
        lo, hi = d.int_range
        v = int(value)
        if not lo <= v <= hi:
            raise ValueError(f"{v} does not fit in {dtype} [{lo}, {hi}]")
        return v
    try:
        v = float(value)
    except OverflowError:
        raise ValueError(f"{value} does not fit in {dtype}") from None
    if math.isfinite(v) and abs(v) > d.float_max:  # type: ignore[operator]
        raise ValueError(f"{v} does not fit in {dtype} (largest finite value {d.float_max:.7g})")
    return v


def bf16_bits(xp: Any, x: Any) -> Any:
    """f32 values → bf16 bit patterns (uint16), rounded to nearest even; NaN stays NaN.

    ``xp`` is NumPy or CuPy: the same rounding on the host and on the device."""
    bits = xp.ascontiguousarray(x, dtype=xp.float32).view(xp.uint32)
    rounded = ((bits + xp.uint32(0x7FFF) + ((bits >> xp.uint32(16)) & xp.uint32(1))) >> xp.uint32(16))
    out = rounded.astype(xp.uint16)
    nan = xp.isnan(xp.ascontiguousarray(x, dtype=xp.float32))
    return xp.where(nan, xp.uint16(0x7FC0), out)


def bf16_to_f32(xp: Any, bits: Any) -> Any:
    """bf16 bit patterns (uint16) → f32, exactly."""
    return (xp.asarray(bits, dtype=xp.uint16).astype(xp.uint32) << xp.uint32(16)).view(xp.float32)


def scalar_bits(dtype: str, value: int | float) -> int:
    """The bit pattern of one ``dtype`` element holding ``value`` (checked by :func:`check_scalar`)."""
    v = check_scalar(dtype, value)
    d = DTYPES[dtype]
    if d.int_range is not None:
        return int(v) & ((1 << (8 * d.itemsize)) - 1)
    if dtype == "bf16":
        return int(bf16_bits(np, np.array([v], np.float32))[0])
    if dtype == "f16":
        return int(np.array(v, np.float16).view(np.uint16))
    code = {"f32": ("<f", "<I"), "f64": ("<d", "<Q")}[dtype]
    return struct.unpack(code[1], struct.pack(code[0], v))[0]
