"""Keras masking (``bn_forward(..., mask=m)``, ``bn_backward(..., mask=m)``,
``layer(x, mask=m)``): in training the statistics use only the positions
where ``m`` is true; the output is computed everywhere.

``m`` is a boolean array of x's shape without the channel axis (Keras
passes ``(batch, time)`` masks for ``(batch, time, features)``), of x's
library (NumPy, CuPy or torch: boolean indexing is what selects the
positions; Numba device arrays have none). The statistics are those of the
selected rows ``x[m]`` (channel axis last), merged exactly as any
statistics; a fully masked batch has none (mean 0, variance 0, as Keras
computes them) and leaves the running statistics unchanged.

The gradient: with ``xhat`` from the masked statistics, ``dx = gamma *
invstd * dy`` everywhere, and at the masked-in positions also ``(x - mean)
* b + c`` with batch norm's ``b``, ``c`` over the sums of *all* positions
(every output depends on the statistics) and the masked count.
"""
from __future__ import annotations

import numpy as np

from .backends.interface import ChannelLayout
from .memory_order import permute
from .validation import is_numba_device_array, library


def check(mask, x, layout: ChannelLayout):
    """``mask`` checked against ``x`` (as the caller gave it) and its layout:
    boolean, x's shape without the channel axis, x's library. Returns it."""
    if not (hasattr(mask, "shape") and hasattr(mask, "dtype")):
        raise TypeError(f"mask must be a boolean array, got {type(mask).__name__}")
    if "bool" not in str(mask.dtype):
        raise TypeError(f"mask must be boolean (True where the statistics look), got dtype {mask.dtype}: "
                        "pass mask != 0")
    expected = tuple(n for i, n in enumerate(layout.shape) if i != layout.axis)
    if tuple(mask.shape) != expected:
        raise ValueError(f"mask must have x's shape without the channel axis {layout.axis}, {expected}, got "
                         f"{tuple(mask.shape)}")
    if library(mask) != library(x) and not (isinstance(mask, np.ndarray) and isinstance(x, (np.ndarray, list))):
        raise TypeError(f"mask must be an array of x's library ({library(x)}), got {type(mask).__name__}")
    if is_numba_device_array(x):
        raise TypeError("mask needs boolean indexing, which Numba device arrays do not have: pass CuPy or torch "
                        "arrays")
    return mask


def _channels_last(a, layout: ChannelLayout):
    perm = tuple(i for i in range(len(layout.shape)) if i != layout.axis) + (layout.axis,)
    return permute(a if hasattr(a, "shape") else np.asarray(a), perm)


def selected(a, layout: ChannelLayout, mask):
    """The rows of ``a`` (x-shaped) where ``mask`` is true: ``(k, C)``, a copy."""
    return _channels_last(a, layout)[mask]


def count(mask) -> int:
    """How many positions are masked in."""
    return int(mask.sum())


def scatter(dx, layout: ChannelLayout, mask, rows) -> None:
    """``dx[mask] = rows`` in place (dx x-shaped, rows ``(k, C)``)."""
    _channels_last(dx, layout)[mask] = rows
