"""16-bit conversions of the numba backend (``numba_half``): float16's,
both the native F16C one and the portable bit arithmetic, and bfloat16's
(``numba_bf16``), called from compiled loops as the kernels call them,
against NumPy's (ml_dtypes') conversions bit for bit; the loads and stores
dispatching on the bits' integer type; and the whole backend compiled
without F16C."""
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("numba")
from numba import njit  # noqa: E402

from bnkernels.backends import numba_half as nh  # noqa: E402
from bnkernels.backends import numba_bf16  # noqa: E402
from helpers import bfloat16  # noqa: E402

ALL_BITS = np.arange(65536, dtype=np.uint32).astype(np.uint16)


def _elementwise(convert):
    """A compiled loop ``out[i] = convert(a[i])``, as the kernels call it."""
    @njit
    def run(a, out):
        for i in range(a.size):
            out[i] = convert(a[i])
    return run


LOADERS = {"portable": _elementwise(nh.half_value), "native": _elementwise(nh.half_to_f32_native)}
STORERS = {"portable": _elementwise(nh.half_bits), "native": _elementwise(nh.f32_to_half_native)}


def _needs(kind):
    if kind == "native" and not nh.NATIVE_HALF:
        pytest.skip("the CPU Numba compiles for has no F16C")


def hard_float32_values():
    """Every finite float16, every midpoint between neighbours (ties to
    even), the float32 values just beside each midpoint, subnormals,
    overflow, Inf, signed zeros and values far below the float16 range."""
    halves = ALL_BITS.view(np.float16)
    finite = np.sort(halves[np.isfinite(halves)].astype(np.float64))
    mids = ((finite[:-1] + finite[1:]) / 2).astype(np.float32)  # exact: 12 bits
    return np.concatenate([
        finite.astype(np.float32), mids, np.nextafter(mids, np.float32(np.inf)),
        np.nextafter(mids, np.float32(-np.inf)),
        np.array([65504.0, 65519.99, 65520.0, 1e6, -1e6, 3e38, 1e-8, -1e-8, 2.0**-25, 2.0**-24 * 1.5, 1e-40,
                  0.0, -0.0, np.inf, -np.inf], np.float32)])


@pytest.mark.parametrize("kind", ["portable", "native"])
def test_loads_are_exact_for_every_bit_pattern(kind):
    _needs(kind)
    got = np.empty(65536, np.float32)
    LOADERS[kind](ALL_BITS, got)
    expected = ALL_BITS.view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), expected[~nan].view(np.uint32))  # -0, Inf too
    assert np.isnan(got[nan]).all()


@pytest.mark.parametrize("kind", ["portable", "native"])
def test_stores_round_like_numpy(kind):
    _needs(kind)
    values = hard_float32_values()
    got = np.empty(values.size, np.uint16)
    STORERS[kind](values, got)
    with np.errstate(over="ignore"):  # 1e6 -> inf is the point
        expected = values.astype(np.float16).view(np.uint16)
    bad = got != expected
    assert not bad.any(), f"{bad.sum()} mismatches, e.g. {values[bad][:4]} -> {got[bad][:4]} vs {expected[bad][:4]}"
    nan = np.empty(1, np.uint16)
    STORERS[kind](np.array([np.nan], np.float32), nan)
    assert np.isnan(nan.view(np.float16)[0])


BF16_LOAD, BF16_STORE = _elementwise(numba_bf16.bf16_value), _elementwise(numba_bf16.bf16_bits)


def hard_float32_values_for_bfloat16(rng):
    """Random float32 bit patterns (every exponent, NaNs with payloads),
    every midpoint between neighbouring finite bfloat16 values and the
    float32 values beside them, the edges of the range."""
    bf = bfloat16()
    with np.errstate(invalid="ignore"):  # the NaN patterns
        finite = ALL_BITS.view(np.int16).view(bf).astype(np.float64)
    finite = np.sort(finite[np.isfinite(finite)])
    mids = ((finite[:-1] + finite[1:]) / 2).astype(np.float32)  # exact: 9 bits
    random = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    edges = np.array([3.3895314e38, 3.3961775e38, 3.4e38, -3.4e38, 1e-40, -1e-40, 1e-45, 0.0, -0.0, np.inf,
                      -np.inf, np.nan, -np.nan], np.float32)
    return np.concatenate([mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf)),
                           random, edges])


