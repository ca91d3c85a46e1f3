"""Arrays of other libraries through DLPack (``bnkernels.dlpack``): JAX
arrays, and a minimal pure-Python producer.

JAX arrays are viewed without a copy (``np.from_dlpack``), results come back
as JAX arrays, statistics objects stay NumPy, and read-only JAX arrays are
refused where bnkernels writes (before anything is written). Compared with
the float64 oracle on data with a non-zero mean.
"""
import subprocess
import sys

import numpy as np
import pytest

import bnkernels
from bnkernels import BackendUnavailableError, bn_backward, bn_forward, channel_stats, dlpack
from bnkernels.backends import probes
from bnkernels.reference import reference_backward, reference_forward, reference_stats
from helpers import assert_close, bfloat16, make_input, make_params

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

SHAPES = [pytest.param((6, 3, 5), 1, id="NCL"), pytest.param((6, 5, 3), -1, id="NLC")]
DTYPES = ["float16", "float32", "float64", "bfloat16"]


def _dtype(name):
    """The NumPy dtype of a test's name (bfloat16: JAX's must be ml_dtypes', which bnkernels takes)."""
    if name != "bfloat16":
        return np.dtype(name)
    dtype = bfloat16()
    if np.dtype(jnp.bfloat16) != dtype:
        pytest.skip(f"JAX's bfloat16 is {jnp.bfloat16}, not ml_dtypes' bfloat16")
    return dtype


def _x64(dtype):
    """JAX keeps float64 only with x64 enabled (else it truncates to float32)."""
    enable = jax.enable_x64 if hasattr(jax, "enable_x64") else jax.experimental.enable_x64  # newer, older JAX
    return enable(bool(np.dtype(dtype) == np.float64))


def _param_dtype(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _tol_dtype(dtype):
    """Saved statistics and parameter gradients: float32, float64 for float64 input."""
    return np.dtype(_param_dtype(dtype))


def _is_jax(a):
    return isinstance(a, jax.Array)


def _pointer(a):
    return a.__array_interface__["data"][0]


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("name", DTYPES)
def test_forward_training(backend, rng, shape, axis, name):
    dtype = _dtype(name)
    C = shape[axis]
    x = make_input(shape, dtype, rng)
    gamma, beta = make_params(C, rng, _param_dtype(dtype))
    rm, rv = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    ref_y, ref_mean, ref_invstd, ref_rm, ref_rv = reference_forward(x, gamma, beta, rm, rv, axis=axis)
    with _x64(dtype):
        jx, jgamma, jbeta = jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta)
        assert jx.dtype == dtype
        y, saved = bn_forward(jx, jgamma, jbeta, rm, rv, axis=axis, backend=backend, return_saved=True)
    assert _is_jax(y) and y.dtype == dtype and y.shape == shape
    assert isinstance(saved.mean, np.ndarray) and isinstance(saved.invstd, np.ndarray)
    assert_close(np.asarray(y), ref_y, dtype, "y")
    assert_close(saved.mean, ref_mean, _tol_dtype(dtype), "mean", scale=4.0)
    assert_close(saved.invstd, ref_invstd, _tol_dtype(dtype), "invstd")
    assert_close(rm, ref_rm, np.float32, "running_mean", scale=4.0)  # NumPy ones, updated in place
    assert_close(rv, ref_rv, np.float32, "running_var", scale=4.0)


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("name", DTYPES)
def test_forward_inference_with_jax_running_stats(backend, rng, shape, axis, name):
    """Inference only reads the running statistics: read-only JAX ones are fine."""
    dtype = _dtype(name)
    C = shape[axis]
    x = make_input(shape, dtype, rng)
    gamma, beta = make_params(C, rng, _param_dtype(dtype))
    rm, rv = rng.uniform(2, 4, C).astype(np.float32), rng.uniform(2, 6, C).astype(np.float32)
    ref_y = reference_forward(x, gamma, beta, rm, rv, training=False, axis=axis, activation="relu")[0]
    with _x64(dtype):
        y = bn_forward(jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta), jnp.asarray(rm), jnp.asarray(rv),
                       training=False, axis=axis, activation="relu", backend=backend)
    assert _is_jax(y) and y.dtype == dtype
    assert_close(np.asarray(y), ref_y, dtype, "y")


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("name", DTYPES)
def test_backward(backend, rng, shape, axis, name):
    dtype = _dtype(name)
    C = shape[axis]
    x, dy = make_input(shape, dtype, rng), make_input(shape, dtype, rng, mean=0.5, std=1.0)
    gamma, _ = make_params(C, rng, _param_dtype(dtype))
    _, mean, invstd, _, _ = reference_forward(x, axis=axis)
    mean, invstd = mean.astype(_param_dtype(dtype)), invstd.astype(_param_dtype(dtype))
    ref_dx, ref_dgamma, ref_dbeta = reference_backward(dy, x, mean, invstd, gamma, axis=axis)
    n = x.size // C
    with _x64(dtype):
        dx, dgamma, dbeta = bn_backward(jnp.asarray(dy), jnp.asarray(x), jnp.asarray(mean), jnp.asarray(invstd),
                                        jnp.asarray(gamma), axis=axis, backend=backend)
    assert all(_is_jax(r) for r in (dx, dgamma, dbeta))
    assert dx.dtype == dtype and dgamma.dtype == _tol_dtype(dtype)
    assert_close(np.asarray(dx), ref_dx, dtype, "dx")
    assert_close(np.asarray(dgamma), ref_dgamma, _tol_dtype(dtype), "dgamma", scale=n)
    assert_close(np.asarray(dbeta), ref_dbeta, _tol_dtype(dtype), "dbeta", scale=n)


