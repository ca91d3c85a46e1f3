"""bnkernels' layer, RMS, group and instance norm inside PyTorch.

Differentiable functions with ``torch.nn.functional``'s signatures
(:func:`layer_norm`, :func:`rms_norm`, :func:`group_norm`,
:func:`instance_norm`, each with a keyword ``backend``) and drop-in
modules subclassing torch's (:class:`LayerNorm`, :class:`RMSNorm`,
:class:`GroupNorm`, :class:`InstanceNorm1d`/``2d``/``3d``: torch's
constructor, parameters, buffers and ``state_dict`` keys; only
``forward`` is bnkernels').

Eagerly, every function runs through one ``torch.autograd.Function``,
:class:`_NormFunction`, parametrized by the norm's forward and backward
(the NumPy-level ``bnkernels.layer_norm``/``rms_norm``/``group_norm``/
``instance_norm`` and their ``*_backward``, :func:`_kernels`): gradients
for the input, the weight and the bias. CPU tensors reach the kernels as
NumPy views of their memory, without a copy (bfloat16 through its bits,
as ``bnkernels.torch.ops``); results keep the input's dtype and memory
format (``channels_last`` stays ``channels_last``). Instance norm's
running statistics are updated in place.

Under ``torch.compile`` they run as two custom operators with fake
kernels and an autograd formula (``fullgraph=True`` traces through them):

``torch.ops.bnkernels.norm(kind, input, weight, bias, shape, groups, eps,
backend) -> (y, mean, invstd)``
    ``kind``: ``"layer"``, ``"rms"``, ``"group"`` or ``"instance"``;
    ``shape``: layer/RMS norm's normalized shape (else ``[]``);
    ``groups``: group norm's (else 0). ``mean``/``invstd``: the rows'
    statistics (shape ``lead``, (N, G) or (N, C)), float32 (float64 for
    float64 input); RMS norm's ``mean`` is empty and its ``invstd`` the
    ``invrms``. Functional: instance norm's running statistics are
    updated after it, from ``mean``/``invstd``, by traced torch ops.

``torch.ops.bnkernels.norm_backward(kind, grad_out, input, weight, mean,
invstd, shape, groups, backend) -> (grad_input, grad_weight, grad_bias)``
    the parameter gradients of the parameters' shape in the statistics'
    dtype (RMS norm's grad_bias: zeros).

Dtypes: float16, bfloat16, float32 and float64 inputs; weight and bias
gradients come back in the weight's and the bias' dtypes. Instance norm
with ``use_input_stats=False`` is batch-norm inference and goes through
``bnkernels.torch.batch_norm`` (and its operators).

Backends: ``"auto"`` (on the CPU: numba, else numpy), ``"numba"``,
``"numpy"``. The GPU backends have no norm-family kernels yet: CUDA
tensors raise ``NotImplementedError`` (from ``bnkernels``).
"""
from __future__ import annotations

import warnings
from functools import partial
from typing import Optional

import torch
from torch import nn

from ..group_norm import group_norm as _np_group_norm
from ..group_norm import group_norm_backward as _np_group_norm_backward
from ..group_norm import instance_norm as _np_instance_norm
from ..group_norm import instance_norm_backward as _np_instance_norm_backward
from ..layer_norm import layer_norm as _np_layer_norm
from ..layer_norm import layer_norm_backward as _np_layer_norm_backward
from ..layer_norm import rms_norm as _np_rms_norm
from ..layer_norm import rms_norm_backward as _np_rms_norm_backward
from .ops import _acc_dtype, _cast, _like_input, _to_kernel, batch_norm, to_tensor

Tensor = torch.Tensor


# --- the norms' NumPy-level forwards and backwards --------------------------
# forward(x, weight, bias) -> (y, (statistics...)); backward(dy, x, statistics, weight) -> (dx, dweight, dbias);
# arrays in and out (what ops._to_kernel makes of tensors), the options bound by functools.partial.

def _layer_forward(x, weight, bias, *, shape, eps, backend):
    y, saved = _np_layer_norm(x, shape, weight, bias, eps, backend=backend, return_saved=True)
    return y, (saved.mean, saved.invstd)


