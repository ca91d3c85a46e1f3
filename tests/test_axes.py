"""Several parameter axes (``axis=(1, 2)``; ``bnkernels/axes.py``): on every
backend against the float64 reference (whose axis tuples are computed
directly, not through the merge), with strided inputs, and the errors."""
import numpy as np
import pytest

from bnkernels import BatchNorm, bn_backward, bn_forward, channel_stats
from bnkernels.reference import reference_backward, reference_forward, reference_stats
from helpers import assert_close, make_input

CASES = [((4, 3, 5, 6), (1, 2)), ((4, 3, 5, 6), (1, 3)), ((4, 3, 5, 6), (-1, 1)), ((6, 2, 7), (0, 2)),
         ((5, 4, 3), (0, 1)), ((3, 4, 5), (2,))]


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_and_backward_on_several_axes(backend, shape, axis, dtype, rng):
    x = make_input(shape, dtype, rng, mean=4.0)
    P = tuple(shape[a] for a in sorted(a % len(shape) for a in axis))
    gamma, beta = rng.uniform(0.5, 2, P).astype(np.float32), rng.standard_normal(P).astype(np.float32)
    rm, rv = np.zeros(P, np.float32), np.ones(P, np.float32)
    ref = reference_forward(x, gamma, beta, rm, rv, axis=axis)
    y, saved = bn_forward(x, gamma, beta, rm, rv, axis=axis, backend=backend, return_saved=True)
    assert y.shape == shape and y.dtype == dtype and saved.mean.shape == P
    assert_close(y, ref[0], dtype, "y")
    assert_close(saved.mean, ref[1], dtype, "saved.mean", scale=np.abs(ref[1]).max())
    assert_close(rm, ref[3], np.float32, "running_mean", scale=np.abs(ref[3]).max())
    assert_close(rv, ref[4], np.float32, "running_var", scale=np.abs(ref[4]).max())
    y_inf = bn_forward(x, gamma, beta, rm, rv, axis=axis, training=False, backend=backend)
    assert_close(y_inf, reference_forward(x, gamma, beta, rm, rv, axis=axis, training=False)[0], dtype, "y eval")

    dy = make_input(shape, dtype, rng, mean=0.5)
    dx, dgamma, dbeta = bn_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis, backend=backend)
    rdx, rdg, rdb = reference_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis)
    assert dx.shape == shape and dgamma.shape == P
    assert_close(dx, rdx, dtype, "dx", scale=10)
    assert_close(dgamma, rdg, dtype, "dgamma", scale=np.abs(rdg).max() + 1)
    assert_close(dbeta, rdb, dtype, "dbeta", scale=np.abs(rdb).max() + 1)

    s = channel_stats(x, axis=axis, backend=backend)
    n, mean, var = reference_stats(x, axis=axis)
    assert s.count == n and s.mean.shape == P
    assert_close(s.var, var, dtype, "var", scale=np.abs(var).max())


def test_strided_input_and_in_place_output(backend, rng):
    x = make_input((4, 3, 10, 6), np.float32, rng)[:, :, ::2]  # not contiguous: merged by a copy
    y = bn_forward(x, axis=(1, 2), backend=backend)
    assert_close(y, reference_forward(x, axis=(1, 2))[0], np.float32, "y")
    x = make_input((4, 3, 5, 6), np.float32, rng)
    expected = reference_forward(x, axis=(1, 2))[0]
    assert bn_forward(x, axis=(1, 2), out=x, backend=backend) is x
    assert_close(x, expected, np.float32, "in place")


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(axis=()), ValueError, "at least one axis"),
    (dict(axis=(1, 1)), ValueError, "names an axis twice"),
    (dict(axis=(1, 7)), ValueError, "axis 7 in"),
    (dict(axis=(1, "2")), TypeError, "tuple of ints"),
    (dict(axis=(1, 2), gamma=np.ones(15, np.float32)), ValueError, r"gamma must have shape \(3, 5\)"),
    (dict(axis=(1, 3), out=np.empty((4, 3, 5, 6), np.float32)), TypeError, "out must be C-contiguous and the axes"),
    (dict(axis=(1, 2), running_mean=np.zeros((5, 3), np.float32).T, running_var=np.ones((3, 5), np.float32)),
     TypeError, "running_mean must be C-contiguous"),
])
def test_bad_axes_and_shapes_are_refused_and_change_nothing(backend, rng, kwargs, exc, match):
    x = make_input((4, 3, 5, 6), np.float32, rng)
    args = dict(gamma=None, running_mean=np.zeros((3, 5), np.float32), running_var=np.ones((3, 5), np.float32))
    args.update(kwargs)
    before = args["running_mean"].copy()
    with pytest.raises(exc, match=match):
        bn_forward(x, backend=backend, **args)
    np.testing.assert_array_equal(args["running_mean"], before)


def test_several_axes_against_keras_semantics(rng):
    """Keras' BatchNormalization(axis=[1, 2]) keeps parameters of the axes'
    shape; the normalization is per element of those axes (here checked
    against torch's BatchNorm1d on the merged view, where torch is
    installed)."""
    torch = pytest.importorskip("torch")
    x = make_input((8, 3, 4, 5), np.float32, rng)
    y = bn_forward(x, axis=(1, 2))
    ref = torch.nn.BatchNorm1d(12)(torch.from_numpy(x.reshape(8, 12, 5))).detach().numpy().reshape(x.shape)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_the_layer_on_several_axes(backend, rng):
    layer = BatchNorm((3, 5), axis=(1, 2), backend=backend, dtype=np.float64)
    lazy = BatchNorm(axis=(1, 2), backend=backend, dtype=np.float64)
    assert layer.gamma.shape == (3, 5)
    for _ in range(2):
        x = make_input((4, 3, 5, 6), np.float64, rng)
        ref = reference_forward(x, layer.gamma, layer.beta, layer.running_mean, layer.running_var, axis=(1, 2))
        y = layer(x)
        assert_close(y, ref[0], np.float64, "y")
        np.testing.assert_array_equal(lazy(x), y)  # the lazy layer is the same layer once it has its shape
        assert_close(layer.running_mean, ref[3], np.float64, "running_mean")
    assert lazy.num_features == (3, 5) and lazy.running_mean.shape == (3, 5)
    dx = layer.backward(np.ones_like(x))
    assert dx.shape == x.shape and layer.grad_gamma.shape == (3, 5)
    with pytest.raises(ValueError, match=r"expects \(3, 5\) channels along axis \(1, 2\)"):
        layer(make_input((4, 3, 4, 6), np.float64, rng))
    fresh = BatchNorm(axis=(1, 2), backend=backend)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.num_features == (3, 5)
    with pytest.raises(TypeError, match="num_features must be the shape of the axes"):
        BatchNorm(15, axis=(1, 2))
