"""The operations ``bnkernels bench`` measures, each described once
(:class:`Operation`): its title, the bytes it must move, its float64
reference outputs, and how each kind of implementation runs it (the
bnkernels public API, the textbook code, torch). A new operation adds one
:class:`Operation` to :data:`OPERATIONS`; the cases, timing, checks and
reports need nothing else. The batch-norm operations come first; the
norm family (layer, RMS, group and instance norm, forward and backward)
after them, each measured on its own named shapes (``Operation.cases``)."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..group_norm import group_norm, group_norm_backward, instance_norm, instance_norm_backward
from ..layer_norm import layer_norm, layer_norm_backward, rms_norm, rms_norm_backward
from ..reference import (
    reference_backward, reference_forward, reference_group_norm, reference_group_norm_backward,
    reference_instance_norm, reference_instance_norm_backward, reference_layer_norm, reference_layer_norm_backward,
)

Runner = Callable[[], Sequence[Any]]


@dataclass(frozen=True)
class Operation:
    """One measured operation.

    ``bytes_factor``: the minimum traffic in units of ``x.nbytes``;
    ``reference(inputs)``: the float64 outputs, in the order the runners
    return theirs. Each runner factory takes host ``Inputs`` and device
    arrays made by ``to_dev`` and returns a zero-argument callable that runs
    the operation once: ``bnkernels(inputs, to_dev, backend, out)`` through
    the public functions (``out``: a preallocated result or None);
    ``textbook(inputs, to_dev)`` as tutorials write it (NumPy or CuPy);
    ``torch(inputs, tensor, F)`` with ``torch.nn.functional`` (``tensor``:
    host array to tensor on the device; backward through autograd).
    ``default``: measured when ``--ops`` is not given. ``cases``: the names
    of the named shapes (``ops.NAMED_CASES``) it is measured on when none
    are given, and that belong to it (``ops.ops_for``); empty: the
    batch-norm ones (``ops.DEFAULT_CASES``). ``out``: whether the bnkernels
    runner takes a preallocated ``out`` (the ``<backend>+out`` rows; where
    not, those rows are unsupported).
    """

    name: str
    title: str
    bytes_factor: int
    reference: Callable[[Any], tuple]
    bnkernels: Callable[..., Runner]
    textbook: Callable[..., Runner]
    torch: Callable[..., Runner]
    default: bool = True
    cases: tuple[str, ...] = ()
    out: bool = True


# --- the textbook code -------------------------------------------------------

def _bshape(x, axis):
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return shape


def _axes(x, axis):
    axis %= x.ndim
    return tuple(i for i in range(x.ndim) if i != axis)


def _xp(a):
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def textbook_forward_train(x, gamma, beta, axis=1, eps=1e-5):
    """Training forward as tutorials write it: ``x.mean``, ``x.var`` and
    broadcasting (NumPy or CuPy arrays). Returns ``(y, mean, var)``
    (statistics with kept dims)."""
    xp = _xp(x)
    axes = _axes(x, axis)
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    y = (x - mean) / xp.sqrt(var + eps) * gamma.reshape(_bshape(x, axis)) + beta.reshape(_bshape(x, axis))
    return y, mean, var


def textbook_forward_infer(x, running_mean, running_var, gamma, beta, axis=1, eps=1e-5):
    """Inference forward as tutorials write it, from running statistics."""
    xp = _xp(x)
    bs = _bshape(x, axis)
    return ((x - running_mean.reshape(bs)) / xp.sqrt(running_var.reshape(bs) + eps)
            * gamma.reshape(bs) + beta.reshape(bs))


def textbook_backward(dy, x, mean, var, gamma, axis=1, eps=1e-5):
    """Backward as tutorials write it out, step by step through mean and var
    (the staged computational-graph derivation). ``mean``, ``var``: the
    forward's statistics with kept dims. Returns ``(dx, dgamma, dbeta)``."""
    axes = _axes(x, axis)
    return _staged_backward(dy, x, mean, var, gamma.reshape(_bshape(x, axis)), axes, axes, eps)


