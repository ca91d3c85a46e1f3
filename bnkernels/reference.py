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


# --- the norm family: every one normalizes rows of a view of x ------------------
#
# layer and RMS norm: rows over the trailing ``normalized_shape``; group norm:
# rows (N, G) over C/G channels and the spatial axes; instance norm: rows
# (N, C) over the spatial axes. The affine parameters are per feature
# (layer, RMS) or per channel (group, instance). Saved statistics have the
# rows' shape: ``x.shape[:-len(normalized_shape)]``, (N, G), (N, C).


def _rows_forward(x64, rows_shape, rms, eps):
    """Row statistics of ``x64`` viewed ``(rows, -1)``: ``(xhat, mean,
    invstd)`` (RMS: mean None, invstd = 1/sqrt(mean(x^2) + eps))."""
    R = int(np.prod(rows_shape))
    x2 = x64.reshape(R, int(np.prod(x64.shape[len(rows_shape):])))  # (not -1: R may be 0)
    if rms:
        inv = 1.0 / np.sqrt((x2 * x2).mean(axis=1) + eps) if x2.shape[1] else np.full(R, 1 / np.sqrt(eps))
        return (x2 * inv[:, None]).reshape(x64.shape), None, inv.reshape(rows_shape)
    mean = x2.mean(axis=1) if x2.shape[1] else np.zeros(R)
    d = x2 - mean[:, None]
    var = (d * d).mean(axis=1) if x2.shape[1] else np.zeros(R)
    inv = 1.0 / np.sqrt(var + eps)
    return (d * inv[:, None]).reshape(x64.shape), mean.reshape(rows_shape), inv.reshape(rows_shape)


def _rows_backward(dy64, xhat, invstd, rows_shape, scale, rms):
    """dx of a row normalization: ``g = dy * scale`` (the weight, broadcast
    like x, or 1), ``dx = invstd * (g - mean(g) - xhat * mean(g * xhat))``
    per row (RMS: without the ``mean(g)`` term)."""
    R = int(np.prod(rows_shape))
    F = int(np.prod(dy64.shape[len(rows_shape):]))
    g = (dy64 * scale).reshape(R, F)
    xh = xhat.reshape(R, F)
    F = max(g.shape[1], 1)
    dx = g - xh * ((g * xh).sum(axis=1) / F)[:, None]
    if not rms:
        dx = dx - (g.sum(axis=1) / F)[:, None]
    return (dx * np.asarray(invstd, np.float64).reshape(R, 1)).reshape(dy64.shape)


def _rows_xhat(x64, mean, invstd, rows_shape):
    R = int(np.prod(rows_shape))
    x2 = x64.reshape(R, int(np.prod(x64.shape[len(rows_shape):])))
    centered = x2 if mean is None else x2 - np.asarray(mean, np.float64).reshape(R, 1)
    return (centered * np.asarray(invstd, np.float64).reshape(R, 1)).reshape(x64.shape)


def _norm_shape(normalized_shape):
    return (int(normalized_shape),) if np.ndim(normalized_shape) == 0 else tuple(int(n) for n in normalized_shape)


def reference_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, rms=False):
    """Float64 layer norm (``rms=True``: RMS norm, no bias): ``(y, mean,
    invstd)`` with mean, invstd of shape ``x.shape[:-k]`` (RMS: mean None,
    invstd the inverse RMS)."""
    x64 = np.asarray(x, np.float64)
    k = len(_norm_shape(normalized_shape))
    xhat, mean, inv = _rows_forward(x64, x64.shape[:x64.ndim - k], rms, eps)
    y = xhat * (1.0 if weight is None else np.asarray(weight, np.float64))
    return y + (0.0 if bias is None else np.asarray(bias, np.float64)), mean, inv


def reference_layer_norm_backward(dy, x, mean, invstd, normalized_shape, weight=None, rms=False):
    """Float64 ``(dx, dweight, dbias)`` of layer norm (RMS norm with
    ``rms=True`` and ``mean=None``), from the given saved statistics."""
    x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    k = len(_norm_shape(normalized_shape))
    rows = x64.shape[:x64.ndim - k]
    xhat = _rows_xhat(x64, mean, invstd, rows)
    scale = 1.0 if weight is None else np.asarray(weight, np.float64)
    dx = _rows_backward(dy64, xhat, invstd, rows, scale, rms)
    lead = tuple(range(x64.ndim - k))
    return dx, (dy64 * xhat).sum(axis=lead), dy64.sum(axis=lead)


def _per_channel(a, x64):
    """A (C,) vector broadcast against (N, C, *spatial)."""
    return np.asarray(a, np.float64).reshape((1, -1) + (1,) * (x64.ndim - 2))


def _grouped(a, groups):
    """(N, C, *spatial) viewed (N, G, C/G * prod(spatial))."""
    return a.reshape(a.shape[0], groups, a.shape[1] // groups * int(np.prod(a.shape[2:])))


def reference_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """Float64 group norm of (N, C, *): ``(y, mean, invstd)``, mean and
    invstd of shape (N, num_groups)."""
    x64 = np.asarray(x, np.float64)
    xhat, mean, inv = _rows_forward(_grouped(x64, num_groups), (x64.shape[0], num_groups), False, eps)
    y = xhat.reshape(x64.shape) * (1.0 if weight is None else _per_channel(weight, x64))
    return y + (0.0 if bias is None else _per_channel(bias, x64)), mean, inv


def reference_group_norm_backward(dy, x, mean, invstd, num_groups, weight=None):
    """Float64 ``(dx, dweight, dbias)`` of group norm."""
    x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    rows = (x64.shape[0], num_groups)
    xhat = _rows_xhat(_grouped(x64, num_groups), mean, invstd, rows).reshape(x64.shape)
    scale = np.ones_like(x64) * (1.0 if weight is None else _per_channel(weight, x64))
    dx = _rows_backward(_grouped(dy64, num_groups), _grouped(xhat, num_groups), invstd, rows,
                        _grouped(scale, num_groups), False).reshape(x64.shape)
    axes = (0,) + tuple(range(2, x64.ndim))
    return dx, (dy64 * xhat).sum(axis=axes), dy64.sum(axis=axes)


def reference_instance_norm(x, weight=None, bias=None, eps=1e-5, running_mean=None, running_var=None,
                            momentum=0.1):
    """Float64 instance norm of (N, C, *): ``(y, mean, invstd, new_running_mean,
    new_running_var)``, mean and invstd of shape (N, C); the running ones
    (when given) move by ``momentum`` towards the batch average of the
    instances' means and unbiased variances, as torch's."""
    x64 = np.asarray(x, np.float64)
    N, C = x64.shape[:2]
    y, mean, inv = reference_group_norm(x64, C, weight, bias, eps)
    if running_mean is None:
        return y, mean, inv, None, None
    n = x64[0, 0].size
    var = (1.0 / inv**2 - eps) * n / max(n - 1, 1)
    new_mean = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * mean.mean(axis=0)
    new_var = (1 - momentum) * np.asarray(running_var, np.float64) + momentum * var.mean(axis=0)
    return y, mean, inv, new_mean, new_var


def reference_instance_norm_backward(dy, x, mean, invstd, weight=None):
    """Float64 ``(dx, dweight, dbias)`` of instance norm (group norm with
    one channel a group)."""
    return reference_group_norm_backward(dy, x, mean, invstd, np.shape(x)[1], weight)
