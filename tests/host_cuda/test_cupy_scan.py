"""The reductions' hot loops (``kernels/bn_scan.cuh``) on the host harness:
each way a thread can walk its values gives the float64 reference's
statistics and backward sums (and the elementwise passes after them, whose
vector loops keep a vector's coefficients in registers when it lies in one
channel plane).

- 16-byte vectors (planes with ``inner % N == 0``, rows with ``C % N == 0``,
  aligned pointers) and single values (anything else, or a misaligned view),
  with full steps of 4 items and the straight-line tail after them;
- 32-bit offsets (every test tensor), and, in builds with lowered limits,
  the rebased walks of tensors of 2^31 elements and more (no CPU test can
  hold 2^31 elements: ``BN_INDEX32_LIMIT=0`` sends the same small tensors
  down them): chunks of whole runs, or pieces of one (planes of 2^31 items
  and more), each from its own base (``BN_CHUNK_SPAN``: a chunk's items);
  the split walk in chunks of planes; the elementwise passes in chunks,
  their channel tracking from the chunk's first element, and cut into
  units no chunk crosses (``BN_TRACK32_LIMIT``: planes or channels of 2^31
  and more), the units' edges one value at a time;
- misaligned planes on the split walk (x rounded down to its 16-byte
  boundary: masked vectors before the tensor's first value);
- data whose mean is far larger than its spread, and a first value (the
  shift of the statistics) that is an outlier: the chunked sums around each
  chunk's own first value stay exact.
"""
from pathlib import Path

import numpy as np
import pytest

from bnkernels.backends.cupy_backend import sources
from bnkernels.backends.gpu import plans
from bnkernels.reference import reference_backward, reference_forward, reference_stats
from bnkernels.validation import channel_layout, compute_dtype
from helpers import DTYPES, assert_close, gpu_tunings, make_input, make_params
from host_cuda import runner
from host_cuda.test_cupy_kernels import HostGPU

KERNEL_FILE = Path(sources.source_dir()) / sources.MAIN_FILE
TUNINGS = gpu_tunings()
VEC = {np.dtype(np.float16): 8, np.dtype(np.float32): 4, np.dtype(np.float64): 2}

#: (shape, axis): planes whose inner is a multiple of every vector width
#: (several full steps per thread, and tails), one that is a multiple of 4
#: and 2 only, one of none; rows with C a multiple of 8 (one group, a group
#: with an idle vector of lanes: C = 24 in 32 lanes, two groups) and not.
LAYOUTS = [
    ((40, 3, 128), 1),
    ((9, 2, 24), 1),
    ((6, 2, 12), 1),
    ((7, 3, 17), 1),
    ((300, 16), 1),
    ((129, 24), 1),
    ((70, 64), 1),
    ((90, 12), 1),
    ((50, 7), 1),
]

#: The builds with lowered limits: every walk rebased (one chunk per
#: channel); chunks of 40 items (several runs, a plane's split walk in
#: chunks of planes; elementwise chunks of 40 vectors, the tracking from a
#: chunk's first element); pieces of 7 items of a run and elementwise units
#: of one plane (BN_TRACK32_LIMIT=0: planes of 2^31 elements and more);
#: units of one sample (C >= 2 channels of 2^31 and more, planes below).
BUILDS = {
    "32-bit": {},
    "rebased": {"BN_INDEX32_LIMIT": 0},
    "chunks": {"BN_INDEX32_LIMIT": 0, "BN_CHUNK_SPAN": 40},
    "pieces": {"BN_INDEX32_LIMIT": 0, "BN_CHUNK_SPAN": 7, "BN_TRACK32_LIMIT": 0},
    "samples": {"BN_INDEX32_LIMIT": 0, "BN_CHUNK_SPAN": 40, "BN_TRACK32_LIMIT": 2},
}
WIDE_BUILDS = {name: d for name, d in BUILDS.items() if d}


#: The layouts the rebased builds run (a vector and a single-value case of
#: each layout kind, split planes): the walks differ only in how addresses
#: are formed.
WIDE_LAYOUTS = [LAYOUTS[0], LAYOUTS[3], LAYOUTS[5], LAYOUTS[7], ((16, 3, 15), 1), ((33, 2, 17), 1)]


@pytest.fixture(scope="module")
def library():
    return runner.build(KERNEL_FILE, sources.name_expressions())


@pytest.fixture(scope="module", params=[b for b in BUILDS if BUILDS[b]])
def wide_library(request):
    return runner.build(KERNEL_FILE, sources.name_expressions(), defines=BUILDS[request.param])


@pytest.fixture(params=list(TUNINGS))
def gpu(request, library):
    return HostGPU(library, TUNINGS[request.param])


def _flat(a):
    return np.ascontiguousarray(a).reshape(-1)


