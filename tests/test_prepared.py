"""Prepared calls (``bnkernels.prepare_forward`` / ``prepare_backward``):
the same results as ``bn_forward`` / ``bn_backward`` call after call, the
same checks once, and a clear error when a call's arrays are not what was
prepared."""
import numpy as np
import pytest

from bnkernels import bn_backward, bn_forward, prepare_backward, prepare_forward
from helpers import assert_close, make_input, make_params


@pytest.mark.parametrize("shape,axis", [((6, 3, 5), 1), ((9, 4), 1), ((4, 5, 3), -1)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_prepared_calls_match_the_plain_ones(backend, shape, axis, dtype, rng):
    C = shape[axis]
    gamma, beta = make_params(C, rng)
    rm, rv = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    rm2, rv2 = rm.copy(), rv.copy()
    x0 = make_input(shape, dtype, rng)
    forward = prepare_forward(x0, gamma, beta, rm, rv, axis=axis, backend=backend)
    np.testing.assert_array_equal(rm, rm2)  # preparing computes nothing
    for _ in range(3):  # new data each call, as in a training loop
        x = make_input(shape, dtype, rng)
        y, saved = forward(x, gamma, beta, rm, rv)
        y2, saved2 = bn_forward(x, gamma, beta, rm2, rv2, axis=axis, backend=backend, return_saved=True)
        np.testing.assert_array_equal(y, y2)
        np.testing.assert_array_equal(saved.mean, saved2.mean)
        np.testing.assert_array_equal(rm, rm2)
        np.testing.assert_array_equal(rv, rv2)
    dy = make_input(shape, dtype, rng, mean=0.5)
    backward = prepare_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis, backend=backend)
    for _ in range(2):
        dy = make_input(shape, dtype, rng, mean=0.5)
        got = backward(dy, x, saved.mean, saved.invstd, gamma)
        want = bn_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis, backend=backend)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


def test_cumulative_average_takes_the_count_per_call(backend, rng):
    x = make_input((8, 3), np.float64, rng)
    rm, rv = np.zeros(3), np.ones(3)
    rm2, rv2 = rm.copy(), rv.copy()
    forward = prepare_forward(x, None, None, rm, rv, momentum=None, backend=backend)
    for n in range(3):
        x = make_input((8, 3), np.float64, rng)
        forward(x, None, None, rm, rv, num_batches_tracked=n)
        bn_forward(x, None, None, rm2, rv2, momentum=None, num_batches_tracked=n, backend=backend)
        assert_close(rm, rm2, np.float64, "running_mean")
    with pytest.raises((TypeError, ValueError), match="num_batches_tracked"):
        forward(x, None, None, rm, rv)


@pytest.mark.parametrize("what,change", [
    ("x", lambda a: a[..., :-1]),
    ("x", lambda a: a.astype(np.float64)),
    ("gamma", lambda a: None),
    ("running_var", lambda a: a.astype(np.float64)),
])
def test_a_call_unlike_the_prepared_one_is_refused_and_changes_nothing(what, change, rng):
    x = make_input((6, 4, 5), np.float32, rng)
    gamma, beta = make_params(4, rng)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    forward = prepare_forward(x, gamma, beta, rm, rv)
    args = {"x": x, "gamma": gamma, "beta": beta, "running_mean": rm, "running_var": rv}
    args[what] = change(args[what])
    with pytest.raises(ValueError, match=f"{what} is a .* but this call was prepared for"):
        forward(**args)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


def test_running_statistics_that_overlap_the_input_are_refused(rng):
    x = make_input((6, 4), np.float32, rng)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    forward = prepare_forward(x, None, None, rm, rv)
    bad = np.ascontiguousarray(make_input((6, 4), np.float32, rng))
    before = bad.copy()
    with pytest.raises(ValueError, match="running_mean overlaps x"):
        forward(bad, None, None, bad[0], rv)  # running_mean is the first row of x
    np.testing.assert_array_equal(bad, before)


def test_preparing_checks_what_bn_forward_checks(rng):
    x = make_input((6, 4), np.float32, rng)
    with pytest.raises(ValueError, match="gamma must have shape"):
        prepare_forward(x, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        prepare_forward(x[:1])
    with pytest.raises(ValueError, match="saved_mean is required"):
        prepare_backward(x, x, None, None)
