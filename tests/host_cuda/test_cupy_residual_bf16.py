"""The CuPy backend's fused residual (``bn_apply_residual``), the gradient
through a fused ReLU (``bn_relu_backward``) and its bfloat16 instantiations
(``__nv_bfloat16`` storage, float accumulation, float32 statistics), on the
host harness, through the plans the backend runs (``plans.apply`` /
``run_forward_*`` with a residual, ``plans.run_relu_backward``) and the
members of ``gpu.members``.

- residual: ``y = act((x - k) * scale + shift + z)`` rounded once, bit for
  bit against the same float arithmetic in NumPy (the harness does no FMA
  contraction), on the vector walks (every pointer 16-byte aligned: a
  vector's coefficients in registers when it lies in one channel plane,
  tracked per value otherwise) and the single-value walk (any pointer off
  alignment), sizes around the vector widths, channel planes and channel
  fastest; and against the float64 reference through the training and
  inference sequences;
- relu_backward: ``g = dy`` where not ``y <= 0`` (NaN passes, both zeros
  and negatives stop, a positive subnormal passes), bit for bit;
- bfloat16: statistics, apply, backward sums and dx against the float64
  reference with bfloat16's tolerance (``helpers.bfloat16``);
- the rebased walks (builds with lowered index limits) and ThreadSanitizer.

Every buffer the plans allocate is poisoned (NaN) before a kernel runs.
"""
from pathlib import Path

import numpy as np
import pytest

from bnkernels.backends.cupy_backend import bind, sources
from bnkernels.backends.gpu import plans
from bnkernels.backends.gpu.members import GpuBackend
from bnkernels.reference import reference_backward, reference_forward
from bnkernels.validation import channel_layout, compute_dtype
from helpers import DTYPES, GPU_CASES, assert_close, bfloat16, gpu_tunings, make_input, make_params
from host_cuda import runner
from host_cuda.test_cupy_kernels import HostArrays, HostGPU
from host_cuda.test_cupy_scan import WIDE_BUILDS  # the rebased walks' builds

KERNEL_FILE = Path(sources.source_dir()) / sources.MAIN_FILE
TUNINGS = gpu_tunings()
SIZES = [1, 15, 16, 17, 127, 129]
#: 16-bit-element offsets of (x, z, y) from a 16-byte boundary: all aligned
#: (the vector walk), then each array alone off (the single-value walk).
OFFSETS = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]


def _dtype(name):
    return bfloat16() if name == "bfloat16" else np.dtype(name)


ALL_DTYPES = ["float16", "bfloat16", "float32", "float64"]


@pytest.fixture(scope="module")
def library():
    return runner.build(KERNEL_FILE, sources.name_expressions())


@pytest.fixture(params=list(TUNINGS))
def gpu(request, library):
    return HostGPU(library, TUNINGS[request.param])


@pytest.fixture(scope="module", params=list(WIDE_BUILDS))
def wide_gpu(request):
    so = runner.build(KERNEL_FILE, sources.name_expressions(), defines=WIDE_BUILDS[request.param])
    return HostGPU(so, TUNINGS["2warps"])


def _flat(a):
    return np.ascontiguousarray(a).reshape(-1)


def _placed(values, offset):
    """``values`` (flat) in a fresh buffer, ``offset`` elements past a
    16-byte boundary (the rest of the buffer poisoned with NaN)."""
    itemsize = values.dtype.itemsize
    buf = np.full(values.size + 16, np.nan, values.dtype)
    start = (-buf.ctypes.data % 16) // itemsize + offset
    view = buf[start:start + values.size]
    view[...] = values
    assert (view.ctypes.data % 16 == 0) == (offset == 0)
    return view


