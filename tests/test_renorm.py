"""Batch renormalization on the layer (``BatchNorm(renorm=True)``,
``bnkernels/renorm.py``): against a float64 transcription of Ioffe 2017
and torch's autograd of the same formula (r, d detached), on every
backend."""
import math

import numpy as np
import pytest

from bnkernels import BatchNorm
from helpers import assert_close, make_input


def _reference(x, gamma, beta, mu, sigma, eps, clipping):
    """Float64 renorm forward: y, r, d, the batch mean and sigma_B."""
    x = np.asarray(x, np.float64)
    axes = (0, 2)
    mean, var = x.mean(axes), x.var(axes)
    sigma_b = np.sqrt(var + eps)
    sig = np.maximum(sigma, math.sqrt(eps))
    r = np.clip(sigma_b / sig, clipping.get("rmin", 0), clipping.get("rmax", np.inf))
    d = np.clip((mean - mu) / sig, -clipping.get("dmax", np.inf), clipping.get("dmax", np.inf))
    xhat = (x - mean[:, None]) / sigma_b[:, None]
    y = (xhat * r[:, None] + d[:, None]) * gamma[:, None] + beta[:, None]
    return y, r, d, mean, sigma_b


@pytest.mark.parametrize("clipping", [{}, {"rmax": 1.5, "dmax": 0.5}, {"rmin": 0.8, "rmax": 1.2, "dmax": 0.1}])
def test_renorm_forward_backward_and_moving_averages(backend, clipping, rng):
    C, eps, m = 3, 1e-3, 0.1
    layer = BatchNorm(C, eps=eps, renorm=True, renorm_clipping=clipping, renorm_momentum=m, backend=backend,
                      dtype=np.float64)
    layer.gamma[:] = rng.uniform(0.5, 2, C)
    layer.beta[:] = rng.standard_normal(C)
    for step in range(3):
        x = make_input((6, C, 5), np.float64, rng, mean=2.0 + step, std=1.0 + step)
        mu, sigma = layer.renorm_mean.copy(), layer.renorm_stddev.copy()
        y_ref, r, d, mean, sigma_b = _reference(x, layer.gamma, layer.beta, mu, sigma, eps, clipping)
        y = layer(x)
        assert_close(y, y_ref, np.float64, "y", scale=np.abs(y_ref).max())
        np.testing.assert_allclose(layer.renorm_mean, (1 - m) * mu + m * mean, rtol=1e-12)
        np.testing.assert_allclose(layer.renorm_stddev, (1 - m) * sigma + m * sigma_b, rtol=1e-12)
    dy = rng.standard_normal(x.shape)
    dx = layer.backward(dy)
    torch = pytest.importorskip("torch")
    xt = torch.from_numpy(x).requires_grad_()
    gt, bt = (torch.from_numpy(a.copy()).requires_grad_() for a in (layer.gamma, layer.beta))
    mean_t, var_t = xt.mean((0, 2), keepdim=True), xt.var((0, 2), unbiased=False, keepdim=True)
    xhat = (xt - mean_t) / torch.sqrt(var_t + eps)
    rt, dt = torch.from_numpy(r)[None, :, None], torch.from_numpy(d)[None, :, None]  # constants
    ((xhat * rt + dt) * gt[None, :, None] + bt[None, :, None]).backward(torch.from_numpy(dy))
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(layer.grad_gamma, gt.grad.numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(layer.grad_beta, bt.grad.numpy(), rtol=1e-9, atol=1e-9)


def test_renorm_clipped_to_one_and_zero_is_batch_norm(backend, rng):
    plain = BatchNorm(4, backend=backend)
    renormed = BatchNorm(4, renorm=True, renorm_clipping={"rmin": 1, "rmax": 1, "dmax": 0}, backend=backend)
    for _ in range(2):
        x = make_input((5, 4, 3), np.float32, rng, mean=3.0)
        np.testing.assert_allclose(renormed(x), plain(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(renormed.running_var, plain.running_var, rtol=1e-6)
    assert {"renorm_mean", "renorm_stddev"} <= set(renormed.state_dict())
    x = make_input((5, 4, 3), np.float32, rng)
    np.testing.assert_array_equal(renormed.eval()(x), plain.eval()(x))  # inference: r = 1, d = 0


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(renorm_clipping={"rmax": -1}), ValueError, r"renorm_clipping\['rmax'\] must be a number >= 0"),
    (dict(renorm_clipping={"r_max": 2}), ValueError, "unknown keys"),
    (dict(renorm_clipping={"rmin": 2, "rmax": 1}), ValueError, "rmin=2.0 is above rmax=1.0"),
    (dict(renorm_clipping=[1, 2]), TypeError, "renorm_clipping must be a dict"),
    (dict(renorm_momentum=2), ValueError, "momentum"), (dict(renorm_momentum=None), ValueError, "renorm_momentum"),
    (dict(renorm="yes"), TypeError, "renorm must be True or False"),
])
def test_bad_renorm_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        BatchNorm(3, **kwargs)
