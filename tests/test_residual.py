"""The fused residual (issue 13, item 11): ``bn_forward(x, ..., residual=z,
activation="relu")`` is ``relu(bn(x) + z)`` in the apply pass, and
``bn_backward(..., activation="relu", y=y, residual=True)`` its gradient,
on every CPU backend: against the float64 reference and torch's autograd,
on boundary shapes, layouts, strides, in place, and with bad arguments
(clear errors, nothing written). The GPU backends' tests:
``tests/cudasim/test_residual_bf16.py``, ``tests/host_cuda``."""
import numpy as np
import pytest

from bnkernels import bn_backward, bn_forward
from bnkernels.reference import reference_backward, reference_forward
from helpers import DTYPES, assert_close, bfloat16, make_input, make_params, strided

SHAPES = [((2, 1), 1), ((4, 3, 15), 1), ((5, 16, 3), -1), ((17, 4), 1), ((3, 5, 127), 1), ((2, 129, 2), 1),
          ((13, 3), -1), ((2, 7, 1, 3), 1)]


def _dtype(name):
    return bfloat16() if name == "bfloat16" else np.dtype(name)


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("training", [True, False])
def test_forward_adds_the_residual_before_the_relu(backend, shape, axis, dtype, training, rng):
    dtype = _dtype(dtype)
    C = shape[axis]
    x, z = make_input(shape, dtype, rng), make_input(shape, dtype, rng, mean=-2.0, std=3.0)
    gamma, beta = make_params(C, rng)
    rm, rv = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    rm0, rv0 = rm.copy(), rv.copy()
    for relu in (None, "relu"):
        rm[:], rv[:] = rm0, rv0
        y, saved = bn_forward(x, gamma, beta, rm, rv, training=training, axis=axis, activation=relu,
                              residual=z, backend=backend, return_saved=True)
        y_ref, _, _, rm_ref, rv_ref = reference_forward(x, gamma, beta, rm0, rv0, training=training, axis=axis,
                                                        activation=relu, residual=z)
        assert y.dtype == dtype and y.shape == shape
        assert_close(y, y_ref, dtype, "y", scale=np.abs(y_ref).max())
        if relu:
            assert (np.asarray(y, np.float64) >= 0).all()
        assert_close(rm, rm_ref, np.float32, "running_mean")
        assert_close(rv, rv_ref, np.float32, "running_var", scale=np.abs(rv_ref).max())
        assert saved.mean.dtype == (np.float64 if dtype == np.float64 else np.float32)


