"""Pieces of the numba backend that the shared backend tests do not isolate."""
import numpy as np
import pytest

pytest.importorskip("numba")
from bnkernels.backends import numba_backend as nb  # noqa: E402


def test_half_conversion_matches_numpy_rounding():
    """float -> float16 bits inside the kernels = NumPy's astype(float16):
    every float16 value, every midpoint between neighbours (ties to even),
    values just beside the midpoints, subnormals, overflow, Inf and NaN."""
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = np.sort(halves[np.isfinite(halves)].astype(np.float64))
    mids = (finite[:-1] + finite[1:]) / 2
    values = np.concatenate([finite, mids, np.nextafter(mids.astype(np.float32), np.inf),
                             np.nextafter(mids.astype(np.float32), -np.inf),
                             [65504.0, 65519.99, 65520.0, 1e6, -1e6, 1e-8, -1e-8, 2.0**-25, 2.0**-24 * 1.5,
                              np.inf, -np.inf]]).astype(np.float32)
    got = np.array([nb.half_bits(v) for v in values], np.uint16)
    with np.errstate(over="ignore"):  # 1e6 -> inf is the point
        expected = values.astype(np.float16).view(np.uint16)
    bad = got != expected
    assert not bad.any(), f"{bad.sum()} mismatches, e.g. {values[bad][:5]} -> {got[bad][:5]} vs {expected[bad][:5]}"
    nan = nb.half_bits(np.float32(np.nan))
    assert np.isnan(np.array([nan], np.uint16).view(np.float16)[0])


def test_half_loads_are_exact_for_every_bit_pattern():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    got = np.array([nb.half_value(b) for b in bits], np.float32)
    expected = bits.view(np.float16).astype(np.float32)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(got[finite].view(np.uint32), expected[finite].view(np.uint32))  # bitwise: -0 too
    np.testing.assert_array_equal(np.isinf(got), np.isinf(expected))
    np.testing.assert_array_equal(np.sign(got[np.isinf(got)]), np.sign(expected[np.isinf(expected)]))
    assert np.isnan(got[np.isnan(expected)]).all()
