"""The numba-cuda reductions' 16-byte vector walk (``stats_planes`` and
``bwd_planes`` when ``inner % 8 == 0`` and the arrays are 16-byte aligned:
vectors of 8 values merged as chunks, one division per step) against the
float64 reference, next to the single-value walk that misaligned arrays
take; both index widths. Launches shrunk as in ``test_numba_cuda_backend``
(several blocks per channel, the last-block merge)."""
import numpy as np
import pytest
from numba import cuda

from bnkernels import bn_backward, bn_forward, channel_stats
from bnkernels.backends import numba_cuda as nc
from bnkernels.backends.numba_cuda import bind, kernels, vectors
from bnkernels.reference import reference_backward, reference_forward, reference_stats
from helpers import DTYPES, assert_close, gpu_tunings, make_input, make_params, tiny_device

BACKEND = "numba-cuda"
TUNINGS = gpu_tunings()
SHAPES = [(3, 5, 8), (1, 1, 16), (17, 3, 24), (2, 2, 136), (5, 1, 64)]


@pytest.fixture(params=list(TUNINGS), autouse=True)
def small_launches(request, monkeypatch):
    tuning = TUNINGS[request.param]
    limits = tiny_device(tuning)
    monkeypatch.setattr(nc, "TUNING", tuning)
    monkeypatch.setattr(nc, "_limits", lambda: limits)
    monkeypatch.setenv(nc.POISON_ENV, "1")
    return tuning


@pytest.fixture
def vector_loads(monkeypatch):
    """The number of ``load8`` calls the kernels make (the simulator looks
    the name up in ``kernels`` at each call)."""
    calls = []
    load8 = vectors.load8

    def counted(a, v):
        calls.append(v)
        return load8(a, v)

    monkeypatch.setattr(kernels, "load8", counted)
    return calls


def _misaligned(x):
    """A device copy of ``x`` whose data is one element off 16 bytes."""
    flat = np.empty(x.size + 8, x.dtype)
    d = cuda.to_device(flat)
    iface = getattr(d, "__cuda_array_interface__", None) or d.__array_interface__  # the simulator: NumPy's
    off = (-iface["data"][0] // x.itemsize) % (16 // x.itemsize) + 1
    view = d[off:off + x.size]
    view.copy_to_device(x.ravel())
    return view.reshape(x.shape)


@pytest.mark.parametrize("index_bits", [32, 64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_vector_walk_forward_backward(shape, dtype, index_bits, rng, monkeypatch, vector_loads):
    if index_bits == 64:
        monkeypatch.setattr(bind, "INDEX32_LIMIT", 0)
    x = make_input(shape, dtype, rng)
    C = shape[1]
    gamma, beta = make_params(C, rng)
    s = channel_stats(x, backend=BACKEND)
    assert len(vector_loads) >= x.size // 8, "the statistics took the single-value walk"
    count, mean, var = reference_stats(x)
    ref = reference_forward(x, gamma, beta)
    y, saved = bn_forward(x, gamma, beta, backend=BACKEND, return_saved=True)
    assert_close(y, ref[0], dtype, "y")
    assert_close(saved.mean, ref[1], dtype, "saved.mean", scale=np.abs(ref[1]).max() + 1)
    assert_close(saved.invstd, ref[2], dtype, "saved.invstd")
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(s.mean, mean, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(s.m2, var * count, rtol=100 * rtol)
    dy = make_input(shape, dtype, rng, mean=0.5, std=1.0)
    dx, dgamma, dbeta = bn_backward(dy, x, saved.mean, saved.invstd, gamma, backend=BACKEND)
    rdx, rdgamma, rdbeta = reference_backward(dy, x, saved.mean, saved.invstd, gamma)
    n = x.size // C
    term = float(np.abs(dy.astype(np.float64)).max() * gamma.max() * saved.invstd.astype(np.float64).max())
    assert_close(dx, rdx, dtype, "dx", scale=3 * term)
    assert_close(dbeta, rdbeta, dtype, "dbeta", scale=np.abs(dy.astype(np.float64)).max() * n)
    assert_close(dgamma, rdgamma, dtype, "dgamma", scale=4 * np.abs(dy.astype(np.float64)).max() * n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_arrays_take_single_values(dtype, rng, vector_loads):
    shape = (3, 2, 16)
    x = make_input(shape, dtype, rng)
    d_x = _misaligned(x)
    s = channel_stats(d_x, backend=BACKEND)
    assert not vector_loads
    ref = reference_forward(x)
    count, mean, var = reference_stats(x)
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(s.mean, mean, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(s.m2, var * count, rtol=100 * rtol)
    y = bn_forward(d_x, backend=BACKEND)
    assert_close(y.copy_to_host(), ref[0], dtype, "y")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mean", [0.0, 1e3, 1e4])
def test_vector_chunks_large_mean_and_outlier(dtype, mean, rng):
    """Chunks around their own first value: exact near a large mean, and an
    outlier first value of a chunk (its M2 is then mostly its own term)."""
    if dtype == np.float16 and mean > 1e3:
        pytest.skip("float16 holds no unit-scale spread at 1e4")
    x = (mean + rng.standard_normal((4, 3, 16))).astype(dtype)
    x[:, :, ::8] += np.asarray(50, dtype)  # every chunk's first value an outlier
    ref = reference_forward(x)
    y, saved = bn_forward(x, backend=BACKEND, return_saved=True)
    err = np.abs(y.astype(np.float64) - ref[0]).max()
    bound = {np.float16: 2e-2, np.float32: 1e-4, np.float64: 1e-9}[dtype]
    assert err <= bound, f"max error {err:.3g} batch stds"
    assert_close(saved.invstd, ref[2], dtype, "saved.invstd")


@pytest.mark.parametrize("dtype", DTYPES)
def test_vector_chunks_propagate_nan(dtype, rng, vector_loads):
    """A NaN in one chunk makes its channel's mean and M2 NaN (the clamp
    of the accumulators' M2 keeps NaN), the other channel unaffected."""
    x = make_input((3, 2, 16), dtype, rng)
    x[1, 0, 5] = np.nan
    s = channel_stats(x, backend=BACKEND)
    assert vector_loads
    assert np.isnan(s.mean[0]) and np.isnan(s.m2[0])
    count, mean, var = reference_stats(x[:, 1:])
    np.testing.assert_allclose(s.mean[1], mean[0], rtol=1e-6)
    np.testing.assert_allclose(s.m2[1], var[0] * count, rtol=1e-4)
