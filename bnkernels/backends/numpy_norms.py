"""The norm family's members of the NumPy backend (the reference
implementation): layer, RMS, group and instance norm, each a normalization
of the rows of a view.

The view is a :class:`ChannelLayout` ``(1, G, F)``: G rows of F values, one
set of statistics a row, and an :class:`Affine` map that says which weight
a value uses, ``(g % period) * span + i // divisor`` (so ``F == span *
divisor`` and ``G % period == 0``; the weight viewed ``(period, span)``
broadcasts against x viewed ``(G // period, period, span, divisor)``).
Statistics are float64 two-pass (mean, then the squared deviations from
it): exact where ``E[x^2] - E[x]^2`` cancels.
"""
from __future__ import annotations

import numpy as np

from ..validation import compute_dtype
from .cpu_common import ieee_semantics
from .interface import ChannelLayout


def _blocks(a, layout: ChannelLayout):
    """``a`` (G, F) viewed (G // period, period, span, divisor) (rows of no
    values: span 0, divisor 1)."""
    f = layout.affine
    G, F = layout.shape[1], layout.shape[2]
    return a.reshape(G // f.period, f.period, f.span, F // f.span if f.span else 1)


def _param(p, layout: ChannelLayout):
    """A weight or bias (channels,) as float64 (period, span, 1), or None."""
    f = layout.affine
    return None if p is None else np.asarray(p, np.float64).reshape(f.period, f.span, 1)


def _rows(x, layout: ChannelLayout):
    G, F = layout.shape[1], layout.shape[2]
    return np.asarray(x, np.float64).reshape(G, F)


@ieee_semantics  # NaN and inf data give NaN and inf results, as IEEE arithmetic does, without warnings
def norm_forward(x, layout: ChannelLayout, weight, bias, eps: float, rms: bool, out=None):
    """``(y, mean, invstd)``: y like x (``out`` when given), mean and invstd
    (G,) in the compute dtype; RMS norm (``rms``): ``y = x * invrms *
    weight``, mean None, invstd the inverse RMS ``1/sqrt(mean(x^2) + eps)``."""
    G, F = layout.shape[1], layout.shape[2]
    cdt = compute_dtype(x.dtype)
    x2 = _rows(x, layout)
    if rms:
        mean = None
        inv = 1.0 / np.sqrt(np.einsum("gf,gf->g", x2, x2) / max(F, 1) + eps)
        xhat = x2 * inv[:, None]
    else:
        mean = x2.mean(axis=1) if F else np.zeros(G)
        d = x2 - mean[:, None]
        inv = 1.0 / np.sqrt(np.einsum("gf,gf->g", d, d) / max(F, 1) + eps)
        xhat = d * inv[:, None]
    y = _blocks(xhat, layout)
    w, b = _param(weight, layout), _param(bias, layout)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    y = y.reshape(np.shape(x)).astype(x.dtype)
    if out is not None:
        out[...] = y
        y = out
    return y, None if mean is None else mean.astype(cdt), inv.astype(cdt)


@ieee_semantics
def norm_backward(dy, x, layout: ChannelLayout, mean, invstd, weight, rms: bool, out=None):
    """``(dx, dweight, dbias)`` of :func:`norm_forward` from its saved
    statistics (``mean`` None for RMS norm): per row ``g = dy * weight``,
    ``dx = invstd * (g - mean(g) - xhat * mean(g * xhat))`` (RMS: without
    ``mean(g)``); ``dweight = sum(dy * xhat)`` and ``dbias = sum(dy)`` over
    the values of each weight, (channels,) in the compute dtype."""
    G, F = layout.shape[1], layout.shape[2]
    cdt = compute_dtype(x.dtype)
    x2, dy2 = _rows(x, layout), _rows(dy, layout)
    inv = np.asarray(invstd, np.float64).reshape(G, 1)
    xhat = (x2 if mean is None else x2 - np.asarray(mean, np.float64).reshape(G, 1)) * inv
    w = _param(weight, layout)
    g = dy2 if w is None else (_blocks(dy2, layout) * w).reshape(G, F)
    n = max(F, 1)
    dx = g - xhat * (np.einsum("gf,gf->g", g, xhat) / n)[:, None]
    if mean is not None:
        dx -= (g.sum(axis=1) / n)[:, None]
    dx = (dx * inv).reshape(np.shape(x)).astype(x.dtype)
    if out is not None:
        out[...] = dx
        dx = out
    dweight = _blocks(dy2 * xhat, layout).sum(axis=(0, 3)).reshape(-1)
    dbias = _blocks(dy2, layout).sum(axis=(0, 3)).reshape(-1)
    return dx, dweight.astype(cdt), dbias.astype(cdt)
