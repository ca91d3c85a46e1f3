"""bfloat16 (issue 13, item 1) on every CPU backend: NumPy arrays of
``ml_dtypes.bfloat16`` and CPU torch bfloat16 tensors, computed in float32
or better with float32 saved statistics, also with float32 parameters and
running statistics (the mixed case); against the float64 reference and
torch. The GPU backends' tests: ``tests/cudasim``, ``tests/host_cuda``."""
import subprocess
import sys

import numpy as np
import pytest

from bnkernels import bn_backward, bn_forward, channel_stats
from bnkernels.reference import reference_backward, reference_forward, reference_stats
from helpers import assert_close, bfloat16, make_input, make_params, strided


@pytest.mark.parametrize("shape,axis", [((2, 1), 1), ((4, 3, 15), 1), ((5, 16, 3), -1), ((3, 17, 129), 1),
                                        ((127, 2), 1), ((2, 5, 1, 13), 1)])
@pytest.mark.parametrize("training", [True, False])
def test_forward_and_backward_against_the_reference(backend, shape, axis, training, rng):
    bf16 = bfloat16()
    C = shape[axis]
    x, dy = make_input(shape, bf16, rng), make_input(shape, bf16, rng, mean=0.5)
    gamma, beta = make_params(C, rng)  # float32 parameters with bfloat16 data: the mixed case
    rm, rv = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    rm0, rv0 = rm.copy(), rv.copy()
    y, saved = bn_forward(x, gamma, beta, rm, rv, training=training, axis=axis, backend=backend,
                          return_saved=True)
    y_ref, mean, invstd, rm_ref, rv_ref = reference_forward(x, gamma, beta, rm0, rv0, training=training, axis=axis)
    assert y.dtype == bf16 and y.shape == shape
    assert saved.mean.dtype == np.float32 and saved.invstd.dtype == np.float32
    assert_close(y, y_ref, bf16, "y", scale=np.abs(y_ref).max())
    # the statistics are exact to float32, not to bfloat16: accumulated in float32 or better
    assert_close(saved.mean, mean, np.float32, "mean", scale=np.abs(mean).max())
    assert_close(saved.invstd, invstd, np.float32, "invstd", scale=np.abs(invstd).max())
    assert_close(rm, rm_ref, np.float32, "running_mean", scale=np.abs(rm_ref).max())
    assert_close(rv, rv_ref, np.float32, "running_var", scale=np.abs(rv_ref).max())
    dx, dgamma, dbeta = bn_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis, training=training,
                                    backend=backend)
    ref = reference_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis, training=training)
    assert dx.dtype == bf16 and dgamma.dtype == np.float32
    # dx's size is that of dy * gamma * invstd (with one value per channel pair, dx is 0 up to rounding)
    dx_scale = np.abs(np.asarray(dy, np.float64)).max() * np.abs(gamma).max() * np.abs(saved.invstd).max()
    assert_close(dx, ref[0], bf16, "dx", scale=max(np.abs(ref[0]).max(), dx_scale))
    assert_close(dgamma, ref[1], np.float32, "dgamma", scale=np.abs(ref[1]).max())
    assert_close(dbeta, ref[2], np.float32, "dbeta", scale=np.abs(ref[2]).max())


def test_large_mean_statistics_are_exact(backend, rng):
    """1e3 + randn in bfloat16 (8 bits: the data are multiples of 4 near
    1e3): the mean and variance of the values as stored, to float32."""
    bf16 = bfloat16()
    x = (1e3 + 20 * rng.standard_normal((64, 3, 33))).astype(bf16)
    stats = channel_stats(x, backend=backend)
    _, mean, var = reference_stats(x)
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(stats.m2 / stats.count, var, rtol=1e-5)


def test_strided_and_channels_last(backend, rng):
    bf16 = bfloat16()
    base = make_input((4, 6, 3, 5), bf16, rng)
    for x in (strided(base, rng), np.ascontiguousarray(base.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)):
        y = bn_forward(x, activation="relu", backend=backend)
        y_ref = reference_forward(base, activation="relu")[0]
        assert_close(y, y_ref, bf16, "y", scale=np.abs(y_ref).max())


def test_torch_bfloat16_tensors_against_torch(backend, rng):
    torch = pytest.importorskip("torch")
    bfloat16()
    x = torch.from_numpy(make_input((8, 4, 6, 5), np.float32, rng)).to(torch.bfloat16)
    gamma, beta = (torch.from_numpy(a) for a in make_params(4, rng))
    rm, rv = torch.zeros(4), torch.ones(4)
    rm_t, rv_t = rm.clone(), rv.clone()
    y = bn_forward(x, gamma, beta, rm, rv, backend=backend)
    y_t = torch.nn.functional.batch_norm(x, rm_t, rv_t, gamma, beta, training=True)  # bf16 data, float32 rest
    assert str(y.dtype) == "bfloat16"
    # torch normalizes in float32 and rounds once, as bnkernels: at most one bf16 ulp apart
    np.testing.assert_allclose(y.astype(np.float32), y_t.float().numpy(), rtol=8e-3, atol=8e-3)
    np.testing.assert_allclose(rm.numpy(), rm_t.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rv.numpy(), rv_t.numpy(), rtol=1e-5, atol=1e-6)
    out = torch.empty_like(x)
    assert bn_forward(x, gamma, beta, out=out, backend=backend) is out  # written through the tensor's memory
    np.testing.assert_allclose(out.float().numpy(), y.astype(np.float32), rtol=8e-3, atol=8e-3)


def test_bfloat16_running_statistics_are_refused(backend, rng):
    bf16 = bfloat16()
    x = make_input((4, 3, 5), bf16, rng)
    rm, rv = np.zeros(3, bf16), np.ones(3, bf16)
    with pytest.raises(TypeError, match="running_mean must have dtype"):
        bn_forward(x, None, None, rm, rv, backend=backend)
    np.testing.assert_array_equal(rv.astype(np.float32), 1)


def test_without_ml_dtypes_a_torch_bfloat16_tensor_says_what_to_install():
    """In a process where ml_dtypes cannot be imported."""
    pytest.importorskip("torch")
    code = ("import sys; sys.modules['ml_dtypes'] = None\n"
            "import torch, bnkernels\n"
            "try:\n"
            "    bnkernels.bn_forward(torch.ones(4, 3, dtype=torch.bfloat16), backend='numpy')\n"
            "except TypeError as e:\n"
            "    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "bfloat16 data needs ml_dtypes" in proc.stdout and "pip install ml_dtypes" in proc.stdout
