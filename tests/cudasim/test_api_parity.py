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