def _misaligned(a):
    """The same values one element off a 16-byte boundary."""
    buf = np.empty(a.size + 1, a.dtype)
    view = buf[1:]
    view[...] = a.reshape(-1)
    assert view.ctypes.data % 16 != 0
    return view


def _check_stats(out, x, axis, dtype):
    n, mean, var = reference_stats(x, axis=axis)
    rtol = 1e-12 if np.dtype(dtype) == np.float64 else 1e-6
    # a mean near 0 of values far from it (two rows) is off by their ulps
    atol = rtol * float(np.abs(x.astype(np.float64)).max())
    np.testing.assert_allclose(out["k"].astype(np.float64) + out["dmean"], mean, rtol=rtol, atol=atol)
    np.testing.assert_allclose(out["m2"] / n, var, rtol=100 * rtol)


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_statistics_and_backward_sums_of_each_walk(shape, axis, dtype, aligned, gpu, rng):
    _check_walk(shape, axis, dtype, aligned, gpu, rng)


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", WIDE_LAYOUTS)
def test_the_rebased_walks(shape, axis, dtype, aligned, wide_library, rng):
    """The walks of tensors of 2^31 elements and more (32-bit offsets from
    a base per chunk), and of planes of 2^31 items and more (pieces), on
    small data (builds with lowered limits)."""
    _check_walk(shape, axis, dtype, aligned, HostGPU(wide_library, TUNINGS["2warps"]), rng)


def _check_walk(shape, axis, dtype, aligned, gpu, rng):
    x = make_input(shape, dtype, rng)
    dy = make_input(shape, dtype, rng, mean=0.5, std=1.0)
    lay = channel_layout(shape, axis)
    C, acc = lay.channels, compute_dtype(dtype)
    flat_x, flat_dy = (_flat(x), _flat(dy)) if aligned else (_misaligned(x), _misaligned(dy))
    assert gpu.aligned(flat_x, flat_dy) == aligned
    gamma, beta = make_params(C, rng)
    relu = aligned  # both forms of bn_apply, on both of its vector walks (inner % N == 0 or not)
    y, out = plans.run_forward_train(gpu, flat_x, lay, gamma.astype(acc), beta.astype(acc), None, 1e-5, relu)
    _check_stats(out, x, axis, dtype)
    ref = reference_forward(x, gamma, beta, axis=axis, activation="relu" if relu else None)
    assert_close(y.reshape(shape), ref[0], dtype, "y")

    mean64, invstd64 = out["mean"].astype(np.float64), out["invstd"].astype(np.float64)
    dx, bout = plans.run_backward(gpu, flat_dy, flat_x, lay, gamma.astype(acc), mean64, invstd64)
    rdx, rdgamma, rdbeta = reference_backward(dy, x, mean64, invstd64, gamma, axis=axis)
    n = x.size // C
    dymax = float(np.abs(dy.astype(np.float64)).max())
    assert_close(dx.reshape(shape), rdx, dtype, "dx", scale=3 * dymax * gamma.max() * invstd64.max())
    assert_close(bout["dbeta"], rdbeta, dtype, "dbeta", scale=dymax * n)
    assert_close(bout["dgamma"], rdgamma, dtype, "dgamma", scale=4 * dymax * n)
    assert not gpu.counter_array.any(), "the last blocks reset their counters"


#: Boundary shapes of the split, masked-edge and rebased walks: planes of
#: 15, 16, 17, 127, 129 and 31 (a prime) values, one or several per
#: channel, C of 1, 3, 17; rows of C = 1, 3, 16, 17 channels, 1, 2, 17, 129
#: rows.
BOUNDARY_LAYOUTS = [((1, 1, 15), 1), ((5, 3, 16), 1), ((2, 3, 17), 1), ((3, 2, 127), 1), ((1, 3, 129), 1),
                    ((7, 1, 31), 1), ((4, 17, 31), 1), ((2, 16), 1), ((17, 17), 1), ((129, 3), 1), ((2, 1), 1)]


@pytest.fixture(scope="module", params=list(BUILDS))
def any_library(request):
    return runner.build(KERNEL_FILE, sources.name_expressions(), defines=BUILDS[request.param])


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", BOUNDARY_LAYOUTS)
def test_boundary_shapes_on_every_build(shape, axis, dtype, aligned, any_library, rng):
    """Every walk (32-bit and rebased builds) on boundary shapes, aligned
    and one element off a 16-byte boundary, outputs poisoned."""
    _check_walk(shape, axis, dtype, aligned, HostGPU(any_library, TUNINGS["2warps"]), rng)


