"""What layer, RMS, group and instance norm share: each normalizes the rows
of a view of x, ``(1, G, F)`` as a :class:`ChannelLayout` with an
:class:`Affine` map for its weights, through the backend's
``norm_forward``/``norm_backward`` members (``bnkernels.engine``).

=============== =================== ======================== ====================
norm            x                   rows (G) x values (F)     weight index
=============== =================== ======================== ====================
layer, RMS      (*lead, *shape)     prod(lead) x prod(shape) i (per feature)
group           (N, C, *spatial)    N*G x C/G*prod(spatial)  channel of the value
instance        (N, C, *spatial)    N*C x prod(spatial)      channel of the row
=============== =================== ======================== ====================

The public functions (``layer_norm.py``, ``group_norm.py``) check their own
arguments (shapes, groups) and call :func:`forward`/:func:`backward` here,
which check the arrays, run the backend and shape the results. A call that
raises writes nothing.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from . import engine
from . import validation as v
from .backends import resolve
from .backends.interface import Affine, ChannelLayout


@dataclass(frozen=True)
class NormSaved:
    """The statistics a layer, group or instance norm backward needs: the
    ``mean`` and ``invstd = 1 / sqrt(var + eps)`` of each row, of the rows'
    shape (``x.shape[:-k]``, (N, G) or (N, C)), float32 (float64 for float64
    input)."""

    mean: np.ndarray
    invstd: np.ndarray


@dataclass(frozen=True)
class RMSSaved:
    """What an RMS norm backward needs: ``invrms = 1 / sqrt(mean(x^2) +
    eps)`` of each row, of the rows' shape, float32 (float64 for float64)."""

    invrms: np.ndarray


@dataclass(frozen=True)
class Rows:
    """A norm's view of x: ``rows`` (the saved statistics' shape), the
    values of a row, and the weight map: ``channels`` weights of
    ``param_shape``, weight ``(g % period) * span + i // divisor`` for value
    i of row g."""

    rows: tuple
    values: int
    param_shape: tuple
    period: int
    span: int

    @property
    def layout(self) -> ChannelLayout:
        G = math.prod(self.rows)
        channels = math.prod(self.param_shape)
        return ChannelLayout((1, G, self.values), 1, Affine(channels, self.period, self.span,
                                                             self.values // self.span if self.span else 1))


def check_positive_int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


def backend_for(backend: str, x):
    """The backend module for x, which must have the norm family's members."""
    impl = resolve(backend, x)
    if not hasattr(impl, "norm_forward"):
        raise NotImplementedError(f"the {impl.name} backend has no kernels for layer, group, instance and RMS norm "
                                  f"yet: pass a NumPy array with backend='numba' or backend='numpy'")
    return impl


def check_x(x, impl, name: str = "x"):
    """An input (x, dy) as the backend's array, a float dtype, ndim >= 1."""
    return v.check_input(v.convert(x, name, impl.asarray), name)


def check_param(p, name: str, shape: tuple, impl, what: str):
    """A weight or bias of exactly ``shape`` (``what`` says whose shape), a
    float dtype; returned flat (channels,), or None."""
    p = v.convert(p, name, impl.asarray)
    if p is None:
        return None
    if not (hasattr(p, "dtype") and hasattr(p, "shape")):
        raise TypeError(f"{name} must be an array, got {type(p).__name__}")
    dtype = v.array_dtype(p)
    if dtype not in v.INPUT_DTYPES and not v.is_bfloat16(dtype):
        raise TypeError(f"{name} must have a float dtype (float16, bfloat16, float32, float64), got {dtype}")
    if tuple(p.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {tuple(p.shape)}")
    return p.reshape(-1)


def check_saved(a, name: str, rows: tuple, impl, need: str):
    """A saved statistic of the rows' shape, returned flat (G,)."""
    a = v.convert(a, name, impl.asarray)
    if a is None:
        raise ValueError(f"{name} is required: {need}")
    if not (hasattr(a, "dtype") and hasattr(a, "shape")):
        raise TypeError(f"{name} must be an array, got {type(a).__name__}")
    if tuple(a.shape) != tuple(rows):
        raise ValueError(f"{name} must have shape {tuple(rows)} (one value per row of x), got {tuple(a.shape)}")
    return a.reshape(-1)


def _aliasing(out_view, given_x, x, params: dict) -> None:
    read = {"x": v.memory_of(x, given_x), **{n: v.memory_of(p, p) for n, p in params.items() if p is not None}}
    v.check_aliasing({"out": out_view}, read, in_place=("x",))


def _written_rows(out_view, layout):
    """Where the backend writes: a (1, G, F) view of ``out`` when it has
    one (C-contiguous), else None (the result is copied into out)."""
    if out_view is None or not out_view.flags.c_contiguous:
        return None
    return out_view.reshape(layout.shape)


def forward(impl, x, given_x, rows: Rows, weight, bias, eps: float, rms: bool, out, return_saved: bool):
    """Run a checked norm forward: ``y`` (``out`` when given) or ``(y,
    saved)``."""
    out, out_view = v.check_out(out, x, given_x)
    _aliasing(out_view, given_x, x, {"weight": weight, "bias": bias})
    layout = rows.layout
    target = _written_rows(out_view, layout)
    y, mean, inv = engine.norm_forward(impl, x.reshape(layout.shape), layout, weight, bias, eps, rms, target)
    if out is not None and target is None:
        out_view[...] = y.reshape(out_view.shape)
    y = out if out is not None else y.reshape(x.shape)
    if not return_saved:
        return y
    saved = RMSSaved(inv.reshape(rows.rows)) if rms else NormSaved(mean.reshape(rows.rows), inv.reshape(rows.rows))
    return y, saved


def backward(impl, dy, x, rows: Rows, mean, invstd, weight, rms: bool):
    """Run a checked norm backward: ``(dx, dweight, dbias)`` with dweight,
    dbias of the parameters' shape."""
    v.check_same_shape(dy, x)
    layout = rows.layout
    dx, dweight, dbias = engine.norm_backward(impl, dy.reshape(layout.shape), x.reshape(layout.shape), layout,
                                              mean, invstd, weight, rms)
    return dx.reshape(x.shape), dweight.reshape(rows.param_shape), dbias.reshape(rows.param_shape)


def finfo_eps(dtype) -> float:
    """torch's default RMS norm eps for a dtype: its machine epsilon."""
    dtype = np.dtype(dtype)
    if v.is_bfloat16(dtype):
        import ml_dtypes

        return float(ml_dtypes.finfo(dtype).eps)
    return float(np.finfo(dtype).eps)
