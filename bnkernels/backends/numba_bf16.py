"""bfloat16 inside the numba backend's kernels: its conversions.

Numba has no bfloat16 type (NumPy's is ml_dtypes'), so the kernels see
bfloat16 arrays as their int16 bits: int16, not uint16, so that Numba
compiles them apart from float16 data (uint16 bits) and ``numba_half``'s
loads and stores dispatch on the integer type. bfloat16 is the top half of
a float32, so both conversions are bit arithmetic that vectorizes (no
branch, no table), exact for every bit pattern:

- :func:`bf16_value`: bits -> float32, ``bits << 16``;
- :func:`bf16_bits`: float32 -> bits, rounded to nearest even by adding
  ``0x7FFF`` plus the lowest kept bit; the carry makes a value beyond the
  largest bfloat16 Inf, as ``astype`` does. NaN becomes the quiet NaN of its
  sign (``0x7FC0``/``0xFFC0``), as ml_dtypes' conversion gives.
"""
from __future__ import annotations

import numpy as np
from numba import njit

# Numba widens uint32 arithmetic to 64 bits: every constant below is an
# explicit np.uint32 (as in numba_half).
_U16, _U1 = np.uint32(16), np.uint32(1)
_ABS, _INF = np.uint32(0x7FFFFFFF), np.uint32(0x7F800000)
_ROUND = np.uint32(0x7FFF)  # below half a bfloat16 unit: ties go up only with an odd kept bit
_SIGN16, _QNAN16 = np.uint32(0x8000), np.uint32(0x7FC0)


@njit(inline="always")
def bf16_value(b):
    """bfloat16 bits (int16) -> float32 value: the bits are a float32's top
    half (through uint16, so that the sign bit is not extended)."""
    return np.uint32(np.uint32(np.uint16(b)) << _U16).view(np.float32)


@njit(inline="always")
def bf16_bits(f):
    """float32 value -> bfloat16 bits (int16), rounded to nearest even; NaN
    stays a quiet NaN of its sign."""
    u = np.float32(f).view(np.uint32)
    rounded = np.uint32(np.uint32(u + _ROUND + ((u >> _U16) & _U1)) >> _U16)
    nan = np.uint32(((u >> _U16) & _SIGN16) | _QNAN16)
    return np.int16(np.uint16(nan if (u & _ABS) > _INF else rounded))