def _staged_backward(dy, x, mean, var, scale, stat_axes, param_axes, eps):
    """The staged derivation of a normalization's backward: ``mean``, ``var``
    over ``stat_axes`` (kept dims), ``scale`` the weight broadcast against
    x; dgamma and dbeta summed over ``param_axes``."""
    xp = _xp(x)
    n = math.prod(x.shape[a] for a in stat_axes)
    xmu = x - mean
    std_inv = 1.0 / xp.sqrt(var + eps)
    xhat = xmu * std_inv
    dbeta = dy.sum(axis=param_axes)
    dgamma = (dy * xhat).sum(axis=param_axes)
    dxhat = dy * scale
    dvar = (dxhat * xmu).sum(axis=stat_axes, keepdims=True) * -0.5 * std_inv**3
    dmean = (-dxhat * std_inv).sum(axis=stat_axes, keepdims=True) + dvar * (-2.0 * xmu).mean(axis=stat_axes,
                                                                                           keepdims=True)
    dx = dxhat * std_inv + dvar * 2.0 * xmu / n + dmean / n
    return dx, dgamma, dbeta


def textbook_layer_norm(x, gamma, beta, eps=1e-5):
    """Layer norm over the last axis as tutorials write it: ``(y, mean,
    var)`` (statistics with kept dims)."""
    xp = _xp(x)
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mean) / xp.sqrt(var + eps) * gamma + beta, mean, var


def textbook_layer_norm_backward(dy, x, mean, var, gamma, eps=1e-5):
    """Layer norm's backward by hand, the staged derivation over the last
    axis: ``(dx, dgamma, dbeta)``."""
    lead = tuple(range(x.ndim - 1))
    return _staged_backward(dy, x, mean, var, gamma, (x.ndim - 1,), lead, eps)


def textbook_rms_norm(x, gamma, eps=1e-5):
    """RMS norm over the last axis as tutorials write it: ``(y, ms)``, the
    mean square with kept dims."""
    xp = _xp(x)
    ms = (x * x).mean(axis=-1, keepdims=True)
    return x / xp.sqrt(ms + eps) * gamma, ms


def textbook_rms_norm_backward(dy, x, ms, gamma, eps=1e-5):
    """RMS norm's backward by hand, through ``r = 1 / sqrt(ms + eps)`` and
    the mean square: ``(dx, dgamma)``."""
    xp = _xp(x)
    r = 1.0 / xp.sqrt(ms + eps)
    dgamma = (dy * x * r).sum(axis=tuple(range(x.ndim - 1)))
    dxhat = dy * gamma
    dms = (dxhat * x).sum(axis=-1, keepdims=True) * -0.5 * r**3
    return dxhat * r + dms * 2.0 * x / x.shape[-1], dgamma