def test_backward_through_relu_with_residual(backend, rng):
    """The fused forms: dz comes back too, in JAX."""
    x = make_input((8, 3, 4), np.float32, rng)
    z, dy = make_input(x.shape, np.float32, rng, mean=0.0), make_input(x.shape, np.float32, rng, mean=0.0)
    y, saved = bn_forward(x, residual=z, activation="relu", backend=backend, return_saved=True)
    expected = bn_backward(dy, x, saved.mean, saved.invstd, activation="relu", y=y, residual=True, backend=backend)
    got = bn_backward(jnp.asarray(dy), jnp.asarray(x), saved.mean, saved.invstd, activation="relu",
                      y=jnp.asarray(y), residual=True, backend=backend)
    assert len(got) == 4 and all(_is_jax(r) for r in got)
    for g, e, what in zip(got, expected, ("dx", "dgamma", "dbeta", "dz")):
        np.testing.assert_array_equal(np.asarray(g), e, err_msg=what)


def test_mask(backend, rng):
    x = make_input((5, 4, 3), np.float32, rng)
    mask = rng.uniform(size=(5, 3)) < 0.6
    expected = bn_forward(x, mask=mask, axis=1, backend=backend)
    y = bn_forward(jnp.asarray(x), mask=jnp.asarray(mask), axis=1, backend=backend)
    assert _is_jax(y)
    np.testing.assert_array_equal(np.asarray(y), expected)


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("name", DTYPES)
def test_channel_stats(backend, rng, shape, axis, name):
    dtype = _dtype(name)
    x = make_input(shape, dtype, rng)
    count, mean, var = reference_stats(x, axis)
    with _x64(dtype):
        s = channel_stats(jnp.asarray(x), axis=axis, backend=backend)
    assert isinstance(s, bnkernels.ChannelStats) and isinstance(s.mean, np.ndarray)  # float64: stays NumPy
    assert s.count == count
    assert_close(s.mean, mean, np.float32, "mean", scale=4.0)
    assert_close(s.var, var, np.float32, "var", scale=4.0)


@pytest.mark.parametrize("name", ["float32", "bfloat16"])
def test_no_copy(backend, rng, monkeypatch, name):
    """The backend works on the JAX buffer itself (np.from_dlpack's view;
    for bfloat16, which NumPy's DLPack lacks, the array protocol's view)."""
    dtype = _dtype(name)
    x = make_input((6, 3, 5), dtype, rng)
    jx = jnp.asarray(x)
    view = dlpack.to_native(jx, "x")
    assert isinstance(view, np.ndarray) and not view.flags.writeable and not view.flags.owndata
    if name == "float32":
        assert np.shares_memory(view, np.from_dlpack(jx))
    assert _pointer(view) == jx.unsafe_buffer_pointer()
    seen = {}
    forward_train = bnkernels.engine.forward_train

    def spy(impl, x, *args, **kwargs):
        seen["x"] = x
        return forward_train(impl, x, *args, **kwargs)

    monkeypatch.setattr(bnkernels.engine, "forward_train", spy)
    bn_forward(jx, backend=backend)
    assert _pointer(seen["x"]) == jx.unsafe_buffer_pointer()


