"""``out=``: results written into a caller's buffer, on every CPU backend:
the same values as a new array, every element written (the buffer is
poisoned with NaN first), in place, strided buffers, and clear errors that
change nothing."""
import numpy as np
import pytest

from bnkernels import bn_backward, bn_forward
from helpers import DTYPES, make_input, make_params

CASES = [((4, 6, 5, 3), 1), ((6, 5, 3, 7), -1), ((33, 9), 1)]


def _poisoned(like):
    return np.full_like(like, np.nan)


def _forward(backend, x, training, **kw):
    C = x.shape[kw.get("axis", 1)]
    rng = np.random.default_rng(3)
    gamma, beta = make_params(C, rng)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y = bn_forward(x, gamma, beta, rm, rv, training=training, activation="relu", backend=backend, **kw)
    return y, rm, rv


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_forward_into_out_equals_a_new_result(backend, shape, axis, dtype, training, rng):
    x = make_input(shape, dtype, rng)
    expected, rm0, rv0 = _forward(backend, x, training, axis=axis)
    out = _poisoned(x)
    y, rm, rv = _forward(backend, x, training, axis=axis, out=out)
    assert y is out
    np.testing.assert_array_equal(out, expected)  # NaN poison anywhere would fail
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)


def _backward_case(backend, shape, axis, dtype, rng):
    """x, dy, gamma, the saved statistics, and bn_backward's new arrays."""
    x = make_input(shape, dtype, rng)
    dy = make_input(shape, dtype, rng, mean=0.0, std=1.0)
    gamma, beta = make_params(shape[axis], rng)
    _, saved = bn_forward(x, gamma, beta, axis=axis, backend=backend, return_saved=True)
    expected = bn_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis, backend=backend)
    return x, dy, gamma, saved, expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_backward_into_out_equals_a_new_result(backend, shape, axis, dtype, rng):
    x, dy, gamma, saved, expected = _backward_case(backend, shape, axis, dtype, rng)
    out = _poisoned(x)
    got = bn_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis, backend=backend, out=out)
    assert got[0] is out
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_in_place(backend, shape, axis, dtype, rng):
    x, dy, gamma, saved, (dx_expected, _, _) = _backward_case(backend, shape, axis, dtype, rng)
    expected, _, _ = _forward(backend, x, True, axis=axis)
    for name in ("dy", "x"):
        arrays = {"dy": dy.copy(), "x": x.copy()}
        dx = bn_backward(arrays["dy"], arrays["x"], saved.mean, saved.invstd, gamma, axis=axis, backend=backend,
                         out=arrays[name])[0]
        assert dx is arrays[name]
        np.testing.assert_array_equal(dx, dx_expected, err_msg=f"in place into {name}")
    xi = x.copy()
    y, _, _ = _forward(backend, xi, True, axis=axis, out=xi)
    assert y is xi
    np.testing.assert_array_equal(xi, expected)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_strided_out_fills_only_its_elements(backend, dtype, rng):
    x = make_input((4, 6, 5, 3), dtype, rng)
    expected, _, _ = _forward(backend, x, True)
    base = _poisoned(np.empty((4, 6, 5, 6), dtype))
    out = base[..., ::2]
    y, _, _ = _forward(backend, x, True, out=out)
    assert y is out
    np.testing.assert_array_equal(out, expected)
    assert np.isnan(base[..., 1::2]).all()  # the gaps are not written


def test_bad_out_is_rejected_and_changes_nothing(backend, rng):
    x = make_input((4, 6, 5, 3), np.float32, rng)
    dy = make_input(x.shape, np.float32, rng)
    big = np.zeros((2,) + x.shape, np.float32)
    readonly = np.zeros_like(x)
    readonly.flags.writeable = False
    xs = np.zeros((x.size + 1,), np.float32)
    shifted = xs[1:].reshape(x.shape)  # overlaps xs[:-1] without being it
    xs[:-1] = x.reshape(-1)
    x_overlapped = xs[:-1].reshape(x.shape)
    bad = [
        (np.zeros((4, 6, 5)), ValueError, "shape"),
        (np.zeros(x.shape, np.float64), TypeError, "dtype"),
        (x.tolist(), TypeError, "ndarray"),
        (readonly, ValueError, "read-only"),
        (big[0][None][0], None, None),  # a fine view: accepted
        (shifted, ValueError, "overlaps x"),
    ]
    for out, error, match in bad:
        rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
        before = x_overlapped.copy()
        if error is None:
            bn_forward(x_overlapped, None, None, rm, rv, backend=backend, out=out)
            continue
        with pytest.raises(error, match=match):
            bn_forward(x_overlapped, None, None, rm, rv, backend=backend, out=out)
        np.testing.assert_array_equal(rm, 0)  # nothing updated
        np.testing.assert_array_equal(rv, 1)
        np.testing.assert_array_equal(x_overlapped, before)
    mean, invstd = np.zeros(6, np.float32), np.ones(6, np.float32)
    with pytest.raises(ValueError, match="overlaps dy"):
        bn_backward(dy, x, mean, invstd, backend=backend, out=np.lib.stride_tricks.as_strided(dy[:, ::-1]))
    with pytest.raises(TypeError, match="dtype"):
        bn_backward(dy, x, mean, invstd, backend=backend, out=np.zeros(x.shape, np.float16))
