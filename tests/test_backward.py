"""bn_backward against the float64 reference on every CPU backend."""
import numpy as np
import pytest

from bnkernels import bn_backward, bn_forward
from bnkernels.reference import reference_backward
from helpers import DTYPES, assert_close, make_input, make_params, strided
from test_forward import CASES


def _check_backward(backend, x, dy, dtype, axis, affine, rng):
    C = x.shape[axis]
    gamma = make_params(C, rng)[0] if affine else None
    _, saved = bn_forward(x, gamma, None, axis=axis, backend=backend, return_saved=True)
    dx, dgamma, dbeta = bn_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis, backend=backend)
    rdx, rdgamma, rdbeta = reference_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    stat_dtype = np.float64 if dtype == np.float64 else np.float32
    assert dgamma.dtype == stat_dtype and dbeta.dtype == stat_dtype
    # dx is a sum of three O(|dy| * gamma * invstd) terms; the sums are over n
    # values of size O(|dy|).
    term = float(np.abs(dy.astype(np.float64)).max() * (np.abs(gamma).max() if affine else 1)
                 * saved.invstd.astype(np.float64).max()) or 1.0
    n = x.size // C
    assert_close(dx, rdx, dtype, "dx", scale=3 * term)
    assert_close(dbeta, rdbeta, dtype, "dbeta", scale=np.abs(dy.astype(np.float64)).max() * n)
    assert_close(dgamma, rdgamma, dtype, "dgamma", scale=4 * np.abs(dy.astype(np.float64)).max() * n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_backward_matches_reference(backend, shape, axis, dtype, rng):
    x = make_input(shape, dtype, rng)
    dy = make_input(shape, dtype, rng, mean=0.5, std=1.0)
    _check_backward(backend, x, dy, dtype, axis, True, rng)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("kind", ["contiguous", "strided", "transposed"])
def test_backward_layouts_and_affine(backend, kind, affine, rng):
    x = make_input((5, 6, 4, 3), np.float32, rng)
    dy = make_input((5, 6, 4, 3), np.float32, rng, mean=0.0)
    if kind == "strided":
        x, dy = strided(x, rng), strided(dy, rng)
    elif kind == "transposed":
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    _check_backward(backend, x, dy, np.float32, 1, affine, rng)


@pytest.mark.parametrize("axis", [1, -1])
def test_backward_large_mean_float32(backend, axis, rng):
    shape = (32, 4, 16) if axis == 1 else (32, 16, 4)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    _check_backward(backend, x, dy, np.float32, axis, True, rng)


def test_backward_of_relu_forward(backend, rng):
    """The documented recipe: mask dy with (y > 0), then bn_backward."""
    x = make_input((7, 3, 5), np.float64, rng)
    gamma, beta = make_params(3, rng, np.float64)
    y, saved = bn_forward(x, gamma, beta, activation="relu", backend=backend, return_saved=True)
    dy = rng.standard_normal(x.shape)
    dx = bn_backward(dy * (y > 0), x, saved.mean, saved.invstd, gamma, backend=backend)[0]
    rdx = reference_backward(dy * (y > 0), x, saved.mean, saved.invstd, gamma)[0]
    assert_close(dx, rdx, np.float64, "dx")


def test_backward_does_not_modify_inputs(backend, rng):
    x = make_input((6, 4, 5), np.float32, rng)
    dy = make_input((6, 4, 5), np.float32, rng)
    _, saved = bn_forward(x, backend=backend, return_saved=True)
    copies = [a.copy() for a in (x, dy, saved.mean, saved.invstd)]
    bn_backward(dy, x, saved.mean, saved.invstd, backend=backend)
    for before, after in zip(copies, (x, dy, saved.mean, saved.invstd)):
        np.testing.assert_array_equal(before, after)


def test_backward_with_float64_saved_stats_on_float32_input(backend, rng):
    """Saved statistics wider than the input (e.g. from a float64 reduction)
    are used at full precision, not rounded to float32 first."""
    x = (1e4 + rng.standard_normal((64, 3))).astype(np.float32)
    dy = rng.standard_normal((64, 3)).astype(np.float32)
    x64 = x.astype(np.float64)
    mean, invstd = x64.mean(0), 1 / np.sqrt(x64.var(0) + 1e-5)
    dx, dgamma, dbeta = bn_backward(dy, x, mean, invstd, backend=backend)
    rdx, rdgamma, _ = reference_backward(dy, x, mean, invstd)
    # float32 rounding of the 64 products is ~1e-6 here; ignoring the
    # float64 part of the mean would cost up to 5e-4 * |sum(dy)|.
    assert_close(dx, rdx, np.float32, "dx")
    assert_close(dgamma, rdgamma, np.float32, "dgamma")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_backward_of_the_inference_forward(backend, shape, axis, dtype, affine, rng):
    """training=False: the running statistics are constants, dx = dy *
    gamma * invstd, dgamma and dbeta the same sums as in training."""
    x = make_input(shape, dtype, rng)
    dy = make_input(shape, dtype, rng, mean=0.5, std=1.0)
    C = x.shape[axis]
    gamma = make_params(C, rng)[0] if affine else None
    rm, rv = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    _, saved = bn_forward(x, gamma, None, rm, rv, training=False, axis=axis, backend=backend, return_saved=True)
    dx, dgamma, dbeta = bn_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis, training=False,
                                    backend=backend)
    rdx, rdgamma, rdbeta = reference_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis, training=False)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    term = float(np.abs(dy.astype(np.float64)).max() * (np.abs(gamma).max() if affine else 1)
                 * saved.invstd.astype(np.float64).max()) or 1.0
    n = x.size // C if C else 0
    assert_close(dx, rdx, dtype, "dx", scale=term)
    assert_close(dbeta, rdbeta, dtype, "dbeta", scale=np.abs(dy.astype(np.float64)).max() * max(n, 1))
    assert_close(dgamma, rdgamma, dtype, "dgamma", scale=4 * np.abs(dy.astype(np.float64)).max() * max(n, 1))


def test_backward_of_the_inference_forward_against_torch(backend, rng):
    torch = pytest.importorskip("torch")
    x, dy = make_input((6, 4, 5), np.float64, rng), rng.standard_normal((6, 4, 5))
    gamma, beta = make_params(4, rng)
    rm, rv = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    _, saved = bn_forward(x, gamma, beta, rm, rv, training=False, backend=backend, return_saved=True)
    dx, dgamma, dbeta = bn_backward(dy, x, saved.mean, saved.invstd, gamma, training=False, backend=backend)
    xt, gt, bt = (torch.from_numpy(a).requires_grad_() for a in (x, gamma.astype(np.float64),
                                                                 beta.astype(np.float64)))
    torch.nn.functional.batch_norm(xt, torch.from_numpy(rm), torch.from_numpy(rv), gt, bt,
                                   training=False).backward(torch.from_numpy(dy))
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dgamma, gt.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dbeta, bt.grad.numpy(), rtol=1e-10, atol=1e-10)


def test_training_flag_of_backward_must_be_a_bool(backend, rng):
    x = make_input((4, 3), np.float32, rng)
    _, saved = bn_forward(x, backend=backend, return_saved=True)
    with pytest.raises(TypeError, match="training must be True or False"):
        bn_backward(x, x, saved.mean, saved.invstd, training="no", backend=backend)