def _grouped(a, groups):
    """(N, C, *spatial) viewed (N, G, C/G, prod(spatial))."""
    return a.reshape(a.shape[0], groups, a.shape[1] // groups, -1)


def textbook_group_norm(x, groups, gamma, beta, eps=1e-5):
    """Group norm of (N, C, *spatial) as tutorials write it (Wu and He's
    code): x viewed (N, G, C/G, -1), mean and var of each group, then the
    per-channel affine. Returns ``(y, mean, var)``, the statistics of that
    view with kept dims. With G = C: instance norm."""
    xp = _xp(x)
    xg = _grouped(x, groups)
    mean = xg.mean(axis=(2, 3), keepdims=True)
    var = xg.var(axis=(2, 3), keepdims=True)
    bs = _bshape(x, 1)
    return ((xg - mean) / xp.sqrt(var + eps)).reshape(x.shape) * gamma.reshape(bs) + beta.reshape(bs), mean, var


def textbook_group_norm_backward(dy, x, mean, var, groups, gamma, eps=1e-5):
    """Group norm's backward by hand, the staged derivation over each group:
    ``(dx, dgamma, dbeta)``."""
    dx, dgamma, dbeta = _staged_backward(_grouped(dy, groups), _grouped(x, groups), mean, var,
                                         gamma.reshape(1, groups, -1, 1), (2, 3), (0, 3), eps)
    return dx.reshape(x.shape), dgamma.reshape(-1), dbeta.reshape(-1)


def _quiet(fn: Runner) -> Runner:
    """``fn`` with NumPy floating-point warnings off (textbook float16 sums
    overflow; that shows as a WRONG result, not as a warning)."""
    def run():
        with np.errstate(all="ignore"):
            return fn()
    return run


def _refuse(message: str):
    """Raise ``ops.Unsupported(message)``: the op does not run on this case
    or implementation (a row shown as unsupported, not an error)."""
    from .ops import Unsupported

    raise Unsupported(message)


def _textbook_params(inp, to_dev):
    """Parameters in the activations' dtype, as a tutorial model holds them
    (and torch's norm-family rows: a model cast to the dtype)."""
    return to_dev(inp.gamma.astype(inp.x.dtype)), to_dev(inp.beta.astype(inp.x.dtype))


def _torch_params(inp, tensor):
    """torch takes half input with float32 parameters (mixed precision);
    otherwise parameters must match the input dtype."""
    pdt = np.float32 if inp.x.dtype.itemsize == 2 else inp.x.dtype  # float16, bfloat16
    return pdt, tensor(inp.gamma.astype(pdt)), tensor(inp.beta.astype(pdt))


# --- batch norm: training forward, inference forward, backward ----------------

def _train_reference(inp):
    return (reference_forward(inp.x, inp.gamma, inp.beta, axis=inp.axis, eps=inp.eps)[0],)


def _train_bnkernels(inp, to_dev, backend, out):
    from ..batch_norm import bn_forward

    x, g, b = to_dev(inp.x), to_dev(inp.gamma), to_dev(inp.beta)
    return lambda: (bn_forward(x, g, b, axis=inp.axis, eps=inp.eps, backend=backend, out=out),)


def _train_textbook(inp, to_dev):
    x, (gamma, beta) = to_dev(inp.x), _textbook_params(inp, to_dev)
    return _quiet(lambda: (textbook_forward_train(x, gamma, beta, inp.axis, inp.eps)[0],))


def _train_torch(inp, tensor, F):
    _, w, b = _torch_params(inp, tensor)
    xv = tensor(inp.x).movedim(inp.axis, 1)
    return lambda: (F.batch_norm(xv, None, None, w, b, training=True, eps=inp.eps).movedim(1, inp.axis),)


def _infer_reference(inp):
    return (reference_forward(inp.x, inp.gamma, inp.beta, inp.running_mean, inp.running_var, training=False,
                              axis=inp.axis, eps=inp.eps)[0],)


def _infer_bnkernels(inp, to_dev, backend, out):
    from ..batch_norm import bn_forward

    x, g, b = to_dev(inp.x), to_dev(inp.gamma), to_dev(inp.beta)
    rm, rv = to_dev(inp.running_mean), to_dev(inp.running_var)
    return lambda: (bn_forward(x, g, b, rm, rv, training=False, axis=inp.axis, eps=inp.eps, backend=backend,
                               out=out),)


def _infer_textbook(inp, to_dev):
    x, (gamma, beta) = to_dev(inp.x), _textbook_params(inp, to_dev)
    rm = to_dev(inp.running_mean.astype(inp.x.dtype))
    rv = to_dev(inp.running_var.astype(inp.x.dtype))
    return _quiet(lambda: (textbook_forward_infer(x, rm, rv, gamma, beta, inp.axis, inp.eps),))


def _infer_torch(inp, tensor, F):
    pdt, w, b = _torch_params(inp, tensor)
    xv = tensor(inp.x).movedim(inp.axis, 1)
    rm, rv = tensor(inp.running_mean.astype(pdt)), tensor(inp.running_var.astype(pdt))
    return lambda: (F.batch_norm(xv, rm, rv, w, b, training=False, eps=inp.eps).movedim(1, inp.axis),)


def _backward_reference(inp):
    _, mean, invstd, _, _ = reference_forward(inp.x, inp.gamma, inp.beta, axis=inp.axis, eps=inp.eps)
    return reference_backward(inp.dy, inp.x, mean, invstd, inp.gamma, axis=inp.axis)


def _backward_bnkernels(inp, to_dev, backend, out):
    from ..batch_norm import bn_backward, bn_forward

    x, dy, g, b = to_dev(inp.x), to_dev(inp.dy), to_dev(inp.gamma), to_dev(inp.beta)
    _, saved = bn_forward(x, g, b, axis=inp.axis, eps=inp.eps, backend=backend, return_saved=True)
    return lambda: bn_backward(dy, x, saved.mean, saved.invstd, g, axis=inp.axis, backend=backend, out=out)


def _backward_textbook(inp, to_dev):
    x, dy, (gamma, beta) = to_dev(inp.x), to_dev(inp.dy), _textbook_params(inp, to_dev)
    with np.errstate(all="ignore"):
        _, mean, var = textbook_forward_train(x, gamma, beta, inp.axis, inp.eps)
    return _quiet(lambda: textbook_backward(dy, x, mean, var, gamma, inp.axis, inp.eps))


def _backward_torch(inp, tensor, F):
    import torch

    _, w, b = _torch_params(inp, tensor)
    xt = tensor(inp.x)
    for t in (xt, w, b):
        t.requires_grad_(True)
    y = F.batch_norm(xt.movedim(inp.axis, 1), None, None, w, b, training=True, eps=inp.eps)
    dyt = tensor(inp.dy).movedim(inp.axis, 1)
    return lambda: torch.autograd.grad(y, (xt, w, b), dyt, retain_graph=True)


# --- training forward with a residual and ReLU: relu(bn(x) + z) ------------------
# z is the case's dy array (same shape and dtype as x, other values)

def _add_relu_reference(inp):
    return (reference_forward(inp.x, inp.gamma, inp.beta, axis=inp.axis, eps=inp.eps, activation="relu",
                              residual=inp.dy)[0],)


def _add_relu_bnkernels(inp, to_dev, backend, out):
    from ..batch_norm import bn_forward

    x, z, g, b = to_dev(inp.x), to_dev(inp.dy), to_dev(inp.gamma), to_dev(inp.beta)
    return lambda: (bn_forward(x, g, b, axis=inp.axis, eps=inp.eps, activation="relu", residual=z,
                               backend=backend, out=out),)


def _add_relu_textbook(inp, to_dev):
    x, z, (gamma, beta) = to_dev(inp.x), to_dev(inp.dy), _textbook_params(inp, to_dev)
    xp = _xp(x)
    return _quiet(lambda: (xp.maximum(textbook_forward_train(x, gamma, beta, inp.axis, inp.eps)[0] + z, 0),))


def _add_relu_torch(inp, tensor, F):
    _, w, b = _torch_params(inp, tensor)
    xv, zv = tensor(inp.x).movedim(inp.axis, 1), tensor(inp.dy).movedim(inp.axis, 1)
    return lambda: (F.relu(F.batch_norm(xv, None, None, w, b, training=True, eps=inp.eps) + zv).movedim(
        1, inp.axis),)


# --- a training step of one layer through autograd: torch's module, bnkernels' drop-in ---
# Forward then backward (dy: the case's dy) of nn.BatchNorm{1,2,3}d and of
# bnkernels.torch's drop-in, the same tensors: what the integration costs
# beside the plain calls (the "train" and "backward" rows of the same
# backend in the same run).

def _module_step(module, inp, tensor):
    """The step's runner: ``(dx, dweight, dbias)`` of ``module`` (a fresh
    torch batch norm class of x's rank) on x and dy as tensors, channels
    at dim 1 (a view: NHWC is channels_last)."""
    import torch

    pdt = torch.float64 if inp.x.dtype == np.float64 else torch.float32  # half data: float32 parameters
    xt, dyt = tensor(inp.x), tensor(inp.dy)
    layer = module(inp.x.shape[inp.axis], eps=inp.eps).to(device=xt.device, dtype=pdt)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(inp.gamma.astype(np.float64)))
        layer.bias.copy_(torch.from_numpy(inp.beta.astype(np.float64)))
    xt.requires_grad_(True)
    xv, dyv = xt.movedim(inp.axis, 1), dyt.movedim(inp.axis, 1)
    params = (xt, layer.weight, layer.bias)
    return lambda: torch.autograd.grad(layer(xv), params, dyv)


