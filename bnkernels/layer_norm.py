"""Layer norm and RMS norm: ``layer_norm``, ``layer_norm_backward``,
``rms_norm``, ``rms_norm_backward``, with torch's arguments and results.

Both normalize each row of x over its trailing ``normalized_shape``
(``bnkernels.norm_family``: the rows view, the checks); the float64 oracle
is ``bnkernels.reference.reference_layer_norm``.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from . import norm_family as nf
from . import validation as v
from .norm_family import NormSaved, RMSSaved


def _normalized_shape(normalized_shape) -> tuple:
    """``normalized_shape``, an int or a non-empty sequence of ints, as a tuple."""
    if isinstance(normalized_shape, (bool, np.bool_)):
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}")
    shape = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) else normalized_shape
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got "
                        f"{type(normalized_shape).__name__}") from None
    if not shape or not all(isinstance(n, numbers.Integral) and not isinstance(n, (bool, np.bool_))
                            for n in shape):
        raise TypeError(f"normalized_shape must be an int or a non-empty sequence of ints, got {normalized_shape!r}")
    return tuple(int(n) for n in shape)


def _normalized(normalized_shape, x) -> tuple:
    """:func:`_normalized_shape`, which must be the trailing dimensions of x."""
    shape = _normalized_shape(normalized_shape)
    if len(shape) > len(x.shape) or tuple(x.shape[len(x.shape) - len(shape):]) != shape:
        raise ValueError(f"normalized_shape {shape} must be the trailing dimensions of x, whose shape is "
                         f"{tuple(x.shape)}")
    return shape


def _rows(x, shape) -> nf.Rows:
    k = len(shape)
    return nf.Rows(tuple(x.shape[:len(x.shape) - k]), math.prod(shape), shape, 1, math.prod(shape))


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, backend="auto", return_saved=False,
               out=None):
    """Layer normalization, as ``torch.nn.functional.layer_norm``.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias``, with the mean and
    biased variance of each row over the trailing ``normalized_shape``.

    Args:
        x: array (*lead, *normalized_shape), float16, bfloat16, float32 or
            float64, any strides (a NumPy array or anything it views).
        normalized_shape: an int or a tuple: the trailing dimensions of x.
        weight, bias: arrays of ``normalized_shape``, or None (1 and 0).
        eps: added to the variance; finite, >= 0.
        backend: ``"auto"``, ``"numba"`` or ``"numpy"`` (the GPU backends
            have no norm-family kernels yet).
        return_saved: also return the :class:`NormSaved` for
            :func:`layer_norm_backward`.
        out: where to write y: an array like x (x itself for in place).

    Returns:
        y like x (``out`` when given), or ``(y, saved)``: ``saved.mean`` and
        ``saved.invstd`` of shape ``lead``, float32 (float64 for float64).
        The statistics are two-pass in float64 per row: exact for data far
        from zero (``1e4 + randn`` rows in float32 to 1e-4).
    """
    impl = nf.backend_for(backend, x)
    given = x
    x = nf.check_x(x, impl)
    shape = _normalized(normalized_shape, x)
    weight = nf.check_param(weight, "weight", shape, impl, "normalized_shape")
    bias = nf.check_param(bias, "bias", shape, impl, "normalized_shape")
    eps = v.check_eps(eps)
    return_saved = v.check_flag(return_saved, "return_saved")
    return nf.forward(impl, x, given, _rows(x, shape), weight, bias, eps, False, out, return_saved)


def layer_norm_backward(dy, x, saved_mean, saved_invstd, normalized_shape, weight=None, *, backend="auto"):
    """Gradients of :func:`layer_norm`: ``(dx, dweight, dbias)``.

    Args:
        dy: the gradient of y, like x.
        x: the forward's input.
        saved_mean, saved_invstd: ``saved.mean``, ``saved.invstd`` of the
            forward (shape ``lead``).
        normalized_shape, weight: the forward's.

    Returns:
        dx like x; ``dweight = sum(dy * xhat)`` and ``dbias = sum(dy)`` over
        the rows, of ``normalized_shape``, float32 (float64 for float64),
        returned even when weight is None.
    """
    impl = nf.backend_for(backend, x)
    x = nf.check_x(x, impl)
    dy = nf.check_x(dy, impl, "dy")
    shape = _normalized(normalized_shape, x)
    rows = _rows(x, shape)
    need = "pass saved.mean and saved.invstd from layer_norm(..., return_saved=True)"
    mean = nf.check_saved(saved_mean, "saved_mean", rows.rows, impl, need)
    inv = nf.check_saved(saved_invstd, "saved_invstd", rows.rows, impl, need)
    weight = nf.check_param(weight, "weight", shape, impl, "normalized_shape")
    return nf.backward(impl, dy, x, rows, mean, inv, weight, False)


def rms_norm(x, normalized_shape, weight=None, eps=None, *, backend="auto", return_saved=False, out=None):
    """RMS normalization, as ``torch.nn.functional.rms_norm``.

    ``y = x / sqrt(mean(x^2) + eps) * weight`` per row over the trailing
    ``normalized_shape``.

    Args:
        x, normalized_shape, weight, backend, out: as :func:`layer_norm`.
        eps: added to the mean square; None: torch's default, the machine
            epsilon of x's dtype (``np.finfo(x.dtype).eps``).
        return_saved: also return the :class:`RMSSaved` (``invrms``, shape
            ``lead``) for :func:`rms_norm_backward`.

    Returns:
        y like x, or ``(y, saved)``.
    """
    impl = nf.backend_for(backend, x)
    given = x
    x = nf.check_x(x, impl)
    shape = _normalized(normalized_shape, x)
    weight = nf.check_param(weight, "weight", shape, impl, "normalized_shape")
    eps = nf.finfo_eps(v.array_dtype(x)) if eps is None else v.check_eps(eps)
    return_saved = v.check_flag(return_saved, "return_saved")
    return nf.forward(impl, x, given, _rows(x, shape), weight, None, eps, True, out, return_saved)


def rms_norm_backward(dy, x, saved_invrms, normalized_shape, weight=None, *, backend="auto"):
    """Gradients of :func:`rms_norm`: ``(dx, dweight)``, dweight of
    ``normalized_shape`` (returned even when weight is None)."""
    impl = nf.backend_for(backend, x)
    x = nf.check_x(x, impl)
    dy = nf.check_x(dy, impl, "dy")
    shape = _normalized(normalized_shape, x)
    rows = _rows(x, shape)
    inv = nf.check_saved(saved_invrms, "saved_invrms", rows.rows, impl,
                         "pass saved.invrms from rms_norm(..., return_saved=True)")
    weight = nf.check_param(weight, "weight", shape, impl, "normalized_shape")
    dx, dweight, _ = nf.backward(impl, dy, x, rows, None, inv, weight, True)
    return dx, dweight


__all__ = ["NormSaved", "RMSSaved", "layer_norm", "layer_norm_backward", "rms_norm", "rms_norm_backward"]