#: Planes with inner % N != 0 (every dtype unless noted) and at least one
#: whole vector whatever the plane's first position: the split walk (vector
#: bodies from each plane's first 16-byte boundary, the values around them
#: one by one). ResNet's late planes (7x7; 14x14: float16 only), B = 1 for
#: float16 (inner = 15, 17), several planes per thread and a plane per step.
SPLIT_LAYOUTS = [((5, 4, 49), 1), ((3, 5, 196), 1), ((16, 3, 15), 1), ((4, 2, 23), 1), ((33, 2, 17), 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SPLIT_LAYOUTS)
def test_the_split_walk_of_misaligned_planes(shape, axis, dtype, gpu, rng):
    _check_walk(shape, axis, dtype, True, gpu, rng)


def test_the_split_layouts_take_the_split_walk():
    """Each dtype has split cases: inner % N != 0 and inner >= 2N - 1 (the
    kernels' rule, bn_reduce.cuh: use_split)."""
    for dtype in DTYPES:
        n = VEC[np.dtype(dtype)]
        assert any(lay[2] % n and lay[2] >= 2 * n - 1 for lay, _ in SPLIT_LAYOUTS)


def test_the_layouts_take_the_vector_walk_where_they_should():
    """What the cases above cover: the vector walk for each dtype, and the
    single-value walk (the kernels choose by the same rule)."""
    def vector(shape, dtype):
        lay = channel_layout(shape, 1)
        return (lay.inner % VEC[np.dtype(dtype)] == 0) if lay.inner > 1 else lay.channels % VEC[np.dtype(dtype)] == 0

    for dtype in DTYPES:
        kinds = {vector(shape, dtype) for shape, _ in LAYOUTS}
        assert kinds == {True, False}


def _large_mean_data(shape, dtype, rng, outlier):
    """Mean 1e4, spread 1 (float32) or 8 (float16, whose values near 1e4
    are multiples of 8): the float32 sum of such values, or of their squares,
    cancels; with ``outlier`` the first value of every channel (the shift k
    of the statistics, and the first value of its thread's first chunk) is
    100 spreads off."""
    if np.dtype(dtype) == np.float16:
        x = (1e4 + 8 * rng.integers(-4, 5, shape)).astype(np.float16)
    else:
        x = (1e4 + rng.standard_normal(shape)).astype(dtype)
    if outlier:
        first = (0,) * (len(shape) - 1) if len(shape) == 2 else (0, slice(None), 0)
        x[first] = x[first] + (800 if np.dtype(dtype) == np.float16 else 100)
    return x


@pytest.mark.parametrize("outlier", [False, True], ids=["plain", "outlier-first"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("shape,axis", [((40, 3, 128), 1), ((7, 3, 17), 1), ((300, 16), 1), ((90, 12), 1),
                                        ((5, 4, 49), 1), ((3, 5, 196), 1)])
def test_large_mean_and_an_outlier_first_value_are_exact(shape, axis, dtype, outlier, gpu, rng):
    x = _large_mean_data(shape, dtype, rng, outlier)
    lay = channel_layout(shape, axis)
    out = plans.run_stats(gpu, _flat(x), lay, None, None, None, 1e-5)
    n, mean, var = reference_stats(x, axis=axis)
    std = np.sqrt(var)
    dmean = out["dmean"].astype(np.float64)
    err_mean = np.abs(out["k"].astype(np.float64) + dmean - mean) / std
    err_var = np.abs(out["m2"] / n - var) / var
    # dmean = mean - k is a float32: two of its ulps (k is 100 spreads off
    # the mean in the outlier case) on top of 1e-6 spreads
    tol_mean = 1e-6 + 2.0**-22 * np.abs(dmean) / std
    assert (err_mean <= tol_mean).all(), f"mean off by {err_mean.max():.3g} stds"
    assert err_var.max() <= 1e-5, f"variance off by {err_var.max():.3g} (relative)"
    y = plans.run_forward_train(gpu, _flat(x), lay, None, None, None, 1e-5, False)[0]
    assert_close(y.reshape(shape), reference_forward(x, axis=axis)[0], dtype, "y")


tsan = pytest.mark.skipif(not runner.tsan_available(), reason="g++ has no libtsan here")


@pytest.mark.parametrize("outlier", [False, True], ids=["plain", "outlier-first"])
@pytest.mark.parametrize("shape,axis", [((5, 4, 49), 1), ((16, 3, 15), 1)])
def test_large_mean_float64_split_walk(shape, axis, outlier, gpu, rng):
    """float64 on the split walk (one edge value per plane): large mean,
    an outlier first value."""
    test_large_mean_and_an_outlier_first_value_are_exact(shape, axis, np.float64, outlier, gpu, rng)


@tsan
@pytest.mark.parametrize("shape", [(8, 3, 16), (33, 8), (9, 3, 17)], ids=["planes", "rows", "split-planes"])
def test_vector_reductions_are_race_free(shape, rng):
    """The vector walks (16-byte loads, rows: 4 channels per thread and the
    reduction across lanes that hold the same channels) under
    ThreadSanitizer, with 2-warp blocks: no data race."""
    so = runner.build(KERNEL_FILE, sources.name_expressions(), tsan=True)
    gpu = HostGPU(None, TUNINGS["2warps"])
    lay = channel_layout(shape, 1)
    x = _flat(make_input(shape, np.float32, rng))
    counters = np.zeros(64, np.uint32)
    stats_plan, _ = plans.stats(x, lay, None, None, None, 1e-5, gpu.alloc, counters, gpu.limits, gpu.tuning)
    bwd_plan, _ = plans.bwd_reduce(x, x, lay, None, np.zeros(lay.channels), np.ones(lay.channels), gpu.alloc,
                                   counters, gpu.limits, gpu.tuning)
    for plan in (stats_plan, bwd_plan):
        result = runner.tsan_run(so, bind_launch(plan))
        assert result.clean, result.report


def bind_launch(plan):
    from bnkernels.backends.cupy_backend import bind

    return bind.bind(plan)


@tsan
@pytest.mark.parametrize("build", ["32-bit", "pieces"])
@pytest.mark.parametrize("shape", [(5, 3, 16), (9, 3, 17), (40, 7)], ids=["misaligned-planes", "misaligned-split",
                                                                           "misaligned-rows"])
def test_split_and_rebased_walks_are_race_free(shape, build, rng):
    """The split walk of misaligned planes (masked vectors before the
    tensor's first value), and the rebased walks (pieces of 7 items,
    elementwise units of a plane: the units' edges one value at a time),
    float16, 2-warp blocks, under ThreadSanitizer: no data race, and the
    apply pass right."""
    so = runner.build(KERNEL_FILE, sources.name_expressions(), tsan=True, defines=BUILDS[build])
    gpu = HostGPU(None, TUNINGS["2warps"])
    lay = channel_layout(shape, 1)
    x = _misaligned(make_input(shape, np.float16, rng))
    counters = np.zeros(64, np.uint32)
    stats_plan, _ = plans.stats(x, lay, None, None, None, 1e-5, gpu.alloc, counters, gpu.limits, gpu.tuning)
    bwd_plan, _ = plans.bwd_reduce(x, x, lay, None, np.zeros(lay.channels), np.ones(lay.channels), gpu.alloc,
                                   counters, gpu.limits, gpu.tuning)
    for plan in (stats_plan, bwd_plan):
        result = runner.tsan_run(so, bind_launch(plan))
        assert result.clean, result.report
    C = lay.channels
    k, scale, shift = (rng.standard_normal(C).astype(np.float32) for _ in range(3))
    y = np.full(x.size, np.nan, np.float16)
    result = runner.tsan_run(so, bind_launch(plans.apply(x, y, lay, k, scale, shift, False, gpu.aligned(x, y),
                                                         gpu.limits, gpu.tuning)))
    assert result.clean, result.report
    c = (np.arange(x.size) // lay.inner) % C
    want = ((x.astype(np.float32) - k[c]) * scale[c] + shift[c]).astype(np.float16)
    np.testing.assert_array_equal(result.args[1], want)  # bn_apply(x, y, ...): every y written once


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((5, 3, 16), 1), ((4, 2, 23), 1), ((3, 2, 127), 1)])
def test_dy_and_x_misaligned_differently(shape, axis, dtype, gpu, rng):
    """dy aligned, x one element off (or the other way round): the
    backward sums cannot address both by the same offsets from 16-byte
    boundaries (the split walk), and take single values: still right."""
    x = make_input(shape, dtype, rng)
    dy = make_input(shape, dtype, rng, mean=0.5, std=1.0)
    lay = channel_layout(shape, axis)
    C, acc = lay.channels, compute_dtype(dtype)
    gamma, _ = make_params(C, rng)
    mean = reference_stats(x, axis=axis)[1]
    invstd = 1.0 / np.sqrt(reference_stats(x, axis=axis)[2] + 1e-5)
    n = x.size // C
    dymax = float(np.abs(dy.astype(np.float64)).max())
    for flat_dy, flat_x in ((_flat(dy), _misaligned(x)), (_misaligned(dy), _flat(x))):
        dx, bout = plans.run_backward(gpu, flat_dy, flat_x, lay, gamma.astype(acc), mean, invstd)
        rdx, rdgamma, rdbeta = reference_backward(dy, x, mean, invstd, gamma, axis=axis)
        assert_close(dx.reshape(shape), rdx, dtype, "dx", scale=3 * dymax * gamma.max() * invstd.max())
        assert_close(bout["dbeta"], rdbeta, dtype, "dbeta", scale=dymax * n)
        assert_close(bout["dgamma"], rdgamma, dtype, "dgamma", scale=4 * dymax * n)
