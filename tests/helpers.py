"""Shared test utilities: tolerances, data, comparisons, backends under test.

The float64 oracle is ``bnkernels.reference`` (shared with the benchmarks).
"""
from __future__ import annotations

import numpy as np

from bnkernels.distributed import Communicator


#: Per-dtype tolerances for outputs of size O(1), applied as
#: ``|actual - expected| <= atol * scale + rtol * |expected|``.
#: float16 rounds its output to 11 bits (half an ulp is 4.9e-4 relative).
TOLERANCES = {
    np.dtype(np.float16): dict(atol=2e-3, rtol=2e-3),
    np.dtype(np.float32): dict(atol=2e-5, rtol=2e-5),
    np.dtype(np.float64): dict(atol=1e-11, rtol=1e-11),
}
DTYPES = [np.float16, np.float32, np.float64]


def bfloat16():
    """NumPy's bfloat16 (ml_dtypes'), its tolerance registered; the test is
    skipped without ml_dtypes."""
    import pytest

    ml_dtypes = pytest.importorskip("ml_dtypes")
    dtype = np.dtype(ml_dtypes.bfloat16)
    # bfloat16 rounds its output to 8 bits (half an ulp is 3.9e-3 relative)
    TOLERANCES.setdefault(dtype, dict(atol=1.6e-2, rtol=1.6e-2))
    return dtype


def make_input(shape, dtype, rng, *, mean=3.0, std=2.0):
    """Fresh random data with a non-zero mean that differs per channel-ish
    (a random offset per element of the last axis keeps means distinct)."""
    x = rng.standard_normal(shape) * std + mean
    if x.ndim:
        x = x + rng.uniform(-1, 1, size=shape[-1:])
    return x.astype(dtype)


def make_params(C, rng, dtype=np.float32):
    gamma = rng.uniform(0.5, 2.0, C).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    return gamma, beta


def assert_close(actual, expected, dtype, what="value", scale=1.0):
    """Compare to a float64 reference with the dtype's tolerance; on failure
    print the worst and the first mismatching elements."""
    tol = TOLERANCES[np.dtype(dtype)]
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a64 = actual.astype(np.float64)
    err = np.abs(a64 - expected)
    bound = tol["atol"] * scale + tol["rtol"] * np.abs(expected)
    bad = ~(err <= bound)  # NaN counts as bad
    if bad.any():
        idx = np.argwhere(bad)[:5]
        rows = "\n".join(f"  at {tuple(i)}: got {a64[tuple(i)]!r}, expected {expected[tuple(i)]!r}"
                         for i in idx)
        worst = np.nanmax(np.where(bad, err, 0)) if np.isfinite(err).any() else np.nan
        raise AssertionError(f"{what} ({np.dtype(dtype).name}): {int(bad.sum())} of {bad.size} elements "
                             f"off (worst abs error {worst:.3g}; atol={tol['atol'] * scale:.3g}, "
                             f"rtol={tol['rtol']:.3g}); first:\n{rows}")


def strided(x, rng):
    """A non-contiguous view with the same values as a fresh array of x's
    shape: every other element of a twice-as-long last axis."""
    big = np.empty(x.shape[:-1] + (2 * x.shape[-1],), x.dtype) if x.ndim else None
    big[..., ::2] = x
    big[..., 1::2] = np.nan  # poison: any read of the wrong element fails
    view = big[..., ::2]
    assert not view.flags.c_contiguous or x.shape[-1] <= 1 or x.size == 0
    return view


# --- GPU kernel tests (CUDA simulator and host harness) ---------------------

#: (shape, axis): channel planes (inner > 1: ragged 17 and 5*7, a middle
#: axis) and channel fastest (inner == 1: C = 7 gives a ragged tx = 8,
#: C = 40 two channel groups of 32).
GPU_CASES = [
    ((8, 3, 17), 1),
    ((2, 3, 5, 7), 1),
    ((9, 2, 3, 5), 2),
    ((33, 7), 1),
    ((9, 4, 3), -1),
    ((4, 40), 1),
]


def gpu_tunings():
    """32-thread blocks (one warp: shuffles only) and 64-thread blocks (two
    warps: shuffles, then shared memory)."""
    from bnkernels.backends.gpu import geometry

    return {
        "warp": geometry.Tuning(block_threads=32, min_values_per_thread=1, waves=2),
        "2warps": geometry.Tuning(block_threads=64, min_values_per_thread=1, waves=2),
    }


def tiny_device(tuning):
    """One SM with 2 resident blocks: reductions get 2-4 blocks per channel
    group and elementwise grids at most 4 blocks, so every path of the
    kernels runs while CPU execution stays fast."""
    from bnkernels.backends.gpu import geometry

    return geometry.DeviceLimits(sm_count=1, max_threads_per_sm=2 * tuning.block_threads)


class OneRank(Communicator):
    """A communicator of one rank, no transport (the collectives of a world
    of one return the frame itself); ``frames`` records each collective's
    kind and frame length."""

    def __init__(self):
        super().__init__(0, 1)
        self.frames = []

    def allgather(self, frame):
        self.frames.append(("gather", frame.size))
        return frame[None].copy()

    def allreduce(self, frame):
        self.frames.append(("reduce", frame.size))
        return frame.copy()