def _torch_class(ndim: int, namespace):
    return {2: namespace.BatchNorm1d, 3: namespace.BatchNorm1d, 4: namespace.BatchNorm2d,
            5: namespace.BatchNorm3d}.get(ndim)


def _module_bnkernels(inp, to_dev, backend, out):
    try:
        import torch
        from .. import torch as bnkernels_torch
    except ImportError as exc:
        _refuse(f"bnkernels.torch needs torch ({exc})")
    cls = _torch_class(inp.x.ndim, bnkernels_torch)
    if cls is None or out is not None:
        _refuse("torch's batch norm layers take 2-D to 5-D input, and no out=")

    def tensor(a):  # the backend's device array (CuPy on the GPU) or host array, as a tensor of its memory
        d = to_dev(a)
        if not isinstance(d, torch.Tensor) and hasattr(d, "__cuda_array_interface__"):
            return torch.as_tensor(d, device="cuda")
        return bnkernels_torch.ops.to_tensor(d)

    def module(*args, **kwargs):
        layer = cls(*args, **kwargs)
        layer.backend = backend
        return layer

    return _module_step(module, inp, tensor)


def _module_textbook(inp, to_dev):
    _refuse("the textbook code has no torch module")


def _module_torch(inp, tensor, F):
    import torch

    cls = _torch_class(inp.x.ndim, torch.nn)
    if cls is None:
        _refuse("torch's batch norm layers take 2-D to 5-D input")
    return _module_step(cls, inp, tensor)