@pytest.mark.parametrize("layout", ["strided x", "strided z", "transposed z", "channels last"])
def test_residual_of_any_strides(backend, layout, rng):
    shape = (4, 6, 3, 5)
    base_x, base_z = make_input(shape, np.float32, rng), make_input(shape, np.float32, rng, mean=-1.0)
    x, z = base_x, base_z
    if layout == "strided x":
        x = strided(base_x, rng)
    elif layout == "strided z":
        z = strided(base_z, rng)
    elif layout == "transposed z":  # z contiguous in another order than x
        z = np.ascontiguousarray(base_z.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    else:  # both channels-last (NCHW seen through NHWC memory): run in that order
        x = np.ascontiguousarray(base_x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        z = np.ascontiguousarray(base_z.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    y = bn_forward(x, residual=z, activation="relu", backend=backend)
    y_ref = reference_forward(base_x, activation="relu", residual=base_z)[0]
    assert_close(y, y_ref, np.float32, "y", scale=np.abs(y_ref).max())
    if layout == "channels last":
        assert y.strides == x.strides  # the input's memory layout kept


@pytest.mark.parametrize("into", ["residual", "x"])
def test_in_place_into_the_residual_or_x(backend, into, rng):
    x, z = make_input((6, 3, 7), np.float32, rng), make_input((6, 3, 7), np.float32, rng, mean=0.5)
    y_ref = reference_forward(x, activation="relu", residual=z)[0]
    out = z if into == "residual" else x
    y = bn_forward(x, residual=z, activation="relu", out=out, backend=backend)
    assert y is out
    assert_close(out, y_ref, np.float32, "y", scale=np.abs(y_ref).max())


def test_several_axes_and_mask_with_a_residual(backend, rng):
    x, z = make_input((5, 4, 3, 6), np.float64, rng), make_input((5, 4, 3, 6), np.float64, rng)
    y = bn_forward(x, residual=z, axis=(1, 2), backend=backend)
    m = reference_forward(x.reshape(5, 12, 6), axis=1)[0].reshape(x.shape) + z
    assert_close(y, m, np.float64, "y (axis=(1, 2))", scale=np.abs(m).max())
    mask = rng.random((5, 3, 6)) < 0.7
    y = bn_forward(x, residual=z, mask=mask, backend=backend)
    sel = np.moveaxis(x, 1, -1)[mask]  # (positions, C)
    mean, var = sel.mean(0), sel.var(0)
    expected = (x - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5) + z
    assert_close(y, expected, np.float64, "y (mask)", scale=np.abs(expected).max())


@pytest.mark.parametrize("shape,axis", [((6, 3, 5), 1), ((9, 4), -1), ((2, 1, 17), 1)])
@pytest.mark.parametrize("training", [True, False])
def test_backward_matches_torch_autograd(backend, shape, axis, training, rng):
    torch = pytest.importorskip("torch")
    C = shape[axis]
    x, z, dy = (make_input(shape, np.float64, rng, mean=m) for m in (3.0, -0.5, 0.2))
    gamma, beta = (a.astype(np.float64) for a in make_params(C, rng))
    rm, rv = rng.standard_normal(C), rng.uniform(0.5, 2, C)
    y, saved = bn_forward(x, gamma, beta, rm.copy(), rv.copy(), training=training, axis=axis, activation="relu",
                          residual=z, backend=backend, return_saved=True)
    dx, dgamma, dbeta, dz = bn_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis, training=training,
                                        activation="relu", y=y, residual=True, backend=backend)
    xt, zt, gt, bt = (torch.from_numpy(a.copy()).requires_grad_() for a in (x, z, gamma, beta))
    moved = [t.movedim(axis, 1) for t in (xt, zt)]
    yt = torch.relu(torch.nn.functional.batch_norm(moved[0], torch.from_numpy(rm.copy()),
                                                   torch.from_numpy(rv.copy()), gt, bt, training=training)
                    + moved[1]).movedim(1, axis)
    yt.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-10)
    for got, want, what in ((dx, xt, "dx"), (dz, zt, "dz"), (dgamma, gt, "dgamma"), (dbeta, bt, "dbeta")):
        np.testing.assert_allclose(got, want.grad.numpy(), rtol=1e-9, atol=1e-9, err_msg=what)


def test_backward_gradient_flows_where_y_is_positive_or_nan(backend, rng):
    dy = make_input((4, 3, 5), np.float32, rng)
    y = rng.standard_normal((4, 3, 5)).astype(np.float32)
    y[0, 0, :2] = 0.0
    y[1, 1, 1] = np.nan  # torch's threshold_backward: y <= 0 is false for NaN, so dy passes
    x = make_input((4, 3, 5), np.float32, rng)
    _, saved = bn_forward(x, backend=backend, return_saved=True)
    *grads, dz = bn_backward(dy, x, saved.mean, saved.invstd, activation="relu", y=y, residual=True,
                             backend=backend)
    g = np.where(y <= 0, 0, dy)
    np.testing.assert_array_equal(dz, g)
    for got, want in zip(grads, reference_backward(g, x, saved.mean, saved.invstd)):
        assert_close(got, want, np.float32, "grad", scale=np.abs(want).max())


def test_backward_without_activation_returns_dy_as_dz(backend, rng):
    x, dy = make_input((5, 2, 3), np.float32, rng), make_input((5, 2, 3), np.float32, rng)
    _, saved = bn_forward(x, backend=backend, return_saved=True)
    dx, dgamma, dbeta, dz = bn_backward(dy, x, saved.mean, saved.invstd, residual=True, backend=backend)
    assert dz is dy
    np.testing.assert_array_equal(dx, bn_backward(dy, x, saved.mean, saved.invstd, backend=backend)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_backward_keeps_dtype_and_memory_order(backend, dtype, rng):
    base = make_input((3, 4, 5, 6), dtype, rng)
    dy = np.ascontiguousarray(base.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    y = np.ascontiguousarray(rng.standard_normal(base.shape).astype(dtype).transpose(0, 2, 3, 1)).transpose(
        0, 3, 1, 2)
    x = make_input(base.shape, dtype, rng)
    _, saved = bn_forward(x, backend=backend, return_saved=True)
    *_, dz = bn_backward(dy, x, saved.mean, saved.invstd, activation="relu", y=y, residual=True, backend=backend)
    assert dz.dtype == dtype and dz.strides == dy.strides
    np.testing.assert_array_equal(dz, np.where(y <= 0, 0, dy))


def test_bad_residual_is_refused_and_nothing_is_written(backend, rng):
    x = make_input((4, 3, 5), np.float32, rng)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    cases = [
        (np.zeros((4, 3, 6), np.float32), ValueError, "residual must have the shape of x"),
        (np.zeros((4, 3, 5), np.float64), TypeError, "residual must have the dtype of x"),
        (np.zeros((4, 3, 5), np.int32), TypeError, "residual must have dtype"),
        ("nope", TypeError, "residual"),
    ]
    for z, exc, match in cases:
        with pytest.raises(exc, match=match):
            bn_forward(x, None, None, rm, rv, residual=z, backend=backend)
        np.testing.assert_array_equal(rm, 0)
        np.testing.assert_array_equal(rv, 1)
    # the running statistics may not overlap the residual (they are written, it is read)
    z = make_input((4, 3, 5), np.float32, rng)
    with pytest.raises(ValueError, match="running_mean.*residual|residual.*running_mean"):
        bn_forward(x, None, None, z[0, 0, :3], rv, residual=z, backend=backend)
    np.testing.assert_array_equal(rv, 1)


def test_bad_activation_arguments_of_the_backward(backend, rng):
    x, dy = make_input((4, 3, 5), np.float32, rng), make_input((4, 3, 5), np.float32, rng)
    _, saved = bn_forward(x, backend=backend, return_saved=True)
    args = (dy, x, saved.mean, saved.invstd)
    with pytest.raises(ValueError, match="activation='relu' needs y"):
        bn_backward(*args, activation="relu", backend=backend)
    with pytest.raises(ValueError, match="y is only used with activation='relu'"):
        bn_backward(*args, y=dy, backend=backend)
    with pytest.raises(ValueError, match="y must have the shape of x"):
        bn_backward(*args, activation="relu", y=dy[:2], backend=backend)
    with pytest.raises(ValueError, match="activation"):
        bn_backward(*args, activation="gelu", y=dy, backend=backend)
    with pytest.raises(TypeError, match="residual"):
        bn_backward(*args, residual="yes", backend=backend)