def _layer_backward(dy, x, stats, weight, *, shape, backend):
    return _np_layer_norm_backward(dy, x, *stats, shape, weight, backend=backend)


def _rms_forward(x, weight, bias, *, shape, eps, backend):
    y, saved = _np_rms_norm(x, shape, weight, eps, backend=backend, return_saved=True)
    return y, (saved.invrms,)


def _rms_backward(dy, x, stats, weight, *, shape, backend):
    dx, dweight = _np_rms_norm_backward(dy, x, *stats, shape, weight, backend=backend)
    return dx, dweight, None


def _group_forward(x, weight, bias, *, groups, eps, backend):
    y, saved = _np_group_norm(x, groups, weight, bias, eps, backend=backend, return_saved=True)
    return y, (saved.mean, saved.invstd)


def _group_backward(dy, x, stats, weight, *, groups, backend):
    return _np_group_norm_backward(dy, x, *stats, groups, weight, backend=backend)


def _instance_forward(x, weight, bias, *, running_mean, running_var, momentum, eps, backend):
    y, saved = _np_instance_norm(x, weight, bias, running_mean=running_mean, running_var=running_var,
                                 use_input_stats=True, momentum=momentum, eps=eps, backend=backend,
                                 return_saved=True)
    return y, (saved.mean, saved.invstd)


def _instance_backward(dy, x, stats, weight, *, backend):
    return _np_instance_norm_backward(dy, x, *stats, weight, backend=backend)


def _kernels(kind: str, shape: tuple, groups: int, eps, backend: str, running_mean=None, running_var=None,
             momentum: float = 0.1):
    """The NumPy-level ``(forward, backward)`` of the norm ``kind``
    (``"layer"``, ``"rms"``, ``"group"``, ``"instance"``), options bound;
    ``running_mean``/``running_var``: instance norm's arrays to update in
    place (views of the buffers), or None."""
    if kind == "layer":
        return (partial(_layer_forward, shape=shape, eps=eps, backend=backend),
                partial(_layer_backward, shape=shape, backend=backend))
    if kind == "rms":
        return (partial(_rms_forward, shape=shape, eps=eps, backend=backend),
                partial(_rms_backward, shape=shape, backend=backend))
    if kind == "group":
        return (partial(_group_forward, groups=groups, eps=eps, backend=backend),
                partial(_group_backward, groups=groups, backend=backend))
    return (partial(_instance_forward, running_mean=running_mean, running_var=running_var, momentum=momentum,
                    eps=eps, backend=backend),
            partial(_instance_backward, backend=backend))


def _run_forward(forward, input, weight, bias):
    """y (laid out as ``torch.empty_like(input)``) and the statistics
    (tensors, float32; float64 for float64 input)."""
    y, stats = forward(_to_kernel(input), _to_kernel(weight), _to_kernel(bias))
    return _like_input(to_tensor(y), input), [_cast(to_tensor(s), _acc_dtype(input.dtype)) for s in stats]


def _run_backward(backward, grad_y, input, weight, stats):
    """``(dx, dweight, dbias)``: dx laid out as ``torch.empty_like(input)``,
    dweight and dbias of the parameters' shape in the statistics' dtype
    (dbias zeros for RMS norm, which has no bias)."""
    dx, dweight, dbias = backward(_to_kernel(grad_y), _to_kernel(input), [_to_kernel(s) for s in stats],
                                  _to_kernel(weight))
    dweight = _cast(to_tensor(dweight), stats[0].dtype)
    dbias = torch.zeros_like(dweight) if dbias is None else _cast(to_tensor(dbias), stats[0].dtype)
    return _like_input(to_tensor(dx), input), dweight, dbias


def _dtype(t: Optional[Tensor]) -> Optional[torch.dtype]:
    return None if t is None else t.dtype


def _wanted(grads, weight_dtype, bias_dtype, need):
    """The gradients autograd asked for (``need``: of input, weight,
    bias), the parameters' in their dtypes (None: no such parameter, no
    gradient); None for the others."""
    dx, dweight, dbias = grads
    grads = (dx, None if weight_dtype is None else _cast(dweight, weight_dtype),
             None if bias_dtype is None else _cast(dbias, bias_dtype))
    return tuple(g if n else None for g, n in zip(grads, need))


