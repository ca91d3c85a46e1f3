"""The numpy backend on data at the edges of float32 and float16 (findings
of a fuzzing report): magnitudes whose float32 squares or products
overflow, means far from zero with mixed signs, values near 3.4e38 whose
float32 differences overflow, subnormal data with eps=0 (1 / std beyond
float32's range) and float16 near 65504 and its subnormals. Every op
(training and inference forward, backward, channel_stats) against the
float64 reference, in several layouts and memory orders, with outputs
poisoned with NaN first and with small blocks (many of them per call).
"""
import numpy as np
import pytest

from bnkernels import bn_backward, bn_forward, channel_stats
from bnkernels.backends import numpy_backend
from bnkernels.reference import reference_backward, reference_forward, reference_stats
from helpers import assert_close, strided

#: (shape, axis): channel axis first, middle and last; NCHW, NHWC, 2-D.
LAYOUTS = [((6, 3, 5, 4), 1), ((6, 5, 4, 3), -1), ((40, 3), 1), ((3, 40), 0), ((4, 3, 2, 5), 2)]

#: name -> (dtype, eps, x from standard normal z and per-channel offsets u
#: in [-1, 1], scale of dy)
DATA = {
    "float32 1e20": (np.float32, 1e-5, lambda z, u: 1e20 * (z + 3), 1e13),
    "float32 1e37, means far from 0 of both signs":
        (np.float32, 1e-5, lambda z, u: 1e36 * (z + 30 * u), 1e30),
    "float32 near 3.4e38, mixed signs (x - mean overflows)":
        (np.float32, 1e-5, lambda z, u: np.clip(1.5e38 * (z + u), -3.3e38, 3.3e38), 1e30),
    "float32 subnormal, eps=0": (np.float32, 0.0, lambda z, u: 1e-41 * (z + 2), 1e-30),
    "float16 near 65504": (np.float16, 1e-5, lambda z, u: np.clip(3e4 * z + 2e4 * u, -65504, 65504), 1.0),
    "float16 subnormal, eps=0": (np.float16, 0.0, lambda z, u: 1e-7 * (z + 3), 1e-7),
    "float64 1e4 + randn": (np.float64, 1e-5, lambda z, u: 1e4 + z, 1.0),
}

#: memory orders of x (and dy): C order, every other element of a wider
#: array, Fortran order; "mixed": x Fortran, dy strided, out strided.
KINDS = ["contiguous", "strided", "fortran", "mixed"]


@pytest.fixture(params=["default", "small"])
def blocks(request, monkeypatch):
    """The backend's own block size, or 64 elements: many blocks per call,
    several per channel range, a last one smaller."""
    if request.param == "small":
        monkeypatch.setattr(numpy_backend, "BLOCK", 64, raising=False)


def _make(name, shape, axis, kind, rng):
    """x, dy (in the memory order of ``kind``), eps, a NaN-poisoned out,
    and float64 gamma and beta."""
    dtype, eps, fx, dy_scale = DATA[name]
    C = shape[axis]
    u = np.linspace(-1, 1, C).reshape([C if i == axis % len(shape) else 1 for i in range(len(shape))])
    x = fx(rng.standard_normal(shape), u).astype(dtype)
    dy = (dy_scale * rng.standard_normal(shape)).astype(dtype)
    out = np.full(shape, np.nan, dtype)
    if kind == "strided":
        x, dy = strided(x, rng), strided(dy, rng)
    elif kind == "fortran":
        x, dy, out = np.asfortranarray(x), np.asfortranarray(dy), np.asfortranarray(out)
    elif kind == "mixed":
        x, dy, out = np.asfortranarray(x), strided(dy, rng), strided(out, rng)
    assert np.isfinite(x).all() and np.isfinite(dy).all()
    return x, dy, eps, out, rng.uniform(0.5, 2.0, C), rng.standard_normal(C)


def cases(kinds=KINDS):
    """Parametrize a test over DATA, LAYOUTS and ``kinds``."""
    def mark(test):
        for arg, values in (("kind", kinds), ("shape,axis", LAYOUTS), ("name", list(DATA))):
            test = pytest.mark.parametrize(arg, values)(test)
        return test
    return mark


@cases()
def test_training_forward(blocks, name, shape, axis, kind, rng):
    x, _, eps, out, gamma, beta = _make(name, shape, axis, kind, rng)
    C = shape[axis]
    rm, rv = np.zeros(C), np.ones(C)  # float64: a float32 running_var of 1e74 would be Inf
    ref_y, ref_mean, ref_invstd, ref_rm, ref_rv = reference_forward(x, gamma, beta, rm, rv, eps=eps,
                                                                     axis=axis)
    y, saved = bn_forward(x, gamma, beta, rm, rv, eps=eps, axis=axis, backend="numpy", return_saved=True,
                          out=out)
    assert y is out
    assert_close(y, ref_y, x.dtype, "y")
    # the saved mean is rounded to float32 (or float64), subnormals included (spacing 1.4e-45)
    rtol = 1e-12 if x.dtype == np.float64 else 1.2e-7
    np.testing.assert_allclose(saved.mean, ref_mean, rtol=rtol, atol=3e-45)
    fits = np.abs(ref_invstd) <= np.finfo(saved.invstd.dtype).max
    assert_close(saved.invstd[fits], ref_invstd[fits], x.dtype, "saved.invstd")
    assert np.isinf(saved.invstd[~fits]).all()  # 1 / std of subnormal data is beyond float32
    np.testing.assert_allclose(rm, ref_rm, rtol=1e-6, atol=1e-6 * np.abs(ref_mean).max())
    np.testing.assert_allclose(rv, ref_rv, rtol=1e-6, atol=1e-300)


