"""bn_forward against the float64 reference on every CPU backend."""
import numpy as np
import pytest

from bnkernels import bn_forward
from bnkernels.reference import reference_forward
from helpers import DTYPES, assert_close, make_input, make_params, strided

# (shape, axis): 2-D to 5-D, channel axis first, second, middle and last,
# boundary sizes 1, 15, 16, 17, 127, 129 and primes.
CASES = [
    ((16, 3), 1),
    ((129, 17), 1),
    ((2, 5), 0),
    ((127, 5), -1),
    ((15, 4, 7), 1),
    ((3, 16, 17), -1),
    ((17, 5, 3), 0),
    ((4, 3, 5, 7), 1),
    ((2, 5, 7, 16), -1),
    ((3, 4, 13, 2), 2),
    ((2, 3, 2, 3, 5), 1),
    ((2, 2, 3, 5, 11), -2),
    ((1, 1, 31), 1),     # one channel, channel axis of size 1
    ((2, 129), 1),       # 2 values per channel, the minimum for training
]


def _check_forward(backend, x, dtype, *, affine, running, momentum, training, activation, axis, rng):
    C = x.shape[axis]
    gamma, beta = make_params(C, rng) if affine else (None, None)
    rm = rng.standard_normal(C).astype(np.float32) if running else None
    rv = rng.uniform(0.5, 2, C).astype(np.float32) if running else None
    nbt = 3 if momentum is None else None
    ref = reference_forward(x, gamma, beta, rm, rv, training=training, momentum=momentum, axis=axis,
                            activation=activation, num_batches_tracked=nbt)
    y, saved = bn_forward(x, gamma, beta, rm, rv, training=training, momentum=momentum, axis=axis,
                          activation=activation, backend=backend, return_saved=True,
                          num_batches_tracked=nbt)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, ref[0], dtype, "y")
    stat_dtype = np.float64 if dtype == np.float64 else np.float32
    assert saved.mean.dtype == stat_dtype and saved.invstd.dtype == stat_dtype
    if training:
        assert_close(saved.mean, ref[1], dtype, "saved.mean", scale=np.abs(ref[1]).max() + 1)
        assert_close(saved.invstd, ref[2], dtype, "saved.invstd")
    if running:
        # running stats are float32 here: their own rounding dominates
        assert_close(rm, ref[3], np.float32, "running_mean", scale=np.abs(ref[3]).max() + 1)
        assert_close(rv, ref[4], np.float32, "running_var", scale=np.abs(ref[4]).max() + 1)


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_matches_reference(backend, shape, axis, dtype, training, rng):
    x = make_input(shape, dtype, rng)
    _check_forward(backend, x, dtype, affine=True, running=True, momentum=0.1, training=training,
                   activation=None, axis=axis, rng=rng)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("running", [True, False])
@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0, None])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_option_combinations(backend, affine, running, momentum, activation, rng):
    x = make_input((5, 7, 3, 4), np.float32, rng)
    _check_forward(backend, x, np.float32, affine=affine, running=running, momentum=momentum,
                   training=True, activation=activation, axis=1, rng=rng)


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("affine", [True, False])
def test_inference_options(backend, activation, affine, rng):
    x = make_input((6, 5, 9), np.float64, rng)
    _check_forward(backend, x, np.float64, affine=affine, running=True, momentum=0.1, training=False,
                   activation=activation, axis=1, rng=rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind", ["strided", "transposed", "fortran"])
def test_non_contiguous_input(backend, kind, training, dtype, rng):
    base = make_input((6, 5, 4, 7), dtype, rng)
    if kind == "strided":
        x = strided(base, rng)
    elif kind == "transposed":
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(base, 1, -1)), -1, 1)
    else:
        x = np.asfortranarray(base)
    assert not x.flags.c_contiguous
    np.testing.assert_array_equal(x, base)
    _check_forward(backend, x, dtype, affine=True, running=True, momentum=0.1, training=training,
                   activation=None, axis=1, rng=rng)


@pytest.mark.parametrize("shape,axis", [((64, 3, 8, 8), 1), ((64, 8, 8, 3), -1), ((4096, 3), 1),
                                        ((3, 4096), 0), ((8, 8, 3, 8), 2)])
def test_large_mean_is_exact_in_float32(backend, shape, axis, rng):
    """1e4 + randn in float32: y within 1e-4 (in units of the batch std) of
    the float64 reference in every layout, where E[x^2]-E[x]^2 or a float32
    x - mean would be off by 1e-3 to 1e-1."""
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    y = bn_forward(x, axis=axis, backend=backend)
    ref = reference_forward(x, axis=axis)[0]  # no affine: y is in units of the batch std
    err = np.abs(y.astype(np.float64) - ref).max()
    assert err <= 1e-4, f"max error {err:.3g} batch stds"