@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_read_only_running_stats_refused_in_training(backend, rng, name):
    """The error names the argument and says why and what to do; nothing is
    written (the other running statistic, a NumPy array, keeps its values)."""
    x = make_input((6, 3, 5), np.float32, rng)
    running = {"running_mean": np.zeros(3, np.float32), "running_var": np.ones(3, np.float32)}
    before = {k: a.copy() for k, a in running.items()}
    running[name] = jnp.asarray(running[name])
    with pytest.raises(ValueError, match=rf"{name} is a read-only JAX array .*updates running statistics in "
                                         r"place.*JAX arrays are immutable\. Pass NumPy arrays") as info:
        bn_forward(jnp.asarray(x), **running, backend=backend)
    assert "channel_stats" in str(info.value)
    for k, a in running.items():
        np.testing.assert_array_equal(np.asarray(a), before[k], err_msg=k)


def test_read_only_out_refused(backend, rng):
    x = make_input((6, 3, 5), np.float32, rng)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    jx = jnp.asarray(x)
    with pytest.raises(ValueError, match=r"out is a read-only JAX array .*writes the result into out.*Leave out=None"):
        bn_forward(jx, None, None, rm, rv, out=jnp.zeros_like(jx), backend=backend)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)
    with pytest.raises(ValueError, match="out is a read-only JAX array"):
        bn_backward(jx, jx, np.zeros(3, np.float32), np.ones(3, np.float32), out=jnp.zeros_like(jx), backend=backend)


class Producer:
    """A minimal DLPack producer (its module has no ``from_dlpack``): it
    hands out its NumPy array's capsule, read-only or writable as the
    array is."""

    def __init__(self, array, device=None):
        self.array, self.device = array, device

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.device or self.array.__dlpack_device__()


def test_minimal_producer_returns_numpy(backend, rng):
    x = make_input((6, 3, 5), np.float32, rng)
    gamma, beta = make_params(3, rng)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    ref_y, ref_mean, ref_invstd, ref_rm, ref_rv = reference_forward(x, gamma, beta, rm, rv)
    assert dlpack.is_foreign(Producer(x)) and not dlpack.is_foreign(x)
    y, saved = bn_forward(Producer(x), Producer(gamma), Producer(beta), Producer(rm), Producer(rv),
                          backend=backend, return_saved=True)
    assert type(y) is np.ndarray
    assert_close(y, ref_y, np.float32, "y")
    assert_close(rm, ref_rm, np.float32, "running_mean", scale=4.0)  # written through the producer's memory
    assert_close(rv, ref_rv, np.float32, "running_var", scale=4.0)
    out = Producer(np.empty_like(x))
    assert bn_forward(Producer(x), gamma, beta, training=False, running_mean=rm, running_var=rv, out=out,
                      backend=backend) is out  # the caller's object, holding the result
    assert_close(out.array, reference_forward(x, gamma, beta, rm, rv, training=False)[0], np.float32, "out")
    dx, dgamma, dbeta = bn_backward(Producer(np.ones_like(x)), Producer(x), saved.mean, saved.invstd,
                                    Producer(gamma), backend=backend)
    assert all(type(r) is np.ndarray for r in (dx, dgamma, dbeta))
    ref_dx = reference_backward(np.ones_like(x), x, saved.mean, saved.invstd, gamma)[0]
    assert_close(dx, ref_dx, np.float32, "dx")
    assert channel_stats(Producer(x), backend=backend).count == 30


def test_cuda_producer_without_gpu(backend, rng):
    """A kDLCUDA array goes to CuPy; without a usable GPU backend a clear
    error, and nothing written."""
    if probes.cupy_device_problem() is None:
        pytest.skip("a GPU is usable here: the kDLCUDA path runs (tests/gpu)")
    x = make_input((6, 3, 5), np.float32, rng)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(BackendUnavailableError, match="x is a .* array .* on a CUDA device, which bnkernels takes "
                                                      "through CuPy"):
        bn_forward(Producer(x, device=(2, 0)), None, None, rm, rv, backend=backend)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


def test_other_device_refused(backend, rng):
    x = make_input((6, 3, 5), np.float32, rng)
    with pytest.raises(TypeError, match=r"x is a .* on DLPack device type 8: bnkernels takes CPU .* and CUDA"):
        bn_forward(Producer(x, device=(8, 0)), backend=backend)


def test_native_arrays_keep_their_paths():
    assert not dlpack.is_foreign(np.ones(3)) and not dlpack.is_foreign(None)
    assert not dlpack.is_foreign(np.ma.masked_array(np.ones(3)))  # refused as masked, as before
    torch = sys.modules.get("torch")
    if torch is not None:
        assert not dlpack.is_foreign(torch.ones(3))
    assert dlpack.is_foreign(jnp.ones(3))


def test_import_bnkernels_imports_no_array_library():
    code = ("import sys, bnkernels; loaded = [m for m in ('jax', 'jaxlib', 'torch', 'cupy') if m in sys.modules]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
