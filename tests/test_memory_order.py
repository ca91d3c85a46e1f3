"""Inputs C-contiguous in another axis order (``bnkernels/memory_order.py``):
run in their memory order (the backend sees a C-contiguous array: no copy)
and results with the input's strides, on every backend."""
import numpy as np
import pytest

from bnkernels import bn_backward, bn_forward, channel_stats, engine
from bnkernels.memory_order import order
from bnkernels.reference import reference_backward, reference_forward, reference_stats
from helpers import assert_close, make_input

# (memory shape, the permutation that views it as the logical shape, channel axis of the logical shape)
CASES = [((4, 5, 6, 3), (0, 3, 1, 2), 1),   # NHWC memory seen as NCHW (torch channels_last)
         ((3, 7, 2), (1, 0, 2), 0), ((2, 3, 4, 5), (3, 1, 0, 2), 1), ((6, 4), (1, 0), 1),
         ((4, 1, 5, 3), (0, 3, 1, 2), 1)]   # a size-1 axis


def _permuted(memory_shape, perm, rng, dtype=np.float32):
    return make_input(memory_shape, dtype, rng, mean=3.0).transpose(perm)


def _same_layout(a, b) -> bool:
    """The same strides on every axis that has more than one element (a
    size-1 axis' stride is never used)."""
    return all(sa == sb for sa, sb, n in zip(a.strides, b.strides, a.shape) if n > 1)


@pytest.mark.parametrize("memory_shape,perm,axis", CASES)
def test_results_keep_the_inputs_strides(backend, memory_shape, perm, axis, rng, monkeypatch):
    x = _permuted(memory_shape, perm, rng)
    seen = []
    run = engine.forward_train
    monkeypatch.setattr(engine, "forward_train", lambda impl, xx, *a, **k: seen.append(xx) or run(impl, xx, *a, **k))
    C = x.shape[axis]
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y, saved = bn_forward(x, None, None, rm, rv, axis=axis, backend=backend, return_saved=True)
    assert seen and np.asarray(seen[0]).flags.c_contiguous  # what the backend got: x's memory as it is
    assert _same_layout(y, x)
    ref = reference_forward(x, None, None, np.zeros(C), np.ones(C), axis=axis)
    assert_close(y, ref[0], np.float32, "y")
    assert_close(rm, ref[3], np.float32, "running_mean", scale=np.abs(ref[3]).max())
    dy = _permuted(memory_shape, perm, rng)
    dx, dgamma, dbeta = bn_backward(dy, x, saved.mean, saved.invstd, axis=axis, backend=backend)
    assert _same_layout(dx, x)
    rdx, rdg, rdb = reference_backward(dy, x, saved.mean, saved.invstd, axis=axis)
    assert_close(dx, rdx, np.float32, "dx", scale=10)
    assert_close(dbeta, rdb, np.float32, "dbeta", scale=np.abs(rdb).max() + 1)
    s = channel_stats(x, axis=axis, backend=backend)
    assert_close(s.mean, reference_stats(x, axis=axis)[1], np.float32, "mean", scale=4)


def test_out_and_in_place_in_memory_order(backend, rng):
    x = _permuted((4, 5, 6, 3), (0, 3, 1, 2), rng)
    expected = reference_forward(x)[0]
    out = np.empty((4, 5, 6, 3), np.float32).transpose(0, 3, 1, 2)
    assert bn_forward(x, out=out, backend=backend) is out
    assert_close(out, expected, np.float32, "out")
    assert bn_forward(x, out=x, backend=backend) is x
    assert_close(x, expected, np.float32, "in place")


@pytest.mark.parametrize("a,expected", [
    (np.zeros((4, 5)), None), (np.zeros((4, 5)).T, (1, 0)), (np.zeros((4, 6))[:, ::2], None),
    (np.zeros((2, 3, 4)).transpose(2, 0, 1), (1, 2, 0)), (np.zeros((4, 1, 5)).transpose(2, 1, 0), (2, 1, 0)),
])
def test_memory_order_found(a, expected):
    assert order(a) == expected
    if expected is not None:
        assert a.transpose(expected).flags.c_contiguous


def test_torch_channels_last_tensors(backend, rng):
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(make_input((4, 3, 5, 6), np.float32, rng)).contiguous(memory_format=torch.channels_last)
    y = bn_forward(t, backend=backend)
    assert y.strides == np.asarray(t.permute(0, 2, 3, 1)).transpose(0, 3, 1, 2).strides
    ref = torch.nn.functional.batch_norm(t, None, None, training=True).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