@pytest.mark.parametrize("dtype", DTYPES)
def test_inference_large_running_mean_is_exact(backend, dtype, rng):
    x = (1e3 + rng.standard_normal((33, 4))).astype(dtype)
    rm = np.asarray(x.astype(np.float64).mean(0), np.float64)
    rv = x.astype(np.float64).var(0)
    y = bn_forward(x, None, None, rm, rv, training=False, backend=backend)
    ref = reference_forward(x, None, None, rm, rv, training=False)[0]
    assert_close(y, ref, dtype, "y")


def test_half_keeps_float16_and_computes_wide(backend, rng):
    """Half input whose sums would overflow float16 (> 65504) still works."""
    x = (300 + 5 * rng.standard_normal((64, 4, 32))).astype(np.float16)
    y = bn_forward(x, backend=backend)
    assert y.dtype == np.float16 and np.isfinite(y).all()
    assert_close(y, reference_forward(x)[0], np.float16, "y")


def test_empty_channels_and_empty_inference_batch(backend, rng):
    x = np.zeros((4, 0, 3), np.float32)
    y = bn_forward(x, backend=backend)
    assert y.shape == x.shape and y.dtype == x.dtype
    x = np.zeros((0, 3), np.float32)
    y = bn_forward(x, None, None, np.zeros(3, np.float32), np.ones(3, np.float32), training=False,
                   backend=backend)
    assert y.shape == (0, 3)


def test_constant_channel_gives_beta(backend, rng):
    x = np.full((8, 3), 7.5, np.float32)
    beta = np.array([1.0, -2.0, 0.5], np.float32)
    y = bn_forward(x, None, beta, backend=backend)
    np.testing.assert_array_equal(y, np.broadcast_to(beta, x.shape))


def test_nan_and_inf_propagate(backend, rng):
    x = make_input((6, 3), np.float32, rng)
    x[2, 1] = np.nan
    y = bn_forward(x, backend=backend, activation="relu")
    assert np.isnan(y[:, 1]).all(), "a NaN in a channel poisons that channel's statistics"
    assert np.isfinite(y[:, [0, 2]]).all(), "other channels are unaffected"


def test_input_is_not_modified(backend, rng):
    x = make_input((6, 4, 5), np.float32, rng)
    before = x.copy()
    bn_forward(x, backend=backend, activation="relu")
    np.testing.assert_array_equal(x, before)


def test_list_input_is_accepted(backend):
    y = bn_forward([[1.0, 2.0], [3.0, 6.0]], backend=backend)
    np.testing.assert_allclose(y, [[-1, -1], [1, 1]], atol=1e-5)


def test_ieee_semantics_without_warnings(backend, rng):
    """eps=0 on a constant channel gives NaN and a float16 result beyond
    65504 gives Inf, as on a GPU, and neither warns (pytest turns warnings
    into errors here)."""
    x = np.full((4, 2), 2.0, np.float32)
    x[:, 1] = [1, 2, 3, 4]
    y = bn_forward(x, eps=0.0, backend=backend)
    assert np.isnan(y[:, 0]).all() and np.isfinite(y[:, 1]).all()
    x16 = make_input((8, 3), np.float16, rng)
    y16 = bn_forward(x16, np.full(3, 1e5, np.float32), backend=backend)
    assert np.isinf(y16).any() and not np.isnan(y16).any()
    y, saved = bn_forward(x, None, None, np.zeros(2), np.zeros(2), training=False, eps=0.0,
                          return_saved=True, backend=backend)
    assert np.isinf(saved.invstd).all()


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_float16_running_statistics(backend, dtype, rng):
    """As torch's model.half() gives them: updated in float32 or better and
    stored rounded; inference reads them."""
    x = make_input((8, 3, 5), dtype, rng, mean=3.0)
    rm, rv = np.full(3, 0.25, np.float16), np.full(3, 1.5, np.float16)
    ref = reference_forward(x, None, None, rm.astype(np.float64), rv.astype(np.float64))
    y = bn_forward(x, None, None, rm, rv, backend=backend)
    assert rm.dtype == np.float16 and rv.dtype == np.float16
    np.testing.assert_array_equal(rm, ref[3].astype(np.float16))  # rounded once, from the exact update
    np.testing.assert_allclose(rv, ref[4].astype(np.float16), rtol=1e-3)
    assert_close(y, ref[0], dtype, "y")
    y_infer = bn_forward(x, None, None, rm, rv, training=False, backend=backend)
    assert_close(y_infer, reference_forward(x, None, None, rm, rv, training=False)[0], dtype, "y (inference)")