def _bits(a):
    return np.ascontiguousarray(a).view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _expected_apply(x, z, C, inner, k, scale, shift, relu, dtype):
    """The kernel's arithmetic in NumPy, operation by operation in the
    accumulation dtype (as the harness computes: no FMA contraction), one
    rounding to the storage dtype."""
    acc = compute_dtype(dtype)
    c = (np.arange(x.size) // inner) % C
    r = (x.astype(acc) - k[c]) * scale[c] + shift[c]
    if z is not None:
        r = r + z.astype(acc)
    if relu:
        r = np.where(r < 0, acc.type(0), r)
    return r.astype(dtype)


#: (name, shape): one channel plane, three planes (C = 3: a vector in one
#: plane when inner % N == 0, else the channel tracked per value), channel
#: fastest (C = 3).
def _layouts(size):
    return [("plane", (1, 1, size), 1), ("planes", (2, 3, size), 1), ("rows", (size, 3), 1)]


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("offsets", OFFSETS, ids=["aligned", "x-off", "z-off", "y-off"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype_name", ALL_DTYPES)
def test_apply_residual_on_every_walk_bit_for_bit(dtype_name, size, offsets, relu, gpu, rng):
    dtype = _dtype(dtype_name)
    acc = compute_dtype(dtype)
    for kind, shape, axis in _layouts(size):
        lay = channel_layout(shape, axis)
        C = lay.channels
        x = _placed(make_input((lay.count * C,), dtype, rng, mean=0.0), offsets[0])
        z = _placed(make_input((lay.count * C,), dtype, rng, mean=0.0, std=1.5), offsets[1])
        y = _placed(np.full(x.size, np.nan, dtype), offsets[2])  # poison: every element must be written
        k, scale, shift = (rng.standard_normal(C).astype(acc) for _ in range(3))
        aligned = gpu.aligned(x, y, z)
        assert aligned == (offsets == (0, 0, 0))
        launch = plans.apply(x, y, lay, k, scale, shift, relu, aligned, gpu.limits, gpu.tuning, residual=z)
        assert launch.kernel == "apply_residual"
        gpu.launches.clear()
        gpu.run(launch)
        assert gpu.launches[0].kernel == f"bn_apply_residual<{bind.storage_name(dtype)}, {sources.ACCUMULATOR[bind.storage_name(dtype)]}>"
        expected = _expected_apply(x, z, C, lay.inner, k, scale, shift, relu, dtype)
        np.testing.assert_array_equal(_bits(y), _bits(expected), err_msg=f"{kind} {shape}")


@pytest.mark.parametrize("dtype_name", ALL_DTYPES)
def test_apply_residual_adds_before_the_relu_and_keeps_nan(dtype_name, gpu):
    """relu(bn(x) + z), not relu(bn(x)) + z; NaN in x or z gives NaN; -0
    plus -0 stays -0 (without a ReLU), and the plain apply (no residual)
    adds nothing: its -0 stays -0."""
    dtype = _dtype(dtype_name)
    acc = compute_dtype(dtype)
    lay = channel_layout((1, 1, 8), 1)
    k, scale, shift = np.zeros(1, acc), np.ones(1, acc), np.full(1, -0.0, acc)  # -0 + -0 = -0
    x = np.array([-1, 1, 2, np.nan, 0.5, -0.0, -0.0, 3], dtype)
    z = np.array([1.5, -2, -1, 1, np.nan, -0.0, 1, -3], dtype)
    for relu, want in [(True, [0.5, 0, 1, np.nan, np.nan, 0, 1, 0]),
                       (False, [0.5, -1, 1, np.nan, np.nan, -0.0, 1, 0])]:
        y = np.full(8, np.nan, dtype)
        gpu.run(plans.apply(x, y, lay, k, scale, shift, relu, gpu.aligned(x, y, z), gpu.limits, gpu.tuning,
                            residual=z))
        np.testing.assert_array_equal(y.astype(np.float64), np.array(want))
        if not relu:
            assert np.signbit(y[5].astype(np.float32))  # -0 + -0
    y = np.full(8, np.nan, dtype)
    gpu.run(plans.apply(x, y, lay, k, scale, shift, False, gpu.aligned(x, y), gpu.limits, gpu.tuning))
    assert np.signbit(y[5].astype(np.float32)) and np.signbit(y[6].astype(np.float32))


def _relu_backward_data(n, dtype, rng):
    """y with NaN (both signs), both zeros, negatives, positives, infinities
    and the smallest positive subnormal; dy random (NaN too)."""
    specials = np.array([np.nan, -np.nan, 0.0, -0.0, -1.0, 2.0, np.inf, -np.inf], np.float64)
    y = rng.standard_normal(n).astype(dtype)
    y[rng.integers(0, n, n // 2)] = specials[rng.integers(0, len(specials), n // 2)].astype(dtype)
    if n > 3:
        tiny = np.array([1], {2: np.uint16, 4: np.uint32, 8: np.uint64}[np.dtype(dtype).itemsize]).view(dtype)
        y[3] = tiny[0]  # positive subnormal (float16: 2^-24; bfloat16, float32: flushed by -ftz in a float compare)
        y[1] = -tiny[0]
    dy = rng.standard_normal(n).astype(dtype)
    dy[0] = np.nan
    return dy, y


@pytest.mark.parametrize("offsets", OFFSETS, ids=["aligned", "dy-off", "y-off", "g-off"])
@pytest.mark.parametrize("size", SIZES + [1000])
@pytest.mark.parametrize("dtype_name", ALL_DTYPES)
def test_relu_backward_bit_for_bit(dtype_name, size, offsets, gpu, rng):
    dtype = _dtype(dtype_name)
    dy0, y0 = _relu_backward_data(size, dtype, rng)
    dy, y = _placed(dy0, offsets[0]), _placed(y0, offsets[1])
    g = _placed(np.full(size, np.nan, dtype), offsets[2])
    aligned = gpu.aligned(dy, y, g)
    assert aligned == (offsets == (0, 0, 0))
    gpu.launches.clear()
    gpu.run(plans.relu_backward(dy, y, g, aligned, gpu.limits, gpu.tuning))
    assert gpu.launches[0].kernel == f"bn_relu_backward<{bind.storage_name(dtype)}>"
    stop = y0.astype(np.float64) <= 0  # NaN compares false: passes
    expected = np.where(stop, np.zeros((), dtype), dy0).astype(dtype)
    np.testing.assert_array_equal(_bits(g), _bits(expected))


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
def test_run_relu_backward_allocates_and_launches(dtype_name, gpu, rng):
    dtype = _dtype(dtype_name)
    dy, y = _relu_backward_data(77, dtype, rng)
    g = plans.run_relu_backward(gpu, dy, y)
    np.testing.assert_array_equal(_bits(g), _bits(np.where(y.astype(np.float64) <= 0, np.zeros((), dtype), dy)))
    assert plans.run_relu_backward(gpu, dy[:0], y[:0]).size == 0


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("dtype_name", ALL_DTYPES)
@pytest.mark.parametrize("shape,axis", GPU_CASES)
def test_training_and_inference_with_a_residual(shape, axis, dtype_name, relu, gpu, rng):
    """stats + apply_residual, infer_coeffs + apply_residual: against the
    float64 reference."""
    dtype = _dtype(dtype_name)
    x, z = make_input(shape, dtype, rng), make_input(shape, dtype, rng, mean=-1.0)
    lay = channel_layout(shape, axis)
    C, acc = lay.channels, compute_dtype(dtype)
    gamma, beta = make_params(C, rng)
    rm, rv = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    activation = "relu" if relu else None
    ref = reference_forward(x, gamma, beta, rm, rv, axis=axis, activation=activation, residual=z)
    gpu.launches.clear()
    y, out = plans.run_forward_train(gpu, _flat(x), lay, gamma.astype(acc), beta.astype(acc), (rm, rv, 0.1),
                                     1e-5, relu, _flat(z))
    assert [b.kernel.split("<")[0] for b in gpu.launches] == ["bn_stats", "bn_apply_residual"]
    scale = np.abs(ref[0]).max() + 1
    assert_close(y.reshape(shape), ref[0], dtype, "y", scale=scale)
    assert_close(out["invstd"], ref[2], dtype, "invstd")
    assert_close(rm, ref[3], np.float32, "running_mean", scale=np.abs(ref[3]).max() + 1)

    ref = reference_forward(x, gamma, beta, rm, rv, training=False, axis=axis, activation=activation, residual=z)
    gpu.launches.clear()
    y, _ = plans.run_forward_infer(gpu, _flat(x), lay, rm, rv, gamma.astype(acc), beta.astype(acc), 1e-5, relu,
                                   _flat(z))
    assert [b.kernel.split("<")[0] for b in gpu.launches] == ["bn_infer_coeffs", "bn_apply_residual"]
    assert_close(y.reshape(shape), ref[0], dtype, "y (inference)", scale=np.abs(ref[0]).max() + 1)


def _check_bf16_training(gpu, shape, axis, rng, flat=_flat):
    dtype = bfloat16()
    x = make_input(shape, dtype, rng)
    dy = make_input(shape, dtype, rng, mean=0.5, std=1.0)
    lay = channel_layout(shape, axis)
    C = lay.channels
    gamma, beta = make_params(C, rng)
    rm, rv = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    ref = reference_forward(x, gamma, beta, rm, rv, axis=axis)
    y, out = plans.run_forward_train(gpu, flat(x), lay, gamma, beta, (rm, rv, 0.1), 1e-5, False)
    assert y.dtype == dtype and out["mean"].dtype == np.float32 and out["invstd"].dtype == np.float32
    assert_close(y.reshape(shape), ref[0], dtype, "y")
    # statistics of the bfloat16 values themselves: float32-exact
    assert_close(out["mean"], ref[1], np.float32, "mean", scale=np.abs(ref[1]).max() + 1)
    assert_close(out["invstd"], ref[2], np.float32, "invstd", scale=np.abs(ref[2]).max())
    assert_close(rm, ref[3], np.float32, "running_mean", scale=np.abs(ref[3]).max() + 1)
    assert_close(rv, ref[4], np.float32, "running_var", scale=np.abs(ref[4]).max() + 1)
    assert not gpu.counter_array.any()

    mean64, invstd64 = out["mean"].astype(np.float64), out["invstd"].astype(np.float64)
    dx, bout = plans.run_backward(gpu, flat(dy), flat(x), lay, gamma, out["mean"], out["invstd"])
    assert dx.dtype == dtype
    rdx, rdgamma, rdbeta = reference_backward(dy, x, mean64, invstd64, gamma, axis=axis)
    n = x.size // C
    dymax = float(np.abs(dy.astype(np.float64)).max())
    assert_close(dx.reshape(shape), rdx, dtype, "dx", scale=3 * dymax * gamma.max() * invstd64.max())
    # sums of bfloat16 values in float32: float32's tolerance
    assert_close(bout["dbeta"], rdbeta, np.float32, "dbeta", scale=dymax * n)
    assert_close(bout["dgamma"], rdgamma, np.float32, "dgamma", scale=4 * dymax * n)
    assert not gpu.counter_array.any()


#: GPU_CASES and the reductions' walks of test_cupy_scan: bfloat16 vectors
#: of 8 (planes with inner % 8 == 0; rows with C % 8 == 0: 8-byte items of
#: 4 channels for the statistics), the split walk (inner % 8 != 0, inner
#: >= 15), single values.
BF16_LAYOUTS = GPU_CASES + [((40, 3, 128), 1), ((9, 2, 24), 1), ((300, 16), 1), ((129, 24), 1), ((50, 7), 1),
                            ((5, 4, 49), 1), ((16, 3, 15), 1)]


@pytest.mark.parametrize("shape,axis", BF16_LAYOUTS)
def test_bfloat16_statistics_apply_backward_and_dx(shape, axis, gpu, rng):
    _check_bf16_training(gpu, shape, axis, rng)


def _misaligned(a):
    buf = np.empty(a.size + 1, a.dtype)
    view = buf[1:]
    view[...] = a.reshape(-1)
    assert view.ctypes.data % 16 != 0
    return view


@pytest.mark.parametrize("shape,axis", [((40, 3, 128), 1), ((300, 16), 1)])
def test_bfloat16_misaligned_single_values(shape, axis, gpu, rng):
    _check_bf16_training(gpu, shape, axis, rng, flat=_misaligned)


@pytest.mark.parametrize("shape,axis", [((40, 3, 128), 1), ((7, 3, 17), 1), ((129, 24), 1), ((90, 12), 1)])
def test_bfloat16_and_residual_on_the_64_bit_walks(shape, axis, wide_gpu, rng):
    """The walks for 2^31 elements and more (builds with lowered limits):
    bfloat16 reductions and passes, the residual apply and relu_backward."""
    _check_bf16_training(wide_gpu, shape, axis, rng)
    for dtype in (bfloat16(), np.dtype(np.float16), np.dtype(np.float32)):
        for offset in (0, 1):
            lay = channel_layout(shape, axis)
            acc = compute_dtype(dtype)
            x = _placed(make_input((lay.count * lay.channels,), dtype, rng), offset)
            z = _placed(make_input((x.size,), dtype, rng, mean=-3.0), 0)
            y = _placed(np.full(x.size, np.nan, dtype), 0)
            k, scale, shift = (rng.standard_normal(lay.channels).astype(acc) for _ in range(3))
            wide_gpu.run(plans.apply(x, y, lay, k, scale, shift, True, wide_gpu.aligned(x, y, z), wide_gpu.limits,
                                     wide_gpu.tuning, residual=z))
            expected = _expected_apply(x, z, lay.channels, lay.inner, k, scale, shift, True, dtype)
            np.testing.assert_array_equal(_bits(y), _bits(expected))
            dy0, y0 = _relu_backward_data(x.size, dtype, rng)
            dy = _placed(dy0, offset)
            g = plans.run_relu_backward(wide_gpu, dy, _placed(y0, 0))
            np.testing.assert_array_equal(_bits(g), _bits(np.where(y0.astype(np.float64) <= 0,
                                                                   np.zeros((), dtype), dy0)))


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_bfloat16_rounds_to_nearest_even_and_keeps_nan(dtype_name, gpu):
    """The stand-in conversions (cuda_host.h) on the apply's output: ties to
    even, overflow to infinity, NaN stays NaN, as ml_dtypes/NumPy round."""
    dtype = _dtype(dtype_name)
    lay = channel_layout((1, 1, 16), 1)
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    # x exact in the 16-bit type; shift moves it to ties and past the largest value
    x = np.array([1, 1, 1, 1, 2, 2, -1, -1, 3e38 if dtype_name == "bfloat16" else 6e4, np.nan, 0, 0, 1, 1, 1, 1],
                 np.float32).astype(dtype)
    for shift in (2.0**-8, 3 * 2.0**-8, 2.0**-9, 2.0**-11, 1e38, -2.0**-8):
        s = np.full(1, shift, np.float32)
        y = np.full(16, np.nan, dtype)
        gpu.run(plans.apply(x, y, lay, zero, one, s, False, gpu.aligned(x, y), gpu.limits, gpu.tuning))
        with np.errstate(over="ignore"):
            expected = (x.astype(np.float32) + np.float32(shift)).astype(dtype)
        nan = np.isnan(expected.astype(np.float32))
        assert (np.isnan(y.astype(np.float32)) == nan).all()  # NaN kept (CUDA's canonical one)
        np.testing.assert_array_equal(_bits(y)[~nan], _bits(expected)[~nan], err_msg=f"shift {shift}")


# --- the members (gpu.members on the host harness) ----------------------------

@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape,axis", [((6, 3, 5), 1), ((9, 17), 1)])
def test_members_residual_and_relu_backward(shape, axis, dtype_name, gpu, rng):
    """forward_train / forward_infer / normalize with ``residual=``, then
    relu_backward and backward: what bn_forward(residual=z,
    activation="relu") and bn_backward(activation="relu", y=y) run on the
    cupy backend."""
    dtype = _dtype(dtype_name)
    x, z = make_input(shape, dtype, rng), make_input(shape, dtype, rng, mean=-3.0)
    dy = make_input(shape, dtype, rng, mean=0.5)
    C = shape[axis]
    gamma, beta = make_params(C, rng)
    rm, rv = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    ref = reference_forward(x, gamma, beta, rm, rv, axis=axis, activation="relu", residual=z)
    impl = GpuBackend(HostArrays(gpu))
    lay = channel_layout(shape, axis)
    gpu.launches.clear()
    y, mean, invstd = impl.forward_train(x, lay, gamma, beta, 1e-5, True, (rm, rv, 0.1), residual=z)
    assert [b.kernel.split("<")[0] for b in gpu.launches] == ["bn_stats", "bn_apply_residual"]
    assert y.shape == shape and y.dtype == dtype
    assert_close(y, ref[0], dtype, "y", scale=np.abs(ref[0]).max() + 1)

    g = impl.relu_backward(dy, y)
    assert g.shape == shape and g.dtype == dtype
    np.testing.assert_array_equal(_bits(g), _bits(np.where(y.astype(np.float64) <= 0, np.zeros((), dtype), dy)))
    dx, dgamma, dbeta = impl.backward(g, x, lay, mean, invstd, gamma)
    rdx, rdg, rdb = reference_backward(g, x, mean, invstd, gamma, axis=axis)
    assert_close(dx, rdx, dtype, "dx", scale=10)
    assert_close(dbeta, rdb, np.float32, "dbeta", scale=np.abs(rdb).max() + 1)

    ref = reference_forward(x, gamma, beta, rm, rv, training=False, axis=axis, residual=z)
    y, _, _ = impl.forward_infer(x, lay, rm, rv, gamma, beta, 1e-5, False, residual=z)
    assert_close(y, ref[0], dtype, "y (inference)", scale=np.abs(ref[0]).max() + 1)
    norm = impl.finalize_running(x, lay, rm, rv, gamma, beta, 1e-5)
    y2 = impl.normalize(x, lay, norm, False, residual=z)
    assert_close(y2, ref[0], dtype, "y (staged)", scale=np.abs(ref[0]).max() + 1)


# --- ThreadSanitizer -----------------------------------------------------------

tsan = pytest.mark.skipif(not runner.tsan_available(), reason="g++ has no libtsan here")


@tsan
def test_residual_relu_backward_and_bfloat16_are_race_free(rng):
    """bn_apply_residual, bn_relu_backward (vector and single-value walks)
    and the bfloat16 reductions (several blocks per channel, 2-warp blocks)
    under ThreadSanitizer: no data race."""
    so = runner.build(KERNEL_FILE, sources.name_expressions(), tsan=True)
    gpu = HostGPU(None, TUNINGS["2warps"])
    bf16 = bfloat16()
    shape = (8, 3, 17)
    lay = channel_layout(shape, 1)
    launches = []
    for offset in (0, 1):
        x = _placed(make_input((lay.count * 3,), np.float32, rng), offset)
        z = _placed(make_input((x.size,), np.float32, rng), 0)
        y = np.full(x.size, np.nan, np.float32)
        k, scale, shift = (rng.standard_normal(3).astype(np.float32) for _ in range(3))
        launches.append(plans.apply(x, y, lay, k, scale, shift, True, gpu.aligned(x, y, z), gpu.limits, gpu.tuning,
                                    residual=z))
        dy, yv = _relu_backward_data(x.size, bf16, rng)
        dy, g = _placed(dy, offset), _placed(np.full(x.size, np.nan, bf16), 0)
        launches.append(plans.relu_backward(dy, yv, g, gpu.aligned(dy, yv, g), gpu.limits, gpu.tuning))
    xb = _flat(make_input(shape, bf16, rng))
    counters = np.zeros(64, np.uint32)
    stats_plan, _ = plans.stats(xb, lay, None, None, None, 1e-5, gpu.alloc, counters, gpu.limits, gpu.tuning)
    bwd_plan, _ = plans.bwd_reduce(xb, xb, lay, None, np.zeros(3), np.ones(3), gpu.alloc, counters, gpu.limits,
                                   gpu.tuning)
    for plan in launches + [stats_plan, bwd_plan]:
        result = runner.tsan_run(so, bind.bind(plan))
        assert result.clean, result.report


def test_every_storage_dtype_has_every_kernel():
    """sources.name_expressions instantiates the new kernels for each
    storage type, bfloat16 included, and bind names them."""
    names = set(sources.name_expressions())
    for t in sources.STORAGE.values():
        assert {sources.apply_residual_name(t), sources.relu_backward_name(t), sources.apply_name(t),
                sources.dx_name(t)} <= names
    assert bind.storage_name(bfloat16()) == bind.storage_name(np.int16) == "__nv_bfloat16"
    assert len(DTYPES) + 1 == len(sources.STORAGE)


# --- the cupy adapter's bfloat16 handling (CuPy replaced by NumPy) --------------

def test_adapter_bfloat16_bits_conversions_and_buffers(rng):
    """The arrays adapter holds bfloat16 as int16 bits: host bfloat16 data
    goes to the device as its bits, per-channel vectors widen exactly to
    float32, results come back as bfloat16, bfloat16 outputs are int16
    buffers (poisoned with bfloat16's NaN), and the device-side rounding
    (float32 -> bfloat16 bits) is ml_dtypes' (nearest even, NaN kept)."""
    import types

    from bnkernels.backends import cupy_backend as cb

    bf16 = bfloat16()
    xp = types.SimpleNamespace(ascontiguousarray=np.ascontiguousarray, asarray=np.asarray, asnumpy=np.array,
                               where=np.where, isnan=np.isnan, full=np.full, empty=np.empty, zeros=np.zeros)
    dev = types.SimpleNamespace(cp=xp)
    f = np.concatenate([rng.standard_normal(999).astype(np.float32) * 300,
                        np.array([np.inf, -np.inf, 0, -0.0, 3.4e38, 1e-40, -1e-40, np.nan], np.float32)])
    bits = cb.float32_to_bf16(np, f)
    nan = np.isnan(f)
    assert bits.dtype == np.int16
    np.testing.assert_array_equal(bits[~nan].view(np.uint16), f[~nan].astype(bf16).view(np.uint16))
    assert np.isnan(bits[nan].view(bf16).astype(np.float32)).all()
    back = cb.bf16_to_float32(np, bits)
    np.testing.assert_array_equal(back[~nan], f[~nan].astype(bf16).astype(np.float32))

    A = cb.Arrays()
    x = f[:12].astype(bf16).reshape(3, 4)
    op = A.operand(x)
    assert isinstance(op, cb.Bf16Operand) and op.dtype == bf16 and op.is_host
    flat = A.flat(op, dev)
    assert flat.dtype == np.int16 and flat.shape == (12,)
    np.testing.assert_array_equal(flat.view(bf16), x.reshape(-1))
    vec = A.vector(A.operand(x[0]), dev, np.float32)
    np.testing.assert_array_equal(vec, x[0].astype(np.float32))
    y = A.result(op, flat.reshape(3, 4), dev)
    assert y.dtype == bf16 and y.shape == (3, 4)
    np.testing.assert_array_equal(y, x)
    assert A.to_host(flat, dev).dtype == bf16 and A.to_device(x, dev).dtype == np.int16
    target = np.zeros(4, bf16)
    A.write_back(A.operand(target), np.array([1.5, -2, np.nan, 3], np.float32), dev)
    np.testing.assert_array_equal(target.astype(np.float32)[[0, 1, 3]], [1.5, -2, 3])
    assert np.isnan(target.astype(np.float32)[2])

    d = object.__new__(cb._Device)
    d.cp, d.poison = xp, True
    for dtype in (bf16, np.dtype(np.int16)):
        buf = d.alloc((5,), dtype)
        assert buf.dtype == np.int16 and np.isnan(buf.view(bf16).astype(np.float32)).all()
        assert d.zeros((5,), dtype).dtype == np.int16
    assert d.alloc((2,), np.float32).dtype == np.float32
