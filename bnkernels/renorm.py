"""Batch renormalization (Ioffe 2017; Keras' ``renorm=True``) for the
layer: in training, ``y = (xhat * r + d) * gamma + beta`` with the batch's
``xhat`` and the corrections

- ``r = clip(sigma_B / sigma, rmin, rmax)``,
- ``d = clip((mu_B - mu) / sigma, -dmax, dmax)``,

where ``mu_B``, ``sigma_B = sqrt(var_B + eps)`` are the batch's (biased
variance) and ``mu``, ``sigma`` moving averages kept for this purpose
(``renorm_mean``, ``renorm_stddev``, as Keras keeps them; ``sigma`` at least
``sqrt(eps)``), taken before this batch updates them. r and d are constants
to the gradient, so the forward is batch norm with ``gamma * r`` and
``beta + gamma * d``, and its backward batch norm's with ``gamma * r``, with
``dgamma = r * sum(dy * xhat) + d * sum(dy)``. Inference is plain batch norm
with the running statistics (r = 1, d = 0).

Conventions (bnkernels', not Keras'): ``renorm_momentum`` is the weight of
the new batch (Keras' ``renorm_momentum=0.99`` is 0.01 here), and the
running statistics stay those of batch norm (the unbiased variance, updated
with ``momentum``).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

_KEYS = ("rmin", "rmax", "dmax")


@dataclass(frozen=True)
class Clipping:
    """``renorm_clipping``: r to ``[rmin, rmax]``, d to ``[-dmax, dmax]``
    (missing keys: 0, inf, inf, as Keras)."""

    rmin: float = 0.0
    rmax: float = math.inf
    dmax: float = math.inf


def check_clipping(clipping) -> Clipping:
    """A ``renorm_clipping`` dict (or None) as :class:`Clipping`, every
    value named in the error when it is wrong."""
    if clipping is None:
        return Clipping()
    if not isinstance(clipping, dict):
        raise TypeError(f"renorm_clipping must be a dict with keys among {_KEYS}, got {type(clipping).__name__}")
    unknown = sorted(set(clipping) - set(_KEYS))
    if unknown:
        raise ValueError(f"renorm_clipping has unknown keys {unknown}; valid: {list(_KEYS)}")
    values = {}
    for key, value in clipping.items():
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or math.isnan(value) \
                or value < 0:
            raise ValueError(f"renorm_clipping[{key!r}] must be a number >= 0, got {value!r}")
        values[key] = float(value)
    c = Clipping(**values)
    if c.rmin > c.rmax:
        raise ValueError(f"renorm_clipping: rmin={c.rmin} is above rmax={c.rmax}")
    return c


def corrections(mean_b, var_b, renorm_mean, renorm_stddev, eps: float, clipping: Clipping):
    """``(r, d)``, float64 arrays of the parameters' shape, from the batch's
    mean and biased variance and the moving ones (before their update)."""
    sigma_b = np.sqrt(np.asarray(var_b, np.float64) + eps)
    sigma = np.maximum(np.asarray(renorm_stddev, np.float64), math.sqrt(eps))
    r = np.clip(sigma_b / sigma, clipping.rmin, clipping.rmax)
    d = np.clip((np.asarray(mean_b, np.float64) - renorm_mean) / sigma, -clipping.dmax, clipping.dmax)
    return r, d


def update(renorm_mean, renorm_stddev, mean_b, var_b, eps: float, momentum: float) -> None:
    """The moving averages in place: ``(1 - momentum) * old + momentum *
    batch`` of the mean and of ``sqrt(var_B + eps)``."""
    renorm_mean[...] = (1 - momentum) * renorm_mean + momentum * np.asarray(mean_b, np.float64)
    renorm_stddev[...] = (1 - momentum) * renorm_stddev + momentum * np.sqrt(np.asarray(var_b, np.float64) + eps)


def affine(gamma, beta, r, d, shape, dtype):
    """The forward's ``(gamma * r, beta + gamma * d)`` (gamma 1, beta 0
    where absent)."""
    g = np.ones(shape) if gamma is None else np.asarray(gamma, np.float64)
    b = np.zeros(shape) if beta is None else np.asarray(beta, np.float64)
    return (g * r).astype(dtype), (b + g * d).astype(dtype)
