"""The host-side arithmetic of the finalize and backward-apply stages, in
float64 on NumPy arrays of shape (G,): what every backend's staged path
computes between two passes over the data (the fused kernels do the same
arithmetic on the device)."""
from __future__ import annotations

import numpy as np


def normalization(mean, var, gamma, beta, eps: float):
    """``(invstd, scale, shift)`` of ``y = (x - mean) * scale + shift``:
    ``invstd = 1 / sqrt(var + eps)``, ``scale = gamma * invstd``, ``shift =
    beta``. mean, var: (G,) float64 (var biased); gamma, beta: (G,) or None
    (1 and 0)."""
    invstd = 1.0 / np.sqrt(np.asarray(var, np.float64) + eps)
    scale = invstd if gamma is None else np.asarray(gamma, np.float64) * invstd
    shift = np.zeros_like(invstd) if beta is None else np.asarray(beta, np.float64)
    return invstd, scale, shift


def dx_coefficients(sum_dy, sum_dy_xhat, count: int, invstd, gamma, frozen: bool = False):
    """``(a, b, c)`` of ``dx = dy * a + (x - mean) * b + c``, the gradient of
    the training forward: ``a = gamma * invstd``, ``b = -a * invstd *
    sum(dy * xhat) / n``, ``c = -a * sum(dy) / n``; ``frozen``: of the
    inference forward, whose mean and invstd are constants (``b = c = 0``).
    All (G,) float64."""
    invstd = np.asarray(invstd, np.float64)
    a = invstd if gamma is None else np.asarray(gamma, np.float64) * invstd
    if frozen:
        return a, np.zeros_like(a), np.zeros_like(a)
    b = -a * invstd * sum_dy_xhat / count
    c = -a * sum_dy / count
    return a, b, c


def update_running(running_mean, running_var, mean, var_unbiased, factor):
    """``running = (1 - factor) * running + factor * batch``, in place.

    running_mean, running_var: (G,) float32/float64 NumPy arrays, updated;
    mean, var_unbiased: (G,) float64 batch statistics; factor: float in
    [0, 1]. Computed in float64 and stored in the running arrays' own dtype.
    """
    for run, batch in ((running_mean, mean), (running_var, var_unbiased)):
        new = (1.0 - factor) * run.astype(np.float64) + factor * batch
        run[...] = new