def test_bfloat16_loads_are_exact_for_every_bit_pattern():
    bits = ALL_BITS.view(np.int16)
    got = np.empty(65536, np.float32)
    BF16_LOAD(bits, got)
    expected = bits.view(bfloat16()).astype(np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))  # NaN payloads, -0, Inf too


def test_bfloat16_stores_round_like_ml_dtypes(rng):
    values = hard_float32_values_for_bfloat16(rng)
    got = np.empty(values.size, np.int16)
    BF16_STORE(values, got)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = values.astype(bfloat16()).view(np.int16)
    bad = got != expected
    assert not bad.any(), f"{bad.sum()} mismatches, e.g. {values[bad][:4]} -> {got[bad][:4]} vs {expected[bad][:4]}"
    nan = np.isnan(values)
    assert nan.sum() > 100 and (got[nan].view(np.uint16) & 0x7FC0 == 0x7FC0).all()  # quiet NaNs


def test_loads_and_stores_dispatch_on_the_bits_type():
    """int16 bits are bfloat16, uint16 bits float16: the same compiled
    loop through ``to_work`` and ``store`` gives each its own conversion."""
    @njit
    def copy_through_work(a, out):
        for i in range(a.size):
            nh.store(out, i, nh.to_work(a[i]) * np.float32(3.0))

    values = np.array([1.0, -2.5, 0.1, 100.0, 1e-3], np.float32)
    for dtype, bits in ((np.dtype(np.float16), np.uint16), (bfloat16(), np.int16)):
        a = values.astype(dtype)
        out = np.empty(a.size, bits)
        copy_through_work(a.view(bits), out)
        expected = (a.astype(np.float32) * np.float32(3.0)).astype(dtype)
        np.testing.assert_array_equal(out, expected.view(bits))


def test_kernels_without_f16c_match_the_reference(tmp_path):
    """The whole backend compiled for a CPU without F16C (the portable
    conversions inside every kernel), in a fresh interpreter."""
    from numba.core.codegen import get_host_cpu_features

    features = ",".join(f for f in str(get_host_cpu_features()).split(",") if f and f != "+f16c")
    env = dict(os.environ, NUMBA_CPU_FEATURES=features + ",-f16c", NUMBA_CACHE_DIR=str(tmp_path))
    script = r"""
import numpy as np
import bnkernels as bk
from bnkernels.backends import numba_half
from bnkernels.reference import reference_forward, reference_backward
assert not numba_half.NATIVE_HALF
rng = np.random.default_rng(5)
for shape, axis in (((3, 5, 7, 9), 1), ((3, 7, 9, 5), -1)):
    x = (rng.standard_normal(shape) * 3 + 40).astype(np.float16)
    dy = rng.standard_normal(shape).astype(np.float16)
    g = rng.random(shape[axis]) + 0.5
    b = rng.standard_normal(shape[axis])
    y, saved = bk.bn_forward(x, g, b, axis=axis, backend="numba", return_saved=True)
    ref = reference_forward(x, g, b, axis=axis)[0]
    assert y.dtype == np.float16 and np.abs(y - ref).max() <= 2e-3 * np.abs(ref).max(), "forward"
    dx = bk.bn_backward(dy, x, saved.mean, saved.invstd, g, axis=axis, backend="numba")[0]
    ref = reference_backward(dy, x, saved.mean, saved.invstd, g, axis=axis)[0]
    assert dx.dtype == np.float16 and np.abs(dx - ref).max() <= 2e-3 * np.abs(ref).max(), "backward"
    yi = bk.bn_forward(x, g, b, saved.mean, 1 / saved.invstd.astype(np.float64) ** 2 - 1e-5, training=False,
                       axis=axis, backend="numba")
    assert np.abs(yi - y).max() <= 4e-3 * np.abs(y).max(), "inference"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_float16_sums_ask_for_wide_vectors_and_float32_ones_do_not():
    @njit
    def total(a):
        nh.prefer_wide_vectors_for(a)
        s = 0.0
        for i in range(a.size):
            s += a[i]
        return s

    for dtype, wide in ((np.uint16, True), (np.float32, False), (np.float64, False)):
        a = np.arange(10).astype(dtype)
        assert total(a) == 45.0
        ir = total.inspect_llvm(total.signatures[-1])
        assert ('"prefer-vector-width"="512"' in ir) == wide, dtype
