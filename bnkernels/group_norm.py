"""Group norm and instance norm: ``group_norm``, ``group_norm_backward``,
``instance_norm``, ``instance_norm_backward``, with torch's arguments and
results.

Both normalize per sample: group norm each group of C/G channels with the
spatial axes, instance norm each channel's spatial values (group norm with
one channel a group); the weights are per channel
(``bnkernels.norm_family``). The float64 oracle is
``bnkernels.reference.reference_group_norm``.
"""
from __future__ import annotations

import math

import numpy as np

from . import norm_family as nf
from . import validation as v
from .batch_norm import bn_forward
from .norm_family import NormSaved


def _nc(x, name: str = "x") -> tuple[int, int]:
    if len(x.shape) < 2:
        raise ValueError(f"{name} must have shape (N, C, *spatial) with at least 2 dimensions, got "
                         f"{tuple(x.shape)}")
    return int(x.shape[0]), int(x.shape[1])


def _group_rows(x, groups: int) -> nf.Rows:
    N, C = _nc(x)
    if C % groups:
        raise ValueError(f"num_groups={groups} must divide the number of channels C={C} of x of shape "
                         f"{tuple(x.shape)}")
    spatial = math.prod(x.shape[2:])
    return nf.Rows((N, groups), C // groups * spatial, (C,), groups, C // groups)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, backend="auto", return_saved=False, out=None):
    """Group normalization, as ``torch.nn.functional.group_norm``.

    Args:
        x: (N, C, *spatial), float16, bfloat16, float32 or float64, any
            strides.
        num_groups: G, a positive int dividing C.
        weight, bias: (C,) arrays or None (1 and 0).
        eps: added to the variance; finite, >= 0.
        backend: ``"auto"``, ``"numba"`` or ``"numpy"``.
        return_saved: also return the :class:`NormSaved` (mean, invstd of
            shape (N, G)) for :func:`group_norm_backward`.
        out: where to write y: an array like x (x itself for in place).

    Returns:
        y like x (``out`` when given), or ``(y, saved)``.
    """
    impl = nf.backend_for(backend, x)
    given = x
    x = nf.check_x(x, impl)
    groups = nf.check_positive_int(num_groups, "num_groups")
    rows = _group_rows(x, groups)
    weight = nf.check_param(weight, "weight", rows.param_shape, impl, "one value per channel")
    bias = nf.check_param(bias, "bias", rows.param_shape, impl, "one value per channel")
    eps = v.check_eps(eps)
    return_saved = v.check_flag(return_saved, "return_saved")
    return nf.forward(impl, x, given, rows, weight, bias, eps, False, out, return_saved)


def group_norm_backward(dy, x, saved_mean, saved_invstd, num_groups, weight=None, *, backend="auto"):
    """Gradients of :func:`group_norm`: ``(dx, dweight, dbias)``, dweight and
    dbias (C,) float32 (float64 for float64), returned even when weight is
    None."""
    impl = nf.backend_for(backend, x)
    x = nf.check_x(x, impl)
    dy = nf.check_x(dy, impl, "dy")
    rows = _group_rows(x, nf.check_positive_int(num_groups, "num_groups"))
    return _backward(impl, dy, x, rows, saved_mean, saved_invstd, weight, "group_norm")


def _backward(impl, dy, x, rows, saved_mean, saved_invstd, weight, forward: str):
    need = f"pass saved.mean and saved.invstd from {forward}(..., return_saved=True)"
    mean = nf.check_saved(saved_mean, "saved_mean", rows.rows, impl, need)
    inv = nf.check_saved(saved_invstd, "saved_invstd", rows.rows, impl, need)
    weight = nf.check_param(weight, "weight", rows.param_shape, impl, "one value per channel")
    return nf.backward(impl, dy, x, rows, mean, inv, weight, False)


def _instance_rows(x) -> nf.Rows:
    N, C = _nc(x)
    return nf.Rows((N, C), math.prod(x.shape[2:]), (C,), C, 1)


def instance_norm(x, weight=None, bias=None, *, running_mean=None, running_var=None, use_input_stats=True,
                  momentum=0.1, eps=1e-5, backend="auto", return_saved=False, out=None):
    """Instance normalization, as ``torch.nn.functional.instance_norm``.

    Args:
        x: (N, C, *spatial), float16, bfloat16, float32 or float64; more
            than one spatial value when ``use_input_stats``.
        weight, bias: (C,) arrays or None.
        running_mean, running_var: (C,) float32/float64 arrays or None.
            With ``use_input_stats`` they are updated in place (only after
            every check passed): ``running = (1 - momentum) * running +
            momentum * batch``, the batch values being the average over
            the samples of each instance's mean and unbiased variance (as
            torch).
        use_input_stats: normalize each instance with its own statistics
            (True), or every sample with the running ones (False: batch
            norm inference, ``bn_forward(training=False)``, whose gradient is
            ``bn_backward(training=False)``).
        momentum: in [0, 1]; eps: finite, >= 0.
        backend, out: as :func:`group_norm`.
        return_saved: also return the :class:`NormSaved` (mean, invstd of
            shape (N, C)) for :func:`instance_norm_backward`; only with
            ``use_input_stats``.

    Returns:
        y like x, or ``(y, saved)``.
    """
    use_input_stats = v.check_flag(use_input_stats, "use_input_stats")
    return_saved = v.check_flag(return_saved, "return_saved")
    if not use_input_stats:
        if return_saved:
            raise ValueError("return_saved needs use_input_stats=True (with the running statistics, the gradient "
                             "is bn_backward(..., training=False) of the running mean and invstd)")
        if running_mean is None or running_var is None:
            raise ValueError("use_input_stats=False normalizes with running_mean and running_var: pass both")
        return bn_forward(x, weight, bias, running_mean, running_var, training=False, eps=eps, axis=1,
                          backend=backend, out=out)
    impl = nf.backend_for(backend, x)
    given = x
    x = nf.check_x(x, impl)
    rows = _instance_rows(x)
    if rows.values == 1:
        raise ValueError(f"Expected more than 1 spatial element when using input statistics, got x of shape "
                         f"{tuple(x.shape)}")
    weight = nf.check_param(weight, "weight", rows.param_shape, impl, "one value per channel")
    bias = nf.check_param(bias, "bias", rows.param_shape, impl, "one value per channel")
    eps = v.check_eps(eps)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    running = None
    if running_mean is not None:
        momentum = v.check_momentum(momentum)
        if momentum is None:
            raise ValueError("momentum must be a number in [0, 1] when running statistics are updated")
        C = rows.param_shape[0]
        running = [v.check_per_channel(v.writable_view(r, name, gpu_backend=False), name, C,
                                       dtypes=v.RUNNING_DTYPES)
                   for r, name in ((running_mean, "running_mean"), (running_var, "running_var"))]
        v.check_aliasing({"running_mean": running[0], "running_var": running[1]},
                         {"x": v.memory_of(x, given), "weight": weight, "bias": bias})
    y, saved = nf.forward(impl, x, given, rows, weight, bias, eps, False, out, True)
    if running is not None and rows.rows[0]:
        _update_running(running, saved, eps, rows.values, momentum)
    return (y, saved) if return_saved else y


def _update_running(running, saved: NormSaved, eps: float, n: int, momentum: float) -> None:
    """torch's instance-norm update: the batch average of each instance's
    mean and unbiased variance (from the saved ``invstd``, in float64)."""
    var = (1.0 / np.asarray(saved.invstd, np.float64) ** 2 - eps) * (n / max(n - 1, 1))
    for r, batch in zip(running, (np.asarray(saved.mean, np.float64).mean(axis=0), var.mean(axis=0))):
        r[...] = (1 - momentum) * np.asarray(r, np.float64) + momentum * batch


def instance_norm_backward(dy, x, saved_mean, saved_invstd, weight=None, *, backend="auto"):
    """Gradients of :func:`instance_norm` with ``use_input_stats``: ``(dx,
    dweight, dbias)``, dweight and dbias (C,)."""
    impl = nf.backend_for(backend, x)
    x = nf.check_x(x, impl)
    dy = nf.check_x(dy, impl, "dy")
    return _backward(impl, dy, x, _instance_rows(x), saved_mean, saved_invstd, weight, "instance_norm")


__all__ = ["group_norm", "group_norm_backward", "instance_norm", "instance_norm_backward"]
