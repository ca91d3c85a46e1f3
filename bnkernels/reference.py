"""Float64 reference batch norm: the oracle for tests and benchmarks.

Textbook two-pass formulas evaluated entirely in float64 on a float64 copy of
the input, written for clarity, not speed. Nothing here mutates its
arguments. Tests compare every backend against these functions.
"""
from __future__ import annotations

import numpy as np


def _channel_axes(x, axis):
    """``axis`` (an int, or a tuple of several: the parameters' axes) as a
    sorted tuple of non-negative axes."""
    return tuple(sorted(a % x.ndim for a in (axis if isinstance(axis, (tuple, list)) else (axis,))))


def _bshape(x, axis):
    channel = _channel_axes(x, axis)
    return [x.shape[i] if i in channel else 1 for i in range(x.ndim)]


def _reduce_axes(x, axis):
    channel = _channel_axes(x, axis)
    return tuple(i for i in range(x.ndim) if i not in channel)


def _count(x, axis) -> int:
    channels = int(np.prod([x.shape[a] for a in _channel_axes(x, axis)]))
    return x.size // channels if channels else 0


def reference_stats(x, axis=1):
    """(count, mean, biased var) per channel, float64 (per element of the
    channel axes when ``axis`` is a tuple: their shape)."""
    x64 = np.asarray(x, dtype=np.float64)
    axes = _reduce_axes(x64, axis)
    count = _count(x64, axis)
    mean = x64.mean(axis=axes)
    var = ((x64 - mean.reshape(_bshape(x64, axis))) ** 2).mean(axis=axes)
    return count, mean, var


def reference_forward(x, gamma=None, beta=None, running_mean=None, running_var=None, *,
                      training=True, momentum=0.1, eps=1e-5, axis=1, activation=None,
                      num_batches_tracked=None, residual=None):
    """Float64 forward (``residual`` added before the activation).

    Returns ``(y, mean, invstd, new_running_mean, new_running_var)``, all
    float64; the running values are None when not given (and equal the given
    ones in inference).
    """
    x64 = np.asarray(x, dtype=np.float64)
    bs = _bshape(x64, axis)
    if training:
        n, mean, var = reference_stats(x64, axis)
    else:
        n, mean, var = None, np.asarray(running_mean, np.float64), np.asarray(running_var, np.float64)
    invstd = 1.0 / np.sqrt(var + eps)
    y = (x64 - mean.reshape(bs)) * invstd.reshape(bs)
    if gamma is not None:
        y = y * np.asarray(gamma, np.float64).reshape(bs)
    if beta is not None:
        y = y + np.asarray(beta, np.float64).reshape(bs)
    if residual is not None:
        y = y + np.asarray(residual, np.float64)
    if activation == "relu":
        y = np.maximum(y, 0.0)
    new_rm = new_rv = None
    if running_mean is not None:
        new_rm = np.asarray(running_mean, np.float64).copy()
        new_rv = np.asarray(running_var, np.float64).copy()
        if training:
            f = momentum if momentum is not None else 1.0 / (num_batches_tracked + 1)
            new_rm = (1 - f) * new_rm + f * mean
            new_rv = (1 - f) * new_rv + f * var * n / (n - 1)
    return y, mean, invstd, new_rm, new_rv


def reference_backward(dy, x, mean, invstd, gamma=None, axis=1, training=True):
    """Float64 gradients of the training forward: ``(dx, dgamma, dbeta)``;
    ``training=False``: of the inference forward (mean and invstd constants,
    ``dx = dy * gamma * invstd``).

    Uses the given saved ``mean`` and ``invstd`` (as a backend would).
    """
    dy64 = np.asarray(dy, np.float64)
    x64 = np.asarray(x, np.float64)
    bs = _bshape(x64, axis)
    axes = _reduce_axes(x64, axis)
    n = _count(x64, axis)
    invstd = np.asarray(invstd, np.float64)
    xhat = (x64 - np.asarray(mean, np.float64).reshape(bs)) * invstd.reshape(bs)
    g = np.ones_like(invstd) if gamma is None else np.asarray(gamma, np.float64)
    dbeta = dy64.sum(axis=axes)
    dgamma = (dy64 * xhat).sum(axis=axes)
    dxhat = dy64 * g.reshape(bs)
    if not training:
        return dxhat * invstd.reshape(bs), dgamma, dbeta
    dx = (invstd.reshape(bs) / max(n, 1)) * (
        n * dxhat - (dxhat.sum(axis=axes)).reshape(bs) - xhat * (dxhat * xhat).sum(axis=axes).reshape(bs)
    )
    return dx, dgamma, dbeta
