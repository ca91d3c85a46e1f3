"""Inputs whose memory is C-contiguous in another axis order (a torch
``channels_last`` tensor seen as NCHW, any transpose of a contiguous
array): the public functions run them in their memory order, so the
backends see a C-contiguous array (no copy) with the channel axis where it
lies in memory (NCHW channels-last: the channel-fastest kernels), and the
results come back with the input's strides.

:func:`order` finds the permutation; :func:`permute` applies one to an
array of any kind (NumPy, CuPy, Numba device arrays: ``transpose``; torch:
``permute``), a view either way.
"""
from __future__ import annotations

import numpy as np

from .validation import is_numba_device_array, is_torch


def _byte_strides(a):
    """``a``'s strides in bytes, or None when it has none to read (a list,
    an array type without them)."""
    if is_torch(a):
        return tuple(s * a.element_size() for s in a.stride())
    strides = getattr(a, "strides", None)
    if strides is None and hasattr(a, "__cuda_array_interface__"):
        strides = a.__cuda_array_interface__.get("strides")
        if strides is None:  # C-contiguous by the interface's convention
            return None
    return None if strides is None else tuple(int(s) for s in strides)


def order(a) -> tuple | None:
    """The axis order in which ``a`` is C-contiguous (dense, no gaps,
    positive strides), when that is not its own order; None otherwise (C
    order already, or no such order: then the backends copy, as for any
    strided input). Size-1 axes keep their place among the others."""
    if is_torch(a):
        if a.is_contiguous():
            return None
    elif is_numba_device_array(a):
        return None  # a Numba device array: it cannot be permuted (then it is copied, as any strided input)
    else:
        flags = getattr(a, "flags", None)
        if flags is None or flags.c_contiguous:  # the common case, decided at once
            return None
    shape = tuple(getattr(a, "shape", ()))
    if len(shape) < 2 or 0 in shape:
        return None
    strides = _byte_strides(a)
    if strides is None or len(strides) != len(shape):
        return None
    itemsize = np.dtype(str(a.dtype).replace("torch.", "")).itemsize if is_torch(a) else a.dtype.itemsize
    big = [i for i in range(len(shape)) if shape[i] > 1]
    ranked = sorted(big, key=lambda i: -strides[i])  # outermost first (stable: ties keep axis order)
    expected = itemsize
    for i in reversed(ranked):
        if strides[i] != expected:
            return None
        expected *= shape[i]
    if ranked == big:
        return None  # already C order
    slots = iter(ranked)
    perm = tuple(next(slots) if shape[i] > 1 else i for i in range(len(shape)))
    return perm


def permute(a, perm):
    """``a`` with its axes in ``perm``'s order (a view)."""
    if a is None:
        return None
    return a.permute(*perm) if is_torch(a) else a.transpose(perm)


def inverse(perm) -> tuple:
    return tuple(int(i) for i in np.argsort(perm))


def axis_in(perm, axis):
    """Where ``axis`` (an int or a tuple, negative allowed) lies after
    ``perm`` (for an input of ``len(perm)`` dimensions); out-of-range axes
    are left as they are, for validation to report."""
    ndim = len(perm)
    position = {p: i for i, p in enumerate(perm)}

    def one(a):
        if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer)) or not -ndim <= a < ndim:
            return a
        return position[int(a) % ndim]

    return type(axis)(one(a) for a in axis) if isinstance(axis, (tuple, list)) else one(axis)