@cases()
def test_inference_forward(blocks, name, shape, axis, kind, rng):
    x, _, eps, out, gamma, beta = _make(name, shape, axis, kind, rng)
    _, mean, var = reference_stats(x, axis)
    ref = reference_forward(x, gamma, beta, mean, var, training=False, eps=eps, axis=axis)[0]
    y = bn_forward(x, gamma, beta, mean, var, training=False, eps=eps, axis=axis, backend="numpy", out=out,
                   activation="relu")
    assert y is out
    assert_close(y, np.maximum(ref, 0), x.dtype, "y")


@cases()
def test_backward(blocks, name, shape, axis, kind, rng):
    """Saved statistics in float64 (a float32 invstd of subnormal data is
    Inf); dy scaled so that dx and the sums are representable while the
    products dy * (x - mean) are not, in float32."""
    x, dy, eps, out, gamma, _ = _make(name, shape, axis, kind, rng)
    _, mean, var = reference_stats(x, axis)
    invstd = 1.0 / np.sqrt(var + eps)
    rdx, rdgamma, rdbeta = reference_backward(dy, x, mean, invstd, gamma, axis=axis)
    dx, dgamma, dbeta = bn_backward(dy, x, mean, invstd, gamma, axis=axis, backend="numpy", out=out)
    assert dx is out
    dy_max, n = float(np.abs(dy.astype(np.float64)).max()), x.size // shape[axis]
    assert_close(dx, rdx, x.dtype, "dx", scale=3 * dy_max * gamma.max() * invstd.max())
    assert_close(dbeta, rdbeta, x.dtype, "dbeta", scale=dy_max * n)
    assert_close(dgamma, rdgamma, x.dtype, "dgamma", scale=4 * dy_max * n)


@cases(KINDS[:3])
def test_channel_stats(blocks, name, shape, axis, kind, rng):
    x = _make(name, shape, axis, kind, rng)[0]
    n, mean, var = reference_stats(x, axis)
    stats = channel_stats(x, axis=axis, backend="numpy")
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-12, atol=0)
    np.testing.assert_allclose(stats.var, var, rtol=1e-10, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unrepresentative_first_values(blocks, dtype, rng):
    """A batch sorted by value whose first 50 values (where the shift is
    estimated) lie 1e7 below the others, 1e4 + randn: the shift is tens of
    std from the mean (float64 redoes the sums around the mean)."""
    x = np.sort(1e4 + rng.standard_normal((4000, 2)), axis=0)
    x[:50] = -1e7
    x = x.astype(dtype)
    n, mean, var = reference_stats(x, 1)
    stats = channel_stats(x, backend="numpy")
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-13)
    np.testing.assert_allclose(stats.var, var, rtol=1e-12)
    assert_close(bn_forward(x, backend="numpy"), reference_forward(x)[0], dtype, "y")


def test_sample_unlike_the_batch(blocks, rng):
    """The first rows (where the shift is estimated) have mean 5 and std
    0.1, the batch mean ~0.2 and std ~3: a shift far from the batch's own
    (and, with small blocks, then dropped as |mean| < std)."""
    x = 3 * rng.standard_normal((4000, 3))
    x[:200] = 5 + 0.1 * rng.standard_normal((200, 3))
    for dtype in (np.float32, np.float64):
        xd = x.astype(dtype)
        gamma, beta = np.array([1.0, 2.0, 0.5]), np.array([0.0, -1.0, 3.0])
        y = bn_forward(xd, gamma, beta, backend="numpy")
        assert_close(y, reference_forward(xd, gamma, beta)[0], dtype, "y")


def test_float32_overflow_in_one_block_falls_back_in_place(monkeypatch, rng):
    """float32 x - k overflows for one value of a late block only (k of
    the other sign): that block on is redone in float64, into x itself."""
    monkeypatch.setattr(numpy_backend, "BLOCK", 64, raising=False)
    x = np.empty((200, 3), np.float32)
    x[:, 0] = 1e4 + rng.standard_normal(200)  # far from 0: every channel is centered
    x[:, 1] = 1e36 * (1 + 0.01 * rng.standard_normal(200))
    x[:, 2] = rng.standard_normal(200)
    x[150, 1] = -3.4e38
    ref = reference_forward(x)[0]
    y = bn_forward(x, backend="numpy", out=x)
    assert y is x
    assert_close(y, ref, np.float32, "y")
