"""A backend-independent ``gpu.plans.Launch`` as a launch of this backend's
Numba CUDA kernels (``kernels.py``): the kernel for the compute dtype and
the layout, and its arguments in order, where an absent array is a
1-element dummy with a ``has_*`` flag of 0."""
from __future__ import annotations

import numba
import numpy as np

from ...validation import compute_dtype
from .kernels import get_kernels

_ACC = {np.dtype(np.float32): numba.float32, np.dtype(np.float64): numba.float64}

#: Each kernel's parameters in the order of its signature in ``kernels.py``;
#: ``has_<name>`` is 1 when the argument ``FLAGS[has_<name>]`` is given.
SIGNATURES = {
    "stats": ("x", "outer", "channels", "inner", "inv_count", "unbias", "eps", "factor", "has_gamma", "has_beta",
              "has_running", "gamma", "beta", "running_mean", "running_var", "k", "scale", "shift", "mean",
              "invstd", "dmean", "m2", "stage0", "stage1", "stage2", "counters"),
    "apply": ("x", "y", "channels", "inner", "k", "scale", "shift", "relu"),
    "infer_coeffs": ("running_mean", "running_var", "eps", "has_gamma", "has_beta", "gamma", "beta", "k", "scale",
                     "shift", "invstd"),
    "bwd_reduce": ("dy", "x", "outer", "channels", "inner", "inv_count", "has_gamma", "gamma", "saved_mean",
                   "saved_invstd", "dgamma", "dbeta", "k", "a", "b", "c", "stage0", "stage1", "counters"),
    "dx": ("dy", "x", "dx", "channels", "inner", "k", "a", "b", "c"),
}
FLAGS = {"has_gamma": "gamma", "has_beta": "beta", "has_running": "running_mean"}


def kernel_for(launch):
    """The compiled-on-demand kernel ``launch`` runs."""
    kernels = get_kernels(_ACC[compute_dtype(launch.storage)])
    if launch.kernel == "stats":
        return kernels.stats_rows if launch.rows else kernels.stats_planes
    if launch.kernel == "bwd_reduce":
        return kernels.bwd_rows if launch.rows else kernels.bwd_planes
    return getattr(kernels, launch.kernel)


def arguments(launch, dummy) -> tuple:
    """``launch``'s arguments in the kernel's order; ``dummy``: the device
    array passed for an absent one. NumPy scalars become Python numbers
    (the types Numba compiles the kernels for)."""
    values = []
    for name in SIGNATURES[launch.kernel]:
        if name in FLAGS:
            values.append(int(launch.args[FLAGS[name]] is not None))
            continue
        value = launch.args[name]
        values.append(dummy if value is None else value.item() if isinstance(value, np.generic) else value)
    return tuple(values)