# --- the one autograd.Function (eager) ---------------------------------------

class _NormFunction(torch.autograd.Function):
    """A norm of the family, eagerly, with its autograd formula.

    ``apply(forward, backward, input, weight, bias)``: ``forward`` and
    ``backward`` are the norm's NumPy-level callables (:func:`_kernels`);
    ``input`` (any shape the norm takes, any dtype of the four),
    ``weight`` and ``bias`` tensors or None. Returns y like ``input`` (its
    dtype and memory format). The statistics the forward returns are kept
    for the backward (float32, float64 for float64 input); only y is
    differentiable. Once differentiable: a double backward raises.
    """

    @staticmethod
    def forward(ctx, forward, backward, input, weight, bias):
        y, stats = _run_forward(forward, input, weight, bias)
        ctx.save_for_backward(input, weight, bias, *stats)
        ctx.norm_backward = backward
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        input, weight, bias, *stats = ctx.saved_tensors
        need = ctx.needs_input_grad[2:5]
        if not any(need):
            return (None,) * 5
        grads = _run_backward(ctx.norm_backward, grad_y, input, weight, stats)
        return (None, None, *_wanted(grads, _dtype(weight), _dtype(bias), need))


# --- the custom operators (torch.compile) ------------------------------------
# bnkernels::norm(kind, ...) -> (y, mean, invstd), bnkernels::norm_backward(kind, ...) -> (dx, dweight, dbias):
# the same kernels, functional (instance norm's running statistics are updated by :func:`_norm` after the
# operator, from its statistics); RMS norm's ``mean`` is empty, its ``invstd`` the invrms.

def _stat_shape(kind: str, input: Tensor, shape: list, groups: int) -> tuple:
    if kind in ("layer", "rms"):
        return tuple(input.shape[:input.dim() - len(shape)])
    return (input.shape[0], groups if kind == "group" else input.shape[1])


def _param_shape(kind: str, input: Tensor, shape: list) -> tuple:
    return tuple(shape) if kind in ("layer", "rms") else (input.shape[1],)


@torch.library.custom_op("bnkernels::norm", mutates_args=())
def norm_op(kind: str, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], shape: list[int],
            groups: int, eps: Optional[float], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    forward, _ = _kernels(kind, tuple(shape), groups, eps, backend)
    y, stats = _run_forward(forward, input, weight, bias)
    if kind == "rms":
        stats = [input.new_empty(0, dtype=stats[0].dtype), *stats]
    return y, stats[0], stats[1]


@norm_op.register_fake
def _norm_fake(kind, input, weight, bias, shape, groups, eps, backend):
    acc, rows = _acc_dtype(input.dtype), _stat_shape(kind, input, shape, groups)
    return (torch.empty_like(input), input.new_empty(0 if kind == "rms" else rows, dtype=acc),
            input.new_empty(rows, dtype=acc))


