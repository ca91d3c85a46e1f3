"""The cupy backend through the public API on a real GPU (marked ``gpu``;
``pytest -m gpu`` on a machine with a GPU and CuPy). Without a GPU these
tests are deselected (CI) or skip; the same kernels are executed on the CPU
by ``tests/host_cuda/test_cupy_kernels.py`` on every commit."""
import numpy as np
import pytest

import bnkernels
from bnkernels import bn_backward, bn_forward
from bnkernels.reference import reference_backward, reference_forward
from helpers import DTYPES, assert_close, make_input, make_params

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not bnkernels.available_backends()["cupy"].available,
                       reason="the cupy backend cannot run here (no GPU or no CuPy)"),
]

CASES = [((8, 3, 17), 1), ((2, 3, 5, 7), 1), ((9, 2, 3, 5), 2), ((33, 7), 1), ((9, 4, 3), -1), ((4, 40), 1),
         ((32, 64, 28, 28), 1), ((32, 28, 28, 64), -1), ((4096, 3), 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_forward_backward_on_gpu(shape, axis, dtype, rng, monkeypatch):
    cp = pytest.importorskip("cupy")
    monkeypatch.setenv("BNKERNELS_POISON", "1")
    x = make_input(shape, dtype, rng)
    C = shape[axis]
    gamma, beta = make_params(C, rng)
    rm, rv = cp.zeros(C, cp.float32), cp.ones(C, cp.float32)
    y, saved = bn_forward(cp.asarray(x), cp.asarray(gamma), cp.asarray(beta), rm, rv, axis=axis, backend="cupy",
                          return_saved=True)
    assert isinstance(y, cp.ndarray)
    ref = reference_forward(x, gamma, beta, np.zeros(C), np.ones(C), axis=axis)
    assert_close(cp.asnumpy(y), ref[0], dtype, "y")
    assert_close(cp.asnumpy(rv), ref[4], np.float32, "running_var", scale=np.abs(ref[4]).max() + 1)
    dy = make_input(shape, dtype, rng, mean=0.5, std=1.0)
    dx, dgamma, dbeta = bn_backward(cp.asarray(dy), cp.asarray(x), saved.mean, saved.invstd, cp.asarray(gamma),
                                    axis=axis, backend="cupy")
    mean, invstd = cp.asnumpy(saved.mean), cp.asnumpy(saved.invstd)
    rdx, _, rdbeta = reference_backward(dy, x, mean, invstd, gamma, axis=axis)
    term = float(np.abs(dy.astype(np.float64)).max() * gamma.max() * invstd.astype(np.float64).max())
    assert_close(cp.asnumpy(dx), rdx, dtype, "dx", scale=3 * term)
    assert_close(cp.asnumpy(dbeta), rdbeta, dtype, "dbeta", scale=float(np.abs(dy).max()) * (x.size // C))


def test_numpy_input_round_trip_and_host_running_stats(rng):
    x = make_input((8, 3, 5, 5), np.float32, rng)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y = bn_forward(x, None, None, rm, rv, backend="cupy")
    ref = reference_forward(x, None, None, np.zeros(3), np.ones(3))
    assert isinstance(y, np.ndarray)
    assert_close(y, ref[0], np.float32, "y")
    assert_close(rm, ref[3], np.float32, "running_mean (host, in place)")


def test_out_on_the_gpu(rng):
    cp = pytest.importorskip("cupy")
    x = make_input((8, 3, 5, 5), np.float32, rng)
    dy = make_input(x.shape, np.float32, rng)
    d_x, d_dy = cp.asarray(x), cp.asarray(dy)
    out = cp.full(x.shape, cp.nan, cp.float32)
    y, saved = bn_forward(d_x, backend="cupy", out=out, return_saved=True)
    assert y is out
    assert_close(cp.asnumpy(out), reference_forward(x)[0], np.float32, "y (CuPy out)")
    rdx = reference_backward(dy, x, cp.asnumpy(saved.mean), cp.asnumpy(saved.invstd))[0]
    dx = bn_backward(d_dy, d_x, saved.mean, saved.invstd, backend="cupy", out=d_dy)[0]
    assert dx is d_dy
    assert_close(cp.asnumpy(d_dy), rdx, np.float32, "dx (in place into dy)", scale=np.abs(rdx).max())
    with pytest.raises(TypeError, match="like x"):
        bn_forward(d_x, backend="cupy", out=np.zeros(x.shape, np.float32))


def test_device_arrays_that_overlap_are_rejected(rng):
    """The aliasing rules on GPU arrays (address ranges from the CUDA array
    interface): out over gamma, running_mean over x, running_mean as
    running_var; nothing is written."""
    cp = pytest.importorskip("cupy")
    xbuf = cp.asarray(make_input((63,), np.float32, rng))
    obuf = cp.asarray(make_input((63,), np.float32, rng))
    x, out, gamma = xbuf[:60].reshape(4, 3, 5), obuf[:60].reshape(4, 3, 5), obuf[57:60]
    rm, rv = cp.zeros(3, cp.float32), cp.ones(3, cp.float32)
    before = xbuf.get(), obuf.get()
    for kw, match in [(dict(gamma=gamma, out=out), "out overlaps gamma"),
                      (dict(running_mean=xbuf[10:13]), "running_mean overlaps x"),
                      (dict(running_var=rm), "running_mean overlaps running_var")]:
        with pytest.raises(ValueError, match=match):
            bn_forward(x, **{"running_mean": rm, "running_var": rv, **kw}, backend="cupy")
    np.testing.assert_array_equal(xbuf.get(), before[0])
    np.testing.assert_array_equal(obuf.get(), before[1])
    np.testing.assert_array_equal(rm.get(), 0)