# --- the norm family: layer, RMS, group (G = 32) and instance norm -------------------
# Layer and RMS norm normalize each row over the last axis, the case's channel
# axis (weights of its size); group and instance norm take (N, C, *spatial)
# with the channels at axis 1 (weights per channel), instance norm with each
# instance's own statistics (no running statistics). One class a norm says
# how the reference, bnkernels, the textbook code and torch compute it; the
# runner factories below are shared. Forward: (y,); backward: (dx, dweight,
# dbias), RMS norm (dx, dweight). bnkernels takes the float32 parameters;
# torch and the textbook code take them in x's dtype (a model cast to it:
# torch's rms_norm warns and leaves its fused path on mixed dtypes).

#: The groups of the group-norm ops (GroupNorm(32, C), as in Wu and He).
GROUPS = 32


class _LayerNorm:
    """Layer norm of the rows over the last axis; ``shape``: its
    ``normalized_shape``."""

    name, title, bias = "layer-norm", "layer norm over the last axis", True
    cases = ("ln-8192x1024", "ln-4096x4096", "ln-16x512x768")

    @staticmethod
    def shape(inp):
        return (inp.x.shape[-1],)

    def layout(self, inp):
        if inp.axis % inp.x.ndim != inp.x.ndim - 1:
            _refuse(f"{self.name} normalizes the last axis: give the shape with its channel axis last "
                    f"(SHAPE@-1)")

    def reference(self, inp):
        return reference_layer_norm(inp.x, self.shape(inp), inp.gamma, inp.beta, inp.eps)

    def reference_backward(self, inp, mean, invstd):
        return reference_layer_norm_backward(inp.dy, inp.x, mean, invstd, self.shape(inp), inp.gamma)

    def forward(self, x, w, b, inp, **kw):
        return layer_norm(x, self.shape(inp), w, b, inp.eps, **kw)

    def backward(self, dy, x, saved, w, inp, backend):
        return layer_norm_backward(dy, x, saved.mean, saved.invstd, self.shape(inp), w, backend=backend)

    def textbook(self, x, w, b, inp):
        return textbook_layer_norm(x, w, b, inp.eps)

    def textbook_backward(self, dy, x, stats, w, inp):
        return textbook_layer_norm_backward(dy, x, *stats, w, inp.eps)

    def torch(self, F, x, w, b, inp):
        return F.layer_norm(x, self.shape(inp), w, b, inp.eps)


