"""Vectorized NumPy backend: the dependency-free CPU implementation.

Every backend module provides the functions below with these signatures; the
public API (``bnkernels.api``) has validated all arguments before calling
them, so they do no checking of their own.

Accuracy: statistics are accumulated in float64 around a shift ``k`` (the
per-channel mean rounded to the compute dtype). ``x - k`` is exact for values
near the mean (Sterbenz), so neither the variance nor the output suffers from
the cancellation that ruins ``E[x^2] - E[x]^2`` or a float32 ``x - mean``
when ``|mean| >> std``. The output is ``(x - k) * scale + shift'`` with
``shift' = beta - (mean - k) * scale`` absorbing the rounding of ``k``.

The input is used through its own strides (no reshaping), so transposed and
strided inputs need no copy; outputs follow the input's memory order.

IEEE semantics, silently, as on a GPU: NaN/Inf propagate, ``eps=0`` on a
constant channel gives NaN, a float16 output beyond 65504 becomes Inf;
NumPy's floating-point warnings are suppressed (``ieee_semantics``) so that they do not
surface in callers' code.
"""
from __future__ import annotations

import numpy as np

from ..validation import ChannelLayout, compute_dtype
from .outputs import deliver

name = "numpy"

#: Decorator for the entry points: no NumPy floating-point warnings.
ieee_semantics = np.errstate(divide="ignore", invalid="ignore", over="ignore")


def asarray(x):
    """Host arrays in, host arrays out."""
    return np.asarray(x)


def _per_channel(v, layout: ChannelLayout, dtype):
    """A per-channel vector reshaped to broadcast against the input."""
    return np.asarray(v, dtype=dtype).reshape(layout.param_shape)


def _upcast(x):
    """The input in its compute dtype (float16 is computed in float32)."""
    cdt = compute_dtype(x.dtype)
    return x if x.dtype == cdt else x.astype(cdt)


def _centered_moments(xc, layout: ChannelLayout):
    """Shifted two-pass moments.

    Returns ``d = xc - k`` (a fresh array in the compute dtype, reused by the
    caller as the output buffer), the float64 ``mean``, ``dmean = mean - k``
    and ``m2`` (sum of squared deviations from the mean), all of shape (C,).
    ``k`` is the mean rounded to the compute dtype. An empty batch has mean
    and m2 zero.
    """
    axes = layout.reduce_axes
    n = layout.count
    if n == 0:
        zeros = np.zeros(layout.channels)
        return np.subtract(xc, 0, dtype=xc.dtype), zeros, zeros, zeros
    mean = np.mean(xc, axis=axes, dtype=np.float64)
    k = mean.astype(xc.dtype)
    d = np.subtract(xc, k.reshape(layout.param_shape))
    s1 = np.sum(d, axis=axes, dtype=np.float64)
    s2 = np.sum(np.square(d), axis=axes, dtype=np.float64)
    if xc.dtype == np.float64:
        # k is the float64 mean itself; the sum of the (exact, by Sterbenz)
        # deviations refines it: the corrected two-pass algorithm.
        dmean = s1 / n
        mean = k + dmean
    else:
        # The float64 mean of float32 data is accurate to ~1e-16, better
        # than the float32-rounded deviations far from the mean.
        dmean = mean - k
    # sum((d - dmean)^2) expanded; dmean is at most about half an ulp of the
    # mean, so the correction is tiny and nothing cancels.
    m2 = np.maximum(s2 - 2.0 * dmean * s1 + n * dmean * dmean, 0.0)
    return d, mean, dmean, m2


def _affine(gamma, beta, invstd):
    """Per-channel ``scale = gamma * invstd`` (float64) and beta as float64."""
    g = 1.0 if gamma is None else np.asarray(gamma, dtype=np.float64)
    b = 0.0 if beta is None else np.asarray(beta, dtype=np.float64)
    return g * invstd, b * np.ones_like(invstd)


def _finish(d, layout, scale, shift, relu, out_dtype):
    """In place on the centered values d: ``y = d * scale + shift`` [ReLU], cast."""
    np.multiply(d, _per_channel(scale, layout, d.dtype), out=d)
    np.add(d, _per_channel(shift, layout, d.dtype), out=d)
    if relu:
        np.maximum(d, 0, out=d)  # keeps NaN, as torch.relu does
    return d if d.dtype == out_dtype else d.astype(out_dtype)