@torch.library.custom_op("bnkernels::norm_backward", mutates_args=())
def norm_backward_op(kind: str, grad_out: Tensor, input: Tensor, weight: Optional[Tensor], mean: Tensor,
                     invstd: Tensor, shape: list[int], groups: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    _, backward = _kernels(kind, tuple(shape), groups, None, backend)
    return _run_backward(backward, grad_out, input, weight, [invstd] if kind == "rms" else [mean, invstd])


@norm_backward_op.register_fake
def _norm_backward_fake(kind, grad_out, input, weight, mean, invstd, shape, groups, backend):
    params = _param_shape(kind, input, shape)
    return torch.empty_like(input), invstd.new_empty(params), invstd.new_empty(params)


def _op_setup_context(ctx, inputs, output):
    kind, input, weight, bias, shape, groups, _, backend = inputs
    ctx.save_for_backward(input, weight, output[1], output[2])
    ctx.kind, ctx.shape, ctx.groups, ctx.backend, ctx.bias_dtype = kind, shape, groups, backend, _dtype(bias)


def _op_backward(ctx, grad_y, *_):
    input, weight, mean, invstd = ctx.saved_tensors
    need = ctx.needs_input_grad[1:4]
    if not any(need):
        return (None,) * 8
    grads = norm_backward_op(ctx.kind, grad_y, input, weight, mean, invstd, ctx.shape, ctx.groups, ctx.backend)
    return (None, *_wanted(grads, _dtype(weight), ctx.bias_dtype, need), None, None, None, None)


norm_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _norm(kind: str, input: Tensor, weight, bias, eps, backend: str, shape: tuple = (), groups: int = 0,
          running_mean=None, running_var=None, momentum: float = 0.1) -> Tensor:
    """The norm ``kind`` on tensors: eagerly :class:`_NormFunction`; under
    ``torch.compile`` the operator, then instance norm's running update."""
    eps = None if eps is None else float(eps)
    if not torch.compiler.is_compiling():
        forward, backward = _kernels(kind, shape, groups, eps, backend, _to_kernel(running_mean),
                                     _to_kernel(running_var), momentum)
        return _NormFunction.apply(forward, backward, input, weight, bias)
    y, mean, invstd = norm_op(kind, input, weight, bias, list(shape), int(groups), eps, backend)
    if running_mean is not None and input.shape[0] > 0:
        _update_running(running_mean, running_var, mean, invstd, eps, input[0, 0].numel(), float(momentum))
    return y


def _update_running(running_mean, running_var, mean, invstd, eps, n, momentum):
    """Instance norm's running update (as ``bnkernels.instance_norm``'s):
    the batch average of each instance's mean and unbiased variance."""
    with torch.no_grad():
        var = (invstd.double().square().reciprocal() - eps) * (n / max(n - 1, 1))
        for running, batch in ((running_mean, mean.double().mean(0)), (running_var, var.mean(0))):
            running.copy_((1 - momentum) * running.double() + momentum * batch)


def _shape(normalized_shape) -> tuple:
    """``normalized_shape`` as torch takes it (an int, a list, a
    ``torch.Size``) as a tuple of ints."""
    return (int(normalized_shape),) if isinstance(normalized_shape, int) else tuple(normalized_shape)


# --- the functions -----------------------------------------------------------

def layer_norm(input: Tensor, normalized_shape, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, *, backend: str = "auto") -> Tensor:
    """``torch.nn.functional.layer_norm`` on bnkernels, differentiable.

    Args:
        input: (*lead, *normalized_shape) CPU tensor, float16, bfloat16,
            float32 or float64, any strides.
        normalized_shape: an int, a list or a ``torch.Size``: the trailing
            dimensions normalized together.
        weight, bias: tensors of ``normalized_shape`` or None.
        eps: added to the (biased) variance.
        backend: ``"auto"``, ``"numba"`` or ``"numpy"``.

    Returns:
        y like ``input``. The statistics are exact for data far from zero.
    """
    return _norm("layer", input, weight, bias, eps, backend, _shape(normalized_shape))


def rms_norm(input: Tensor, normalized_shape, weight: Optional[Tensor] = None, eps: Optional[float] = None, *,
             backend: str = "auto") -> Tensor:
    """``torch.nn.functional.rms_norm`` on bnkernels, differentiable:
    ``y = input / sqrt(mean(input^2) + eps) * weight`` over the trailing
    ``normalized_shape``.

    Args:
        input, normalized_shape, backend: as :func:`layer_norm`.
        weight: a tensor of ``normalized_shape`` or None.
        eps: None: torch's default, ``torch.finfo(input.dtype).eps``.

    Returns:
        y like ``input``.
    """
    return _norm("rms", input, weight, None, eps, backend, _shape(normalized_shape))


def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, *, backend: str = "auto") -> Tensor:
    """``torch.nn.functional.group_norm`` on bnkernels, differentiable.

    Args:
        input: (N, C, *spatial) CPU tensor, float16, bfloat16, float32 or
            float64, any memory format (``channels_last`` stays so).
        num_groups: G, dividing C: each sample's C/G channels of a group
            are normalized together with their spatial values.
        weight, bias: (C,) tensors or None.
        eps, backend: as :func:`layer_norm`.

    Returns:
        y like ``input``.
    """
    return _norm("group", input, weight, bias, eps, backend, groups=num_groups)