class _RMSNorm(_LayerNorm):
    """RMS norm over the last axis (weight, no bias), the same shapes."""

    name, title, bias = "rms-norm", "RMS norm over the last axis", False

    def reference(self, inp):
        return reference_layer_norm(inp.x, self.shape(inp), inp.gamma, None, inp.eps, rms=True)

    def reference_backward(self, inp, mean, invstd):
        return reference_layer_norm_backward(inp.dy, inp.x, None, invstd, self.shape(inp), inp.gamma, rms=True)[:2]

    def forward(self, x, w, b, inp, **kw):
        return rms_norm(x, self.shape(inp), w, inp.eps, **kw)

    def backward(self, dy, x, saved, w, inp, backend):
        return rms_norm_backward(dy, x, saved.invrms, self.shape(inp), w, backend=backend)

    def textbook(self, x, w, b, inp):
        return textbook_rms_norm(x, w, inp.eps)

    def textbook_backward(self, dy, x, stats, w, inp):
        return textbook_rms_norm_backward(dy, x, *stats, w, inp.eps)

    def torch(self, F, x, w, b, inp):
        return F.rms_norm(x, self.shape(inp), w, inp.eps)


class _GroupNorm:
    """Group norm of (N, C, *spatial), :data:`GROUPS` groups; ``groups``:
    those of the textbook code's view."""

    name, title, bias = "group-norm", f"group norm, G = {GROUPS}", True
    cases = ("gn-resnet",)

    def groups(self, inp):
        return GROUPS

    def layout(self, inp):
        if inp.axis % inp.x.ndim != 1 or inp.x.ndim < 3:
            _refuse(f"{self.name} takes (N, C, *spatial) with the channels at axis 1")
        if inp.x.shape[1] % self.groups(inp):
            _refuse(f"{self.name} needs C divisible by G = {GROUPS}, got C = {inp.x.shape[1]}")

    def reference(self, inp):
        return reference_group_norm(inp.x, GROUPS, inp.gamma, inp.beta, inp.eps)

    def reference_backward(self, inp, mean, invstd):
        return reference_group_norm_backward(inp.dy, inp.x, mean, invstd, GROUPS, inp.gamma)

    def forward(self, x, w, b, inp, **kw):
        return group_norm(x, GROUPS, w, b, inp.eps, **kw)

    def backward(self, dy, x, saved, w, inp, backend):
        return group_norm_backward(dy, x, saved.mean, saved.invstd, GROUPS, w, backend=backend)

    def textbook(self, x, w, b, inp):
        return textbook_group_norm(x, self.groups(inp), w, b, inp.eps)

    def textbook_backward(self, dy, x, stats, w, inp):
        return textbook_group_norm_backward(dy, x, *stats, self.groups(inp), w, inp.eps)

    def torch(self, F, x, w, b, inp):
        return F.group_norm(x, GROUPS, w, b, inp.eps)


class _InstanceNorm(_GroupNorm):
    """The textbook code: group norm with one channel a group."""

    name, title = "instance-norm", "instance norm (each instance's own statistics)"
    cases = ("in-128",)

    def groups(self, inp):
        return inp.x.shape[1]

    def reference(self, inp):
        return reference_instance_norm(inp.x, inp.gamma, inp.beta, inp.eps)[:3]

    def reference_backward(self, inp, mean, invstd):
        return reference_instance_norm_backward(inp.dy, inp.x, mean, invstd, inp.gamma)

    def forward(self, x, w, b, inp, **kw):
        return instance_norm(x, w, b, eps=inp.eps, **kw)

    def backward(self, dy, x, saved, w, inp, backend):
        return instance_norm_backward(dy, x, saved.mean, saved.invstd, w, backend=backend)

    def torch(self, F, x, w, b, inp):
        return F.instance_norm(x, weight=w, bias=b, use_input_stats=True, eps=inp.eps)


def _norm_inputs(norm, inp, to_dev, backend):
    """x, dy, weight, bias on the device, once the case's layout and the
    backend's kernels are checked (the GPU backends have none for the norm
    family yet: unsupported)."""
    from ..norm_family import backend_for

    norm.layout(inp)
    x = to_dev(inp.x)
    try:
        backend_for(backend, x)
    except NotImplementedError as exc:
        _refuse(str(exc))
    return x, to_dev(inp.dy), to_dev(inp.gamma), to_dev(inp.beta)


def _norm_reference(norm, inp):
    return (norm.reference(inp)[0],)


def _norm_bnkernels(norm, inp, to_dev, backend, out):
    x, _, w, b = _norm_inputs(norm, inp, to_dev, backend)
    return lambda: (norm.forward(x, w, b, inp, backend=backend, out=out),)


