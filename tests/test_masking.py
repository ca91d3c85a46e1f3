"""Keras masking (``mask=``; ``bnkernels/masking.py``): statistics of the
masked positions only, output everywhere, and the gradient of exactly
that, against torch's autograd of the masked formula, on every backend."""
import numpy as np
import pytest

from bnkernels import BatchNorm, bn_backward, bn_forward
from helpers import assert_close, make_input


def _torch_reference(x, mask, gamma, beta, axis, eps=1e-5):
    """The masked batch norm written out in torch (float64), with autograd."""
    torch = pytest.importorskip("torch")
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    gt = torch.from_numpy(gamma.astype(np.float64)).requires_grad_()
    bt = torch.from_numpy(beta.astype(np.float64)).requires_grad_()
    m = torch.from_numpy(np.expand_dims(mask, axis).astype(np.float64))
    others = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    n = m.sum(others, keepdim=True) * 1  # the mask broadcast over the channel axis: same count per channel
    mean = (xt * m).sum(others, keepdim=True) / n
    var = (m * (xt - mean) ** 2).sum(others, keepdim=True) / n
    y = (xt - mean) / torch.sqrt(var + eps) * gt.reshape(shape) + bt.reshape(shape)
    return xt, gt, bt, y, mean.reshape(-1), var.reshape(-1)


@pytest.mark.parametrize("shape,axis", [((4, 7, 3), -1), ((4, 3, 7), 1), ((5, 2, 3, 4), 1)])
def test_masked_forward_and_backward_against_torch_autograd(backend, shape, axis, rng):
    x = make_input(shape, np.float64, rng, mean=2.0)
    mask_shape = tuple(n for i, n in enumerate(shape) if i != axis % len(shape))
    mask = rng.random(mask_shape) < 0.6
    C = shape[axis]
    gamma, beta = rng.uniform(0.5, 2, C), rng.standard_normal(C)
    rm, rv = np.zeros(C), np.ones(C)
    y, saved = bn_forward(x, gamma, beta, rm, rv, axis=axis, mask=mask, backend=backend, return_saved=True)
    xt, gt, bt, yt, mean, var = _torch_reference(x, mask, gamma, beta, axis)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-10)
    n = int(mask.sum())
    np.testing.assert_allclose(rm, 0.1 * mean.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rv, 0.9 + 0.1 * var.detach().numpy() * n / (n - 1), rtol=1e-10)
    dy = rng.standard_normal(shape)
    dx, dgamma, dbeta = bn_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis, mask=mask, backend=backend)
    yt.backward(__import__("torch").from_numpy(dy))
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dgamma, gt.grad.numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dbeta, bt.grad.numpy(), rtol=1e-9, atol=1e-9)


def test_an_all_true_mask_is_no_mask(backend, rng):
    x = make_input((6, 4, 5), np.float32, rng)
    mask = np.ones((6, 5), bool)
    np.testing.assert_allclose(bn_forward(x, mask=mask, backend=backend), bn_forward(x, backend=backend),
                               rtol=1e-6, atol=1e-6)


def test_a_fully_masked_batch_leaves_the_running_statistics(backend, rng):
    x = make_input((3, 5, 2), np.float32, rng)
    rm, rv = np.full(2, 0.5, np.float32), np.full(2, 2.0, np.float32)
    y = bn_forward(x, None, None, rm, rv, axis=-1, mask=np.zeros((3, 5), bool), backend=backend)
    np.testing.assert_array_equal(rm, 0.5)
    np.testing.assert_array_equal(rv, 2.0)
    assert_close(y, x / np.sqrt(1e-5), np.float32, "y", scale=np.abs(x).max() / np.sqrt(1e-5))  # mean 0, var 0


@pytest.mark.parametrize("mask,exc,match", [
    (np.ones((6, 4)), TypeError, "mask must be boolean"),
    (np.ones((6, 4, 5), bool), ValueError, r"mask must have x's shape without the channel axis 1, \(6, 5\)"),
    ([True] * 30, TypeError, "mask must be a boolean array"),
    (np.array([[True] + [False] * 4] + [[False] * 5] * 5), ValueError, "more than 1 value per channel"),
])
def test_bad_masks_are_refused_and_change_nothing(backend, mask, exc, match, rng):
    x = make_input((6, 4, 5), np.float32, rng)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    with pytest.raises(exc, match=match):
        bn_forward(x, None, None, rm, rv, mask=mask, backend=backend)
    np.testing.assert_array_equal(rm, 0)


def test_the_layer_takes_a_mask(backend, rng):
    layer = BatchNorm(3, axis=-1, backend=backend, dtype=np.float64)
    x = make_input((4, 6, 3), np.float64, rng)
    mask = rng.random((4, 6)) < 0.5
    y = layer(x, mask=mask)
    np.testing.assert_allclose(y, bn_forward(x, layer.gamma, layer.beta, axis=-1, mask=mask, backend=backend),
                               rtol=1e-12)
    dx = layer.backward(np.ones_like(x))
    _, saved = bn_forward(x, axis=-1, mask=mask, backend=backend, return_saved=True)
    np.testing.assert_allclose(dx, bn_backward(np.ones_like(x), x, saved.mean, saved.invstd, layer.gamma, axis=-1,
                                               mask=mask, backend=backend)[0], rtol=1e-9, atol=1e-12)
    layer.eval()(x, mask=mask)  # inference: the mask plays no part
