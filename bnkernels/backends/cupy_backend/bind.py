"""A backend-independent ``gpu.plans.Launch`` as a launch of this backend's
CUDA C++ kernels (``kernels/*.cuh``): the template instantiation (a name
expression of ``sources``) and the arguments in the kernel's order, with
NULL for an absent array. Plain Python: the host harness
(``tests/host_cuda``) launches the very same objects."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import sources

NULL = np.uint64(0)  # a null pointer argument

#: Each kernel's parameters, in the order of its signature in ``kernels/*.cuh``.
SIGNATURES = {
    "stats": ("x", "outer", "channels", "inner", "inv_count", "unbias", "eps", "factor", "gamma", "beta",
              "running_mean", "running_var", "k", "scale", "shift", "mean", "invstd", "dmean", "m2",
              "stage0", "stage1", "stage2", "counters"),
    "apply": ("x", "y", "total", "channels", "inner", "k", "scale", "shift", "relu", "vectorized"),
    "apply_residual": ("x", "residual", "y", "total", "channels", "inner", "k", "scale", "shift", "relu",
                       "vectorized"),
    "relu_backward": ("dy", "y", "g", "total", "vectorized"),
    "infer_coeffs": ("running_mean", "running_var", "channels", "eps", "gamma", "beta", "k", "scale", "shift",
                     "invstd"),
    "bwd_reduce": ("dy", "x", "outer", "channels", "inner", "inv_count", "gamma", "saved_mean", "saved_invstd",
                   "dgamma", "dbeta", "k", "a", "b", "c", "stage0", "stage1", "counters"),
    "dx": ("dy", "x", "dx", "total", "channels", "inner", "k", "a", "b", "c", "vectorized"),
}


@dataclass(frozen=True)
class BoundLaunch:
    """``kernel``: a name expression of ``sources``; ``args`` positional."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple
    shared_mem: int = 0


#: 16-bit integer storage is bfloat16's bits: CuPy has no bfloat16 dtype, so
#: the adapter holds bfloat16 data as int16 arrays (``__init__.py``); no
#: other integer data ever reaches a kernel (``validation`` refuses it).
_BF16_BITS = ("int16", "uint16")


def storage_name(dtype) -> str:
    name = np.dtype(dtype).name
    return sources.STORAGE["bfloat16" if name in _BF16_BITS else name]


def _running_name(dtype) -> str:
    return "double" if dtype is not None and np.dtype(dtype) == np.float64 else "float"


def kernel_name(launch) -> str:
    """The instantiation ``launch`` runs."""
    t = storage_name(launch.storage)
    if launch.kernel == "stats":
        return sources.stats_name(t, _running_name(launch.stats_dtype), launch.rows)
    if launch.kernel == "apply":
        return sources.apply_name(t)
    if launch.kernel == "apply_residual":
        return sources.apply_residual_name(t)
    if launch.kernel == "relu_backward":
        return sources.relu_backward_name(t)
    if launch.kernel == "infer_coeffs":
        return sources.infer_coeffs_name(sources.ACCUMULATOR[t], _running_name(launch.stats_dtype))
    if launch.kernel == "bwd_reduce":
        return sources.bwd_reduce_name(t, _running_name(launch.stats_dtype), launch.rows)
    return sources.dx_name(t)


def bind(launch) -> BoundLaunch:
    """The launch of this backend's kernel for a ``gpu.plans.Launch``."""
    args = tuple(NULL if launch.args[name] is None else launch.args[name] for name in SIGNATURES[launch.kernel])
    return BoundLaunch(kernel_name(launch), launch.grid, launch.block, args)