def _norm_textbook(norm, inp, to_dev):
    norm.layout(inp)
    x, (w, b) = to_dev(inp.x), _textbook_params(inp, to_dev)
    return _quiet(lambda: (norm.textbook(x, w, b, inp)[0],))


def _norm_torch(norm, inp, tensor, F):
    norm.layout(inp)
    xt, (w, b) = tensor(inp.x), _textbook_params(inp, tensor)
    return lambda: (norm.torch(F, xt, w, b, inp),)


def _norm_backward_reference(norm, inp):
    _, mean, invstd = norm.reference(inp)
    return norm.reference_backward(inp, mean, invstd)


def _norm_backward_bnkernels(norm, inp, to_dev, backend, out):
    if out is not None:
        _refuse(f"{norm.name}'s backward takes no out=")
    x, dy, w, b = _norm_inputs(norm, inp, to_dev, backend)
    _, saved = norm.forward(x, w, b, inp, backend=backend, return_saved=True)
    return lambda: norm.backward(dy, x, saved, w, inp, backend)


def _norm_backward_textbook(norm, inp, to_dev):
    norm.layout(inp)
    x, dy, (w, b) = to_dev(inp.x), to_dev(inp.dy), _textbook_params(inp, to_dev)
    with np.errstate(all="ignore"):
        stats = norm.textbook(x, w, b, inp)[1:]
    return _quiet(lambda: norm.textbook_backward(dy, x, stats, w, inp))


def _norm_backward_torch(norm, inp, tensor, F):
    import torch

    norm.layout(inp)
    xt, (w, b) = tensor(inp.x), _textbook_params(inp, tensor)
    wrt = (xt, w, b) if norm.bias else (xt, w)
    for t in wrt:
        t.requires_grad_(True)
    y = norm.torch(F, xt, w, b, inp)
    dyt = tensor(inp.dy)
    return lambda: torch.autograd.grad(y, wrt, dyt, retain_graph=True)


def _norm_operations(norm) -> tuple[Operation, Operation]:
    """The forward and backward :class:`Operation` of a norm, run only when
    named, on its own named shapes."""
    def make(name, title, factor, *runners, out=True):
        return Operation(name, title, factor, *(functools.partial(r, norm) for r in runners), default=False,
                         cases=norm.cases, out=out)

    return (make(norm.name, norm.title, 2, _norm_reference, _norm_bnkernels, _norm_textbook, _norm_torch),
            make(f"{norm.name}-backward", f"{norm.title}, backward", 3, _norm_backward_reference,
                 _norm_backward_bnkernels, _norm_backward_textbook, _norm_backward_torch, out=False))


#: Every operation, in the order they are reported. The bytes are those of
#: a two-pass method for batch norm, of one pass over x (each row in cache)
#: for the norm family (``ops.BYTES_MODEL``).
OPERATIONS = {op.name: op for op in (
    Operation("train", "training forward", 3, _train_reference, _train_bnkernels, _train_textbook, _train_torch),
    Operation("infer", "inference forward", 2, _infer_reference, _infer_bnkernels, _infer_textbook, _infer_torch),
    Operation("backward", "backward", 5, _backward_reference, _backward_bnkernels, _backward_textbook,
              _backward_torch),
    Operation("train-add-relu", "training forward + residual + ReLU", 4, _add_relu_reference,
              _add_relu_bnkernels, _add_relu_textbook, _add_relu_torch),
    Operation("torch-module", "training step of a torch BatchNorm layer (forward + backward, autograd)", 8,
              _backward_reference, _module_bnkernels, _module_textbook, _module_torch, default=False, out=False),
    *(op for norm in (_LayerNorm(), _RMSNorm(), _GroupNorm(), _InstanceNorm()) for op in _norm_operations(norm)),
)}

__all__ = ["GROUPS", "OPERATIONS", "Operation", "Runner", "textbook_backward", "textbook_forward_infer",
           "textbook_forward_train", "textbook_group_norm", "textbook_group_norm_backward", "textbook_layer_norm",
           "textbook_layer_norm_backward", "textbook_rms_norm", "textbook_rms_norm_backward"]
