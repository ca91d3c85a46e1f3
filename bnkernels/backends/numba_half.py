"""16-bit floats inside the numba backend's kernels: loads and stores.

Numba has no CPU float16 or bfloat16 type, so the kernels see float16
arrays as their uint16 bits and bfloat16 arrays as their int16 bits
(``numba_bf16``: its conversions). They load elements through
:func:`to_work`, which gives the working type: float32 for 16-bit data,
float64 for float32 and float64 data; per-channel values are cast to it by
:func:`work_value`, and results are written by :func:`store`, each
dispatching on the integer type. float32 work on float16 data (differences
``x - k`` that the kernels then sum in float64, and the elementwise
``(x - k) * scale + shift``) costs float32 roundings of 2^-13 of a float16
unit each (2^-16 of a bfloat16 unit), while float64 would halve the vector
width and double the conversion work for nothing visible in a 16-bit
result.

Two implementations of the float16 conversions, both exact:

- native (:data:`NATIVE_HALF`): LLVM's ``half`` type, which compiles to the
  F16C instructions (``vcvtph2ps``/``vcvtps2ph``) and vectorizes. Used when
  the CPU Numba compiles for has F16C (x86-64 since 2012; Numba's
  ``NUMBA_CPU_FEATURES`` is honoured). Without F16C LLVM would emit calls to
  compiler-rt helpers that Numba's JIT may not find, so it is not used.
- portable bit arithmetic (:func:`half_value`, :func:`half_bits`),
  branch-light so loops still vectorize (F. Giesen's conversions).

Stores round to nearest even, as NumPy's ``astype(float16)``.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import config, njit, types
from numba.core.codegen import get_host_cpu_features
from numba.extending import intrinsic, overload

from .numba_bf16 import bf16_bits, bf16_value


def _compile_target_has_f16c() -> bool:
    """Whether the CPU Numba compiles for (``NUMBA_CPU_FEATURES`` or the
    host's) has F16C."""
    features = config.CPU_FEATURES if config.CPU_FEATURES is not None else get_host_cpu_features()
    return "+f16c" in str(features).split(",")


#: True when the kernels convert float16 with F16C instructions.
NATIVE_HALF = _compile_target_has_f16c()


# --- native: LLVM half --------------------------------------------------------

@intrinsic
def prefer_wide_vectors_for(typingctx, a):
    """In a function that sums 16-bit array ``a`` (its bits), ask LLVM to
    vectorize 512 bits wide where the CPU can (it prefers 256 bits on
    AVX-512 Intel CPUs). float16 sums convert and accumulate in float64 and
    are compute-bound: 8 float64 lanes instead of 4 made resnet-56 float16
    training 1.16 -> 0.79 ms and backward 1.56 -> 1.27 ms here; bfloat16
    sums accumulate alike (not measured apart). For float32 and float64
    data it does nothing (it made float32 slower).
    Emits no code. llvmlite has no API for string attributes, so the
    attribute is added to the set it writes; if that ever fails, the code
    is simply vectorized 256 bits wide."""
    def codegen(context, builder, signature, args):
        if _is_half(signature.args[0].dtype):
            try:
                set.add(builder.function.attributes, '"prefer-vector-width"="512"')
            except Exception:  # pragma: no cover - a llvmlite that keeps attributes otherwise
                pass
        return context.get_dummy_value()
    return types.none(a), codegen


@intrinsic
def half_to_f32_native(typingctx, h):
    """float16 bits (uint16) -> float32 value by LLVM ``fpext half``."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def f32_to_half_native(typingctx, f):
    """float32 value -> float16 bits by LLVM ``fptrunc`` (round to nearest
    even; overflow gives Inf, NaN stays NaN)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


# --- portable: bit arithmetic ---------------------------------------------------
# Numba widens uint32 arithmetic to 64 bits and unifies uint64 with int64 as
# float64: every constant and intermediate below is an explicit np.uint32.

_F16_MAX = np.uint32((127 + 16) << 23)  # first float32 that overflows float16
_F32_INF = np.uint32(255 << 23)
_DENORM_MAGIC = np.uint32(((127 - 15) + (23 - 10) + 1) << 23)
_DENORM_MAGIC_F = _DENORM_MAGIC.view(np.float32)  # 0.5: aligns the 10 mantissa bits at the bottom
_MIN_NORMAL = np.uint32(113 << 23)  # smallest float32 that is a normal float16
_REBIAS = np.uint32((((15 - 127) << 23) + 0xFFF) & 0xFFFFFFFF)
_SIGN, _QNAN16, _INF16 = np.uint32(0x80000000), np.uint32(0x7E00), np.uint32(0x7C00)
_U1, _U13, _U16 = np.uint32(1), np.uint32(13), np.uint32(16)


@njit(inline="always")
def half_bits(f):
    """float32 value -> float16 bits, round to nearest even (as NumPy's
    astype(float16)); NaN stays NaN, overflow gives Inf.

    F. Giesen's float_to_half_fast3_rtne: subnormals are rounded by a float
    addition of a magic number, normals by adding the rounding bias to the
    bits.
    """
    bits = np.float32(f).view(np.uint32)
    sign = np.uint32(bits & _SIGN)
    u = np.uint32(bits ^ sign)
    if u >= _F16_MAX:  # Inf or NaN (or overflow)
        o = _QNAN16 if u > _F32_INF else _INF16
    elif u < _MIN_NORMAL:  # subnormal float16 or zero
        summed = np.float32(u.view(np.float32) + _DENORM_MAGIC_F)
        o = np.uint32(summed.view(np.uint32) - _DENORM_MAGIC)
    else:
        o = np.uint32(np.uint32(u + _REBIAS + ((u >> _U13) & _U1)) >> _U13)
    return np.uint16(np.uint32(o | (sign >> _U16)))


_EXP16_SHIFTED = np.uint32(0x7C00 << 13)  # float16 exponent bits, moved to float32 place
_REBIAS_IN = np.uint32((127 - 15) << 23)
_INF_NAN_ADJ = np.uint32((128 - 16) << 23)
_U23 = np.uint32(1 << 23)
_SUBNORMAL_MAGIC_F = np.uint32(113 << 23).view(np.float32)  # 2^-14


@njit  # not IR-inlined: Numba's IR inliner trips over its branches (LLVM inlines it)
def half_value(h):
    """float16 bits -> float32 value, exact for every bit pattern
    (F. Giesen's half_to_float_fast5)."""
    h32 = np.uint32(h)
    o = np.uint32((h32 & np.uint32(0x7FFF)) << _U13)
    exp = np.uint32(o & _EXP16_SHIFTED)
    o = np.uint32(o + _REBIAS_IN)
    if exp == _EXP16_SHIFTED:  # Inf or NaN
        o = np.uint32(o + _INF_NAN_ADJ)
    elif exp == 0:  # zero or subnormal: renormalize with a float subtraction
        f = np.float32(np.uint32(o + _U23).view(np.float32) - _SUBNORMAL_MAGIC_F)
        o = f.view(np.uint32)
    o = np.uint32(o | ((h32 & np.uint32(0x8000)) << _U16))
    return o.view(np.float32)


# --- what the kernels call --------------------------------------------------------

def _is_half(t) -> bool:
    """16-bit floats reach the kernels as their bits: float16 as uint16,
    bfloat16 as int16 (:func:`_is_bfloat16`)."""
    return isinstance(t, types.Integer)


def _is_bfloat16(t) -> bool:
    return isinstance(t, types.Integer) and t.signed


def _to_f32(t):
    """The bits -> float32 conversion for 16-bit elements of type ``t``."""
    if _is_bfloat16(t):
        return bf16_value
    return half_to_f32_native if NATIVE_HALF else half_value


def _from_f32(t):
    """The float32 -> bits conversion (to nearest even) for elements of type ``t``."""
    if _is_bfloat16(t):
        return bf16_bits
    return f32_to_half_native if NATIVE_HALF else half_bits


def to_work(v):
    """Load an element in the elementwise working type: float32 for
    16-bit data, float64 otherwise (stub)."""


@overload(to_work, inline="always")
def _to_work(v):
    if _is_half(v):
        convert = _to_f32(v)
        return lambda v: convert(v)
    return lambda v: np.float64(v)


def work_value(a, v):
    """The float64 scalar ``v`` in the working type of array ``a``'s
    elements (stub)."""


@overload(work_value, inline="always")
def _work_value(a, v):
    if _is_half(a.dtype):
        return lambda a, v: np.float32(v)
    return lambda a, v: np.float64(v)


def store(out, idx, v):
    """Store a working-type value in the output's dtype, rounded once to
    nearest even (stub)."""


@overload(store, inline="always")
def _store(out, idx, v):
    if _is_half(out.dtype):
        convert = _from_f32(out.dtype)
        def impl(out, idx, v):
            out[idx] = convert(np.float32(v))
    else:
        def impl(out, idx, v):
            out[idx] = v
    return impl
