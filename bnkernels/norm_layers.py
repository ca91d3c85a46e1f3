"""NumPy-level layers of the norm family, as torch's modules: ``LayerNorm``,
``RMSNorm``, ``GroupNorm``, ``InstanceNorm`` (``forward``, then
``backward`` of the last forward; parameters ``weight``, ``bias`` and after
a backward ``grad_weight``, ``grad_bias``). Like :class:`bnkernels.BatchNorm`.
"""
from __future__ import annotations

import numpy as np

from . import validation as v
from .batch_norm import bn_backward
from .group_norm import group_norm, group_norm_backward, instance_norm, instance_norm_backward
from .layer_norm import _normalized_shape, layer_norm, layer_norm_backward, rms_norm, rms_norm_backward
from .norm_family import check_positive_int

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class _Norm:
    """What the layers share: parameters of ``param_shape`` (weight 1, bias
    0; None where absent), training mode, the last forward kept for
    ``backward``, ``state_dict``."""

    def __init__(self, param_shape, weight: bool, bias: bool, dtype, backend: str):
        dtype = np.dtype(dtype)
        if dtype not in _DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        self.dtype, self.backend, self.training = dtype, backend, True
        self.weight = np.ones(param_shape, dtype) if v.check_flag(weight, "weight") else None
        self.bias = np.zeros(param_shape, dtype) if v.check_flag(bias, "bias") and weight else None
        self.grad_weight = self.grad_bias = None
        self._saved = None

    def train(self, mode: bool = True):
        self.training = v.check_flag(mode, "mode")
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        """Normalize x; returns y like x, and keeps what :meth:`backward` needs."""
        y, saved = self._forward(x)
        self._saved = (x, saved)
        return y

    def backward(self, dy):
        """The gradient of the last forward's input; sets ``grad_weight``,
        ``grad_bias`` (None where the layer has no such parameter)."""
        if self._saved is None:
            raise RuntimeError("backward() needs a forward() first")
        x, saved = self._saved
        dx, dweight, dbias = self._backward(dy, x, saved)
        self.grad_weight = None if self.weight is None else np.asarray(dweight).astype(self.dtype)
        self.grad_bias = None if self.bias is None or dbias is None else np.asarray(dbias).astype(self.dtype)
        return dx

    def state_dict(self) -> dict:
        """Copies of the parameters (and running statistics) by torch's names."""
        names = ("weight", "bias", "running_mean", "running_var")
        return {n: getattr(self, n).copy() for n in names if getattr(self, n, None) is not None}


class LayerNorm(_Norm):
    """``torch.nn.LayerNorm``: normalizes over the trailing
    ``normalized_shape``; ``elementwise_affine`` gives a weight (and a
    ``bias``, unless ``bias=False``) of that shape."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, *, dtype=np.float32,
                 backend="auto"):
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.eps = v.check_eps(eps)
        super().__init__(self.normalized_shape, elementwise_affine, bias, dtype, backend)

    def _forward(self, x):
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, backend=self.backend,
                          return_saved=True)

    def _backward(self, dy, x, saved):
        return layer_norm_backward(dy, x, saved.mean, saved.invstd, self.normalized_shape, self.weight,
                                   backend=self.backend)


class RMSNorm(_Norm):
    """``torch.nn.RMSNorm``: ``x / sqrt(mean(x^2) + eps) * weight`` over the
    trailing ``normalized_shape`` (eps None: the dtype's machine epsilon)."""

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, *, dtype=np.float32, backend="auto"):
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.eps = None if eps is None else v.check_eps(eps)
        super().__init__(self.normalized_shape, elementwise_affine, False, dtype, backend)

    def _forward(self, x):
        return rms_norm(x, self.normalized_shape, self.weight, self.eps, backend=self.backend, return_saved=True)

    def _backward(self, dy, x, saved):
        dx, dweight = rms_norm_backward(dy, x, saved.invrms, self.normalized_shape, self.weight,
                                        backend=self.backend)
        return dx, dweight, None


class GroupNorm(_Norm):
    """``torch.nn.GroupNorm``: (N, C, *) normalized per sample over each of
    ``num_groups`` groups of channels; ``affine``: weight and bias (C,)."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, *, dtype=np.float32, backend="auto"):
        self.num_groups = check_positive_int(num_groups, "num_groups")
        self.num_channels = check_positive_int(num_channels, "num_channels")
        if self.num_channels % self.num_groups:
            raise ValueError(f"num_groups={num_groups} must divide num_channels={num_channels}")
        self.eps = v.check_eps(eps)
        super().__init__((self.num_channels,), affine, affine, dtype, backend)

    def _forward(self, x):
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, backend=self.backend,
                          return_saved=True)

    def _backward(self, dy, x, saved):
        return group_norm_backward(dy, x, saved.mean, saved.invstd, self.num_groups, self.weight,
                                   backend=self.backend)


class InstanceNorm(_Norm):
    """``torch.nn.InstanceNorm1d/2d/3d`` for (N, C, *): each sample's
    channels normalized over the spatial axes. ``affine`` (default False,
    as torch): weight and bias (C,). ``track_running_stats``: running mean
    and variance, updated in training and used in eval (each sample then
    normalized alike, and its gradient is that of constants)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False, track_running_stats=False, *,
                 dtype=np.float32, backend="auto"):
        self.num_features = check_positive_int(num_features, "num_features")
        self.eps, self.momentum = v.check_eps(eps), v.check_momentum(momentum)
        super().__init__((self.num_features,), affine, affine, dtype, backend)
        track = v.check_flag(track_running_stats, "track_running_stats")
        self.running_mean = np.zeros(self.num_features, self.dtype) if track else None
        self.running_var = np.ones(self.num_features, self.dtype) if track else None

    def _input_stats(self) -> bool:
        return self.training or self.running_mean is None

    def _forward(self, x):
        if not self._input_stats():
            y = instance_norm(x, self.weight, self.bias, running_mean=self.running_mean,
                              running_var=self.running_var, use_input_stats=False, eps=self.eps,
                              backend=self.backend)
            return y, None
        running = {} if self.running_mean is None else {"running_mean": self.running_mean,
                                                         "running_var": self.running_var}
        return instance_norm(x, self.weight, self.bias, momentum=0.1 if self.momentum is None else self.momentum,
                             eps=self.eps, backend=self.backend, return_saved=True, **running)

    def _backward(self, dy, x, saved):
        if saved is None:  # eval with running statistics: batch norm's gradient of constants
            invstd = (1.0 / np.sqrt(self.running_var.astype(np.float64) + self.eps)).astype(self.dtype)
            return bn_backward(dy, x, self.running_mean, invstd, self.weight, axis=1, training=False,
                               backend=self.backend)
        return instance_norm_backward(dy, x, saved.mean, saved.invstd, self.weight, backend=self.backend)


__all__ = ["GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm"]