def instance_norm(input: Tensor, running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                  weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5, *, backend: str = "auto") -> Tensor:
    """``torch.nn.functional.instance_norm`` on bnkernels, differentiable.

    Args:
        input: (N, C, *spatial) CPU tensor, float16, bfloat16, float32 or
            float64, any memory format; more than one spatial value when
            ``use_input_stats``.
        running_mean, running_var: (C,) tensors (float16, float32 or
            float64) or None. With ``use_input_stats`` they are updated in
            place, as torch: ``running = (1 - momentum) * running +
            momentum * batch``, ``batch`` the average over the samples of
            each instance's mean and unbiased variance.
        weight, bias: (C,) tensors or None.
        use_input_stats: normalize each (sample, channel) with its own
            statistics (True), or with the running ones (False, which needs
            both: batch-norm inference, ``bnkernels.torch.batch_norm``).
        momentum, eps: as in torch.
        backend: as :func:`layer_norm`.

    Returns:
        y like ``input``.
    """
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError("use_input_stats=False normalizes with running_mean and running_var: pass both")
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps, backend=backend)
    return _norm("instance", input, weight, bias, eps, backend, running_mean=running_mean, running_var=running_var,
                 momentum=momentum)


# --- the modules -------------------------------------------------------------

class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` on bnkernels (input (*, *normalized_shape));
    ``backend``: the bnkernels backend (class default ``"auto"``, settable
    per module)."""

    backend = "auto"

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, backend=self.backend)


class RMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm`` on bnkernels (input (*, *normalized_shape));
    ``backend`` as :class:`LayerNorm`'s."""

    backend = "auto"

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps, backend=self.backend)


class GroupNorm(nn.GroupNorm):
    """``torch.nn.GroupNorm`` on bnkernels (input (N, C, *), any memory
    format); ``backend`` as :class:`LayerNorm`'s."""

    backend = "auto"

    def forward(self, input: Tensor) -> Tensor:
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps, backend=self.backend)


class _InstanceNormForward:
    """``forward`` of torch's ``_InstanceNorm`` (torch 2.x: the same checks,
    warning and unbatched handling, in the same order), on bnkernels:
    instance statistics in training or without running statistics
    (updating them in place in training when tracked), the running ones in
    eval when tracked. ``backend`` as :class:`LayerNorm`'s."""

    backend = "auto"

    def forward(self, input: Tensor) -> Tensor:
        """input: (N, C, *spatial) or unbatched (C, *spatial); y like it."""
        self._check_input_dim(input)
        feature_dim = input.dim() - self._get_no_batch_dim()
        if input.size(feature_dim) != self.num_features:
            if self.affine:
                raise ValueError(f"expected input's size at dim={feature_dim} to match num_features"
                                 f" ({self.num_features}), but got: {input.size(feature_dim)}.")
            warnings.warn(f"input's size at dim={feature_dim} does not match num_features. You can silence this "
                          "warning by not passing in num_features, which is not used because affine=False",
                          stacklevel=2)
        if input.dim() == self._get_no_batch_dim():
            return self._bnkernels_instance_norm(input.unsqueeze(0)).squeeze(0)
        return self._bnkernels_instance_norm(input)

    def _bnkernels_instance_norm(self, input: Tensor) -> Tensor:
        return instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                             self.training or not self.track_running_stats,
                             self.momentum if self.momentum is not None else 0.0, self.eps, backend=self.backend)


class InstanceNorm1d(_InstanceNormForward, nn.InstanceNorm1d):
    """``torch.nn.InstanceNorm1d`` ((N, C, L) or (C, L)) on bnkernels."""


class InstanceNorm2d(_InstanceNormForward, nn.InstanceNorm2d):
    """``torch.nn.InstanceNorm2d`` ((N, C, H, W) or (C, H, W), any memory format) on bnkernels."""


class InstanceNorm3d(_InstanceNormForward, nn.InstanceNorm3d):
    """``torch.nn.InstanceNorm3d`` ((N, C, D, H, W) or (C, D, H, W)) on bnkernels."""


__all__ = ["GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LayerNorm", "RMSNorm", "group_norm",
           "instance_norm", "layer_norm", "rms_norm"]
