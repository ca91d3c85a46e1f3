"""What the two CPU backends (``numpy_backend``, ``numba_backend``) share:
IEEE semantics without NumPy's warnings, per-channel parameters as float64,
and the finalize stage (all host-side, on NumPy arrays)."""
from __future__ import annotations

import numpy as np

from ..validation import compute_dtype
from .coefficients import normalization, update_running
from .interface import ChannelLayout, Moments, Normalization

#: Decorator for the CPU entry points: NaN/Inf propagate silently, as on a
#: GPU (eps=0 on a constant channel, float16 beyond 65504), and NumPy's
#: floating-point warnings (or errors: subnormal results are expected,
#: whatever ``np.seterr`` says) do not surface in callers' code.
ieee_semantics = np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore")


def per_channel(p, C: int, default: float) -> np.ndarray:
    """A per-channel parameter (gamma, beta: (C,) or None) as a float64
    (C,) array, ``default`` everywhere where it is None."""
    return np.full(C, default) if p is None else np.asarray(p, np.float64)


def _normalization(mean, var, dtype, gamma, beta, eps: float) -> Normalization:
    invstd, scale, shift = normalization(mean, var, gamma, beta, eps)
    cdt = compute_dtype(dtype)
    return Normalization(mean.astype(cdt), invstd.astype(cdt), mean, scale, shift)


@ieee_semantics
def finalize(x, layout: ChannelLayout, moments: Moments, gamma, beta, eps: float, running) -> Normalization:
    """See ``interface.Backend.finalize``; k, scale, shift float64."""
    n = moments.count
    mean = np.asarray(moments.mean, np.float64)
    m2 = np.asarray(moments.m2, np.float64)
    if running is not None:
        update_running(running[0], running[1], mean, m2 / (n - 1), running[2])
    return _normalization(mean, m2 / n, x.dtype, gamma, beta, eps)


@ieee_semantics
def finalize_running(x, layout: ChannelLayout, running_mean, running_var, gamma, beta,
                     eps: float) -> Normalization:
    """See ``interface.Backend.finalize_running``; k, scale, shift float64."""
    return _normalization(np.asarray(running_mean, np.float64), running_var, x.dtype, gamma, beta, eps)
