"""Launch plans of the CuPy backend: which kernel instantiation, grid, block
and arguments, in plain Python.

Nothing here imports CuPy. Plans are built from arrays of any kind (CuPy on a
GPU; NumPy in the tests, which execute the same plans with the host harness
in ``tests/host_cuda``) and a caller-supplied ``alloc(shape, dtype)``.
Arguments follow the kernels' signatures in ``kernels/*.cuh``: arrays are
passed as pointers, ``np.int64``/``np.float64``/``np.int32`` scalars by value,
and ``NULL`` for an absent optional array.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...validation import ChannelLayout, compute_dtype
from .. import launch
from . import sources

NULL = np.uint64(0)  # a null pointer argument


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel`` is a name expression of ``sources``."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple
    shared_mem: int = 0


def storage_name(dtype) -> str:
    return sources.STORAGE[np.dtype(dtype).name]


def _ptr(a):
    return NULL if a is None else a


def _reduce_geometry(layout: ChannelLayout, limits, tuning):
    plan = launch.reduce_plan(layout.outer, layout.channels, layout.inner, limits, tuning)
    return plan, (plan.splits, plan.grid_groups, 1), (plan.tx, plan.ty, 1)


def _elementwise_geometry(total: int, limits, tuning):
    plan = launch.elementwise_plan(total, limits, tuning)
    return (plan.grid, 1, 1), (plan.block, 1, 1)


def counters_needed(layout: ChannelLayout, limits, tuning=launch.Tuning()) -> int:
    """Length of the zeroed uint32 counter array the reductions need."""
    return launch.reduce_plan(layout.outer, layout.channels, layout.inner, limits, tuning).groups


def stats(x, layout: ChannelLayout, gamma, beta, running, eps: float, alloc, counters, limits,
          tuning=launch.Tuning()):
    """The statistics launch. ``x``: flat contiguous input; ``gamma``, ``beta``:
    (C,) arrays in the accumulation dtype or None; ``running``:
    ``(running_mean, running_var, factor)`` with both arrays of one dtype
    (float32 or float64), or None; ``counters``: zeroed uint32 array.

    Returns ``(launch, out)`` with ``out`` the dict of (C,) arrays
    ``k, scale, shift, mean, invstd, dmean, m2`` the kernel writes.
    """
    t = storage_name(x.dtype)
    acc = compute_dtype(x.dtype)
    C, n = layout.channels, layout.count
    out = {name: alloc((C,), acc) for name in ("k", "scale", "shift", "mean", "invstd", "dmean", "m2")}
    plan, grid, block = _reduce_geometry(layout, limits, tuning)
    stages = [alloc((C, plan.splits), acc) for _ in range(3)]
    rm, rv, factor = running if running is not None else (None, None, 0.0)
    r = "double" if rm is not None and np.dtype(rm.dtype) == np.float64 else "float"
    args = (x, np.int64(layout.outer), np.int64(C), np.int64(layout.inner), np.float64(1.0 / n),
            np.float64(n / (n - 1) if n > 1 else 0.0), np.float64(eps), np.float64(factor),
            _ptr(gamma), _ptr(beta), _ptr(rm), _ptr(rv), out["k"], out["scale"], out["shift"], out["mean"],
            out["invstd"], out["dmean"], out["m2"], *stages, counters)
    return Launch(sources.stats_name(t, r, layout.inner == 1), grid, block, args), out


def apply(x, y, layout: ChannelLayout, k, scale, shift, relu: bool, vectorized: bool, limits,
          tuning=launch.Tuning()) -> Launch:
    """``y = (x - k) * scale + shift`` [ReLU] over flat contiguous x, y.
    ``vectorized``: both pointers are 16-byte aligned."""
    grid, block = _elementwise_geometry(x.size, limits, tuning)
    args = (x, y, np.int64(x.size), np.int64(layout.channels), np.int64(layout.inner), k, scale, shift,
            np.int32(relu), np.int32(vectorized))
    return Launch(sources.apply_name(storage_name(x.dtype)), grid, block, args)


def infer_coeffs(x_dtype, running_mean, running_var, gamma, beta, eps: float, alloc) -> tuple[Launch, dict]:
    """Per-channel ``k, scale, shift, invstd`` from running statistics (both
    of one dtype, float32 or float64)."""
    acc = compute_dtype(x_dtype)
    C = running_mean.shape[0]
    out = {name: alloc((C,), acc) for name in ("k", "scale", "shift", "invstd")}
    threads = 128
    r = "double" if np.dtype(running_mean.dtype) == np.float64 else "float"
    args = (running_mean, running_var, np.int64(C), np.float64(eps), _ptr(gamma), _ptr(beta), out["k"],
            out["scale"], out["shift"], out["invstd"])
    name = sources.infer_coeffs_name(sources.ACCUMULATOR[storage_name(x_dtype)], r)
    return Launch(name, (max(1, math.ceil(C / threads)), 1, 1), (threads, 1, 1), args), out


def bwd_reduce(dy, x, layout: ChannelLayout, gamma, saved_mean, saved_invstd, alloc, counters, limits,
               tuning=launch.Tuning()):
    """Backward sums. ``saved_mean``, ``saved_invstd``: (C,) float64;
    ``gamma``: (C,) accumulation dtype or None. Returns ``(launch, out)``,
    ``out``: ``dgamma, dbeta, k, a, b, c`` (C,) arrays."""
    t = storage_name(x.dtype)
    acc = compute_dtype(x.dtype)
    C, n = layout.channels, layout.count
    out = {name: alloc((C,), acc) for name in ("dgamma", "dbeta", "k", "a", "b", "c")}
    plan, grid, block = _reduce_geometry(layout, limits, tuning)
    stages = [alloc((C, plan.splits), acc) for _ in range(2)]
    args = (dy, x, np.int64(layout.outer), np.int64(C), np.int64(layout.inner), np.float64(1.0 / n),
            _ptr(gamma), saved_mean, saved_invstd, out["dgamma"], out["dbeta"], out["k"], out["a"], out["b"],
            out["c"], *stages, counters)
    return Launch(sources.bwd_reduce_name(t, layout.inner == 1), grid, block, args), out


def dx(dy, x, out, layout: ChannelLayout, coeffs: dict, vectorized: bool, limits,
       tuning=launch.Tuning()) -> Launch:
    """``dx = dy * a + (x - k) * b + c`` over flat contiguous arrays."""
    grid, block = _elementwise_geometry(x.size, limits, tuning)
    args = (dy, x, out, np.int64(x.size), np.int64(layout.channels), np.int64(layout.inner), coeffs["k"],
            coeffs["a"], coeffs["b"], coeffs["c"], np.int32(vectorized))
    return Launch(sources.dx_name(storage_name(x.dtype)), grid, block, args)


# --------------------------------------------------------------------------
# Operations: the launch sequences, run by any device object providing
# ``alloc(shape, dtype)``, ``counters(n)`` (zeroed uint32, left zeroed by the
# kernels), ``run(launch)``, ``aligned(*arrays)`` (all 16-byte aligned),
# ``limits`` and ``tuning``. The CuPy backend and the host-harness tests run
# exactly these.
# --------------------------------------------------------------------------

def run_stats(dev, x, layout: ChannelLayout, gamma, beta, running, eps: float) -> dict:
    """Statistics (and running-statistics update) of flat ``x``: 1 read."""
    counters = dev.counters(counters_needed(layout, dev.limits, dev.tuning))
    launch_, out = stats(x, layout, gamma, beta, running, eps, dev.alloc, counters, dev.limits, dev.tuning)
    dev.run(launch_)
    return out


def run_forward_train(dev, x, layout: ChannelLayout, gamma, beta, running, eps: float, relu: bool):
    """Training forward: statistics, then apply (2 reads + 1 write of x).
    Returns ``(y, out)`` with ``out`` from :func:`stats`."""
    out = run_stats(dev, x, layout, gamma, beta, running, eps)
    y = dev.alloc(x.shape, x.dtype)
    if x.size:
        dev.run(apply(x, y, layout, out["k"], out["scale"], out["shift"], relu, dev.aligned(x, y), dev.limits,
                      dev.tuning))
    return y, out


def run_forward_infer(dev, x, layout: ChannelLayout, running_mean, running_var, gamma, beta, eps: float,
                      relu: bool):
    """Inference: coefficients, then apply (1 read + 1 write). Returns
    ``(y, out)`` with ``out`` holding ``k`` and ``invstd``."""
    launch_, out = infer_coeffs(x.dtype, running_mean, running_var, gamma, beta, eps, dev.alloc)
    dev.run(launch_)
    y = dev.alloc(x.shape, x.dtype)
    if x.size:
        dev.run(apply(x, y, layout, out["k"], out["scale"], out["shift"], relu, dev.aligned(x, y), dev.limits,
                      dev.tuning))
    return y, out


def run_backward(dev, dy, x, layout: ChannelLayout, gamma, saved_mean, saved_invstd):
    """Backward: sums, then dx (4 reads + 1 write). ``saved_*``: (C,)
    float64. Returns ``(dx, out)`` with ``out['dgamma']``, ``out['dbeta']``."""
    counters = dev.counters(counters_needed(layout, dev.limits, dev.tuning))
    launch_, out = bwd_reduce(dy, x, layout, gamma, saved_mean, saved_invstd, dev.alloc, counters, dev.limits,
                              dev.tuning)
    dev.run(launch_)
    result = dev.alloc(x.shape, x.dtype)
    dev.run(dx(dy, x, result, layout, out, dev.aligned(dy, x, result), dev.limits, dev.tuning))
    return result, out
