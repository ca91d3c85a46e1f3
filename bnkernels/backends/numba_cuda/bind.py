"""A backend-independent ``gpu.plans.Launch`` as a launch of this backend's
Numba CUDA kernels (``kernels.py``): the kernel for the compute dtype and
the layout, and its arguments in order, where an absent array is a
1-element dummy with a ``has_*`` flag of 0."""
from __future__ import annotations

import numba
import numpy as np

from ...validation import compute_dtype
from .kernels import VEC, get_kernels

_ACC = {np.dtype(np.float32): numba.float32, np.dtype(np.float64): numba.float64}

#: Each kernel's parameters in the order of its signature in ``kernels.py``;
#: ``has_<name>`` is 1 when the argument ``FLAGS[has_<name>]`` is given.
SIGNATURES = {
    "stats": ("x", "outer", "channels", "inner", "inv_count", "unbias", "eps", "factor", "has_gamma", "has_beta",
              "has_running", "gamma", "beta", "running_mean", "running_var", "k", "scale", "shift", "mean",
              "invstd", "dmean", "m2", "stage0", "stage1", "stage2", "counters"),
    "apply": ("x", "y", "channels", "inner", "k", "scale", "shift", "relu"),
    "apply_residual": ("x", "residual", "y", "channels", "inner", "k", "scale", "shift", "relu"),
    "relu_backward": ("dy", "y", "g"),
    "infer_coeffs": ("running_mean", "running_var", "eps", "has_gamma", "has_beta", "gamma", "beta", "k", "scale",
                     "shift", "invstd"),
    "bwd_reduce": ("dy", "x", "outer", "channels", "inner", "inv_count", "has_gamma", "gamma", "saved_mean",
                   "saved_invstd", "dgamma", "dbeta", "k", "a", "b", "c", "stage0", "stage1", "counters"),
    "dx": ("dy", "x", "dx", "channels", "inner", "k", "a", "b", "c"),
}
FLAGS = {"has_gamma": "gamma", "has_beta": "beta", "has_running": "running_mean"}


#: Launches whose flat indices, plus the steps the kernels take past the
#: end (at most 4 grid strides), stay below this use 32-bit index
#: arithmetic (``get_kernels(acc, numba.uint32)``), the others 64-bit.
#: The 32-bit kernels add unsigned 32-bit values below 2^32: this bound
#: leaves a factor 2 to spare.
INDEX32_LIMIT = 2**31


def _largest_index(launch) -> int:
    """An upper bound of every index ``launch``'s kernel computes: the
    size, plus 4 steps (reductions: a thread's step in flat addresses is at
    most ``C * S`` for ``S`` values per channel and grid row, plus
    ``C * inner`` when it wraps to the next plane; elementwise: a grid
    stride of ``VEC`` elements per thread)."""
    a = launch.args
    gx, gy, _ = launch.grid
    bx, by, _ = launch.block
    if launch.kernel in ("stats", "bwd_reduce"):
        total = int(a["outer"]) * int(a["channels"]) * int(a["inner"])
        return total + 4 * int(a["channels"]) * (gx * by + int(a["inner"]))
    return int(a["total"]) + 4 * VEC * gx * bx


def index_type(launch):
    """numba.uint32 when :func:`_largest_index` is below :data:`INDEX32_LIMIT`, else numba.uint64."""
    return numba.uint32 if _largest_index(launch) < INDEX32_LIMIT else numba.uint64


def kernel_for(launch):
    """The compiled-on-demand kernel ``launch`` runs: for its compute
    dtype (bfloat16 storage: int16 bits, float32), its index width, the
    layout (reductions: rows when ``inner == 1``; elementwise: planes when
    ``inner >= VEC``; ``relu_backward`` has no channels)."""
    acc = _ACC[compute_dtype(launch.storage)]
    if launch.kernel == "infer_coeffs":  # one thread per channel: no index variants
        return get_kernels(acc).infer_coeffs
    kernels = get_kernels(acc, index_type(launch))
    if launch.kernel == "stats":
        return kernels.stats_rows if launch.rows else kernels.stats_planes
    if launch.kernel == "bwd_reduce":
        return kernels.bwd_rows if launch.rows else kernels.bwd_planes
    if launch.kernel in ("apply", "apply_residual", "dx"):
        planes = int(launch.args["inner"]) >= VEC
        return getattr(kernels, f"{launch.kernel}_{'planes' if planes else 'rows'}")
    if launch.kernel == "relu_backward":
        return kernels.relu_backward
    raise ValueError(f"no numba-cuda kernel for {launch.kernel!r}")


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
