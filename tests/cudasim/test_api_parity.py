"""Issue 13's features on the numba-cuda backend under the CUDA simulator
(the CPU backends' tests are ``tests/test_*.py``; the cupy kernels', the
host harness ``tests/host_cuda``)."""
import numpy as np
import pytest
from numba import cuda

from bnkernels import bn_backward, bn_forward

BACKEND = "numba-cuda"


@pytest.mark.parametrize("shape", [(0, 3, 5), (4, 3, 0)])
def test_empty_batch_in_training(shape):
    """An empty y, zero saved statistics, device running statistics untouched."""
    x = cuda.to_device(np.ones(shape, np.float32))
    rm, rv = cuda.to_device(np.full(3, 0.5, np.float32)), cuda.to_device(np.full(3, 2.0, np.float32))
    y, saved = bn_forward(x, None, None, rm, rv, backend=BACKEND, return_saved=True)
    assert y.shape == shape
    np.testing.assert_array_equal(rm.copy_to_host(), 0.5)
    np.testing.assert_array_equal(rv.copy_to_host(), 2.0)
    np.testing.assert_array_equal(saved.mean.copy_to_host(), 0)
    dx, dgamma, dbeta = bn_backward(x, x, saved.mean, saved.invstd, backend=BACKEND)
    assert dx.shape == shape
    np.testing.assert_array_equal(dbeta.copy_to_host(), 0)


@pytest.mark.parametrize("shape,axis", [((6, 3, 5), 1), ((9, 4), -1)])
def test_backward_of_the_inference_forward(shape, axis, rng):
    from bnkernels.reference import reference_backward
    from helpers import assert_close, make_input, make_params

    C = shape[axis]
    x, dy = make_input(shape, np.float32, rng), make_input(shape, np.float32, rng, mean=0.5)
    gamma, _ = make_params(C, rng)
    rm, rv = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    d = {name: cuda.to_device(a) for name, a in dict(x=x, dy=dy, gamma=gamma, rm=rm, rv=rv).items()}
    _, saved = bn_forward(d["x"], d["gamma"], None, d["rm"], d["rv"], training=False, axis=axis,
                          backend=BACKEND, return_saved=True)
    dx, dgamma, dbeta = bn_backward(d["dy"], d["x"], saved.mean, saved.invstd, d["gamma"], axis=axis,
                                    training=False, backend=BACKEND)
    mean, invstd = saved.mean.copy_to_host(), saved.invstd.copy_to_host()
    rdx, rdg, rdb = reference_backward(dy, x, mean, invstd, gamma, axis=axis, training=False)
    assert_close(dx.copy_to_host(), rdx, np.float32, "dx", scale=np.abs(rdx).max())
    assert_close(dgamma.copy_to_host(), rdg, np.float32, "dgamma", scale=np.abs(rdg).max() + 1)
    assert_close(dbeta.copy_to_host(), rdb, np.float32, "dbeta", scale=np.abs(rdb).max() + 1)


@pytest.mark.parametrize("on_device", [True, False])
def test_float16_running_statistics(on_device, rng):
    """Updated through float32 temporaries and stored rounded (device or
    host float16 arrays); inference reads them."""
    from bnkernels.reference import reference_forward
    from helpers import assert_close, make_input

    x = make_input((8, 3, 5), np.float32, rng, mean=3.0)
    rm, rv = np.full(3, 0.25, np.float16), np.full(3, 1.5, np.float16)
    ref = reference_forward(x, None, None, rm.astype(np.float64), rv.astype(np.float64))
    d_rm, d_rv = (cuda.to_device(a) for a in (rm, rv)) if on_device else (rm, rv)
    bn_forward(cuda.to_device(x), None, None, d_rm, d_rv, backend=BACKEND)
    got_rm, got_rv = (d_rm.copy_to_host(), d_rv.copy_to_host()) if on_device else (rm, rv)
    assert got_rm.dtype == np.float16
    np.testing.assert_allclose(got_rm, ref[3], rtol=1e-3)
    np.testing.assert_allclose(got_rv, ref[4], rtol=1e-3)
    y = bn_forward(cuda.to_device(x), None, None, d_rm, d_rv, training=False, backend=BACKEND)
    assert_close(y.copy_to_host(), reference_forward(x, None, None, got_rm, got_rv, training=False)[0],
                 np.float32, "y (inference)")


def test_several_axes_on_device_arrays(rng):
    """Adjacent axes: a view of the device array; non-adjacent ones would
    need a permutation Numba device arrays do not have: a clear error."""
    from bnkernels.reference import reference_forward
    from helpers import assert_close, make_input

    x = make_input((4, 3, 5, 6), np.float32, rng)
    rm, rv = cuda.to_device(np.zeros((3, 5), np.float32)), cuda.to_device(np.ones((3, 5), np.float32))
    y, saved = bn_forward(cuda.to_device(x), None, None, rm, rv, axis=(1, 2), backend=BACKEND, return_saved=True)
    ref = reference_forward(x, None, None, np.zeros((3, 5)), np.ones((3, 5)), axis=(1, 2))
    assert_close(y.copy_to_host(), ref[0], np.float32, "y")
    assert saved.mean.shape == (3, 5)
    assert_close(rm.copy_to_host(), ref[3], np.float32, "running_mean", scale=np.abs(ref[3]).max())
    with pytest.raises(TypeError, match="Numba device array, which cannot be permuted"):
        bn_forward(cuda.to_device(x), axis=(1, 3), backend=BACKEND)


def test_results_keep_the_inputs_memory_order(rng):
    """A channels-last array seen as NCHW runs as NHWC (the channel-fastest
    kernels, no copy to C order) and y comes back with x's strides."""
    from bnkernels.reference import reference_forward
    from helpers import assert_close, make_input

    x = make_input((4, 5, 6, 3), np.float32, rng, mean=2.0).transpose(0, 3, 1, 2)
    y = bn_forward(x, backend=BACKEND)
    assert y.strides == x.strides
    assert_close(y, reference_forward(x)[0], np.float32, "y")


def test_masking_on_the_gpu_backend(rng):
    """Host arrays on the numba-cuda backend: the staged members (finalize,
    normalize, backward_reduce, backward_apply) with the masked statistics;
    Numba device arrays have no boolean indexing: a clear error."""
    from helpers import make_input

    x = make_input((4, 7, 3), np.float64, rng, mean=2.0)
    mask = rng.random((4, 7)) < 0.6
    y, saved = bn_forward(x, axis=-1, mask=mask, backend=BACKEND, return_saved=True)
    y_ref, saved_ref = bn_forward(x, axis=-1, mask=mask, backend="numpy", return_saved=True)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(x.shape)
    dx = bn_backward(dy, x, saved.mean, saved.invstd, axis=-1, mask=mask, backend=BACKEND)[0]
    dx_ref = bn_backward(dy, x, saved_ref.mean, saved_ref.invstd, axis=-1, mask=mask, backend="numpy")[0]
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-9, atol=1e-9)
    with pytest.raises(TypeError, match="Numba device arrays do not have"):
        bn_forward(cuda.to_device(x), axis=-1, mask=cuda.to_device(mask), backend=BACKEND)