def update_running(running_mean, running_var, mean, var_unbiased, factor):
    """``running = (1 - factor) * running + factor * batch``, in place.

    Computed in float64 and stored in the running arrays' own dtype.
    """
    for run, batch in ((running_mean, mean), (running_var, var_unbiased)):
        new = (1.0 - factor) * run.astype(np.float64) + factor * batch
        run[...] = new


@ieee_semantics
def channel_stats(x, layout: ChannelLayout):
    """Per-channel mean and M2 (sum of squared deviations) of x.

    x: any shape, float16/32/64; returns two float64 arrays of shape (C,).
    """
    _, mean, _, m2 = _centered_moments(_upcast(x), layout)
    return mean, m2


@ieee_semantics
def forward_train(x, layout: ChannelLayout, gamma, beta, eps: float, relu: bool, running, out=None):
    """Training forward.

    x: input, any shape, float16/32/64; gamma, beta: (C,) or None;
    running: ``(running_mean, running_var, factor)`` or None, updated in place;
    out: None or a checked buffer for y (``validation.check_out``).
    Returns ``y`` (shape and dtype of x; ``out`` when given), ``mean`` and
    ``invstd`` (C,) in the compute dtype.
    """
    xc = _upcast(x)
    n = layout.count
    d, mean, dmean, m2 = _centered_moments(xc, layout)
    invstd = 1.0 / np.sqrt(m2 / n + eps)
    scale, beta64 = _affine(gamma, beta, invstd)
    y = _finish(d, layout, scale, beta64 - dmean * scale, relu, x.dtype)
    if running is not None:
        running_mean, running_var, factor = running
        update_running(running_mean, running_var, mean, m2 / (n - 1), factor)
    cdt = xc.dtype
    return deliver(y, out), mean.astype(cdt), invstd.astype(cdt)


@ieee_semantics
def forward_infer(x, layout: ChannelLayout, running_mean, running_var, gamma, beta, eps: float,
                  relu: bool, out=None):
    """Inference forward from running statistics (C,).

    Returns ``y`` (like x) and the ``mean`` and ``invstd`` used, (C,) in the
    compute dtype.
    """
    xc = _upcast(x)
    mean = np.asarray(running_mean, dtype=np.float64)
    invstd = 1.0 / np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
    scale, beta64 = _affine(gamma, beta, invstd)
    k = mean.astype(xc.dtype)
    d = np.subtract(xc, k.reshape(layout.param_shape))
    y = _finish(d, layout, scale, beta64 - (mean - k) * scale, relu, x.dtype)
    return deliver(y, out), k, invstd.astype(xc.dtype)


@ieee_semantics
def backward(dy, x, layout: ChannelLayout, mean, invstd, gamma, out=None):
    """Backward of the training forward (before any activation).

    dy, x: same shape and dtype; mean, invstd: (C,) saved statistics;
    gamma: (C,) or None; out: None or a checked buffer for dx. Returns
    ``dx`` (like x; ``out`` when given), ``dgamma`` and ``dbeta`` (C,) in
    the compute dtype.

    ``dx = gamma * invstd * (dy - sum(dy)/n - xhat * sum(dy * xhat)/n)``,
    applied as one fused ``dy * a + (x - mean) * b + c`` per channel.
    """
    axes = layout.reduce_axes
    n = layout.count
    xc, dyc = _upcast(x), _upcast(dy)
    cdt = xc.dtype
    mean64 = np.asarray(mean, dtype=np.float64)
    invstd64 = np.asarray(invstd, dtype=np.float64)
    # x - mean = d - delta with d = x - k exact near the mean (see module doc).
    k = mean64.astype(cdt)
    delta = mean64 - k
    d = np.subtract(xc, k.reshape(layout.param_shape))
    sum_dy = np.sum(dyc, axis=axes, dtype=np.float64)
    sum_dy_xhat = (np.sum(np.multiply(dyc, d), axis=axes, dtype=np.float64) - delta * sum_dy) * invstd64
    g = np.ones_like(invstd64) if gamma is None else np.asarray(gamma, dtype=np.float64)
    a = g * invstd64
    inv_n = 1.0 / n if n else 0.0
    b = -a * invstd64 * sum_dy_xhat * inv_n
    c = -a * sum_dy * inv_n - b * delta
    np.multiply(d, _per_channel(b, layout, cdt), out=d)
    d += np.multiply(dyc, _per_channel(a, layout, cdt))
    d += _per_channel(c, layout, cdt)
    dx = d if d.dtype == x.dtype else d.astype(x.dtype)
    return deliver(dx, out), sum_dy_xhat.astype(cdt), sum_dy.astype(cdt)
