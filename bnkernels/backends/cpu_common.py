"""What the two CPU backends (``numpy_backend``, ``numba_backend``) share:
IEEE semantics without NumPy's warnings, per-channel parameters as float64,
and the running-statistics update (all host-side, on NumPy arrays)."""
from __future__ import annotations

import numpy as np

#: Decorator for the CPU entry points: NaN/Inf propagate silently, as on a
#: GPU (eps=0 on a constant channel, float16 beyond 65504), and NumPy's
#: floating-point warnings (or errors: subnormal results are expected,
#: whatever ``np.seterr`` says) do not surface in callers' code.
ieee_semantics = np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore")


def per_channel(p, C: int, default: float) -> np.ndarray:
    """A per-channel parameter (gamma, beta: (C,) or None) as a float64
    (C,) array, ``default`` everywhere where it is None."""
    return np.full(C, default) if p is None else np.asarray(p, np.float64)


def update_running(running_mean, running_var, mean, var_unbiased, factor):
    """``running = (1 - factor) * running + factor * batch``, in place.

    running_mean, running_var: (C,) float32/float64 arrays, updated;
    mean, var_unbiased: (C,) float64 batch statistics; factor: float in
    [0, 1]. Computed in float64 and stored in the running arrays' own dtype.
    """
    for run, batch in ((running_mean, mean), (running_var, var_unbiased)):
        new = (1.0 - factor) * run.astype(np.float64) + factor * batch
        run[...] = new
