"""The operations ``bnkernels bench`` measures, each described once
(:class:`Operation`): its title, the bytes it must move, its float64
reference outputs, and how each kind of implementation runs it (the
bnkernels public API, the textbook code, torch). A new operation adds one
:class:`Operation` to :data:`OPERATIONS`; the cases, timing, checks and
reports need nothing else."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..reference import reference_backward, reference_forward

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
    ``default``: measured when ``--ops`` is not given.
    """

    name: str
    title: str
    bytes_factor: int
    reference: Callable[[Any], tuple]
    bnkernels: Callable[..., Runner]
    textbook: Callable[..., Runner]
    torch: Callable[..., Runner]
    default: bool = True


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
    xp = _xp(x)
    axes = _axes(x, axis)
    n = x.size // x.shape[axis]
    xmu = x - mean
    std_inv = 1.0 / xp.sqrt(var + eps)
    xhat = xmu * std_inv
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * xhat).sum(axis=axes)
    dxhat = dy * gamma.reshape(_bshape(x, axis))
    dvar = (dxhat * xmu).sum(axis=axes, keepdims=True) * -0.5 * std_inv**3
    dmean = (-dxhat * std_inv).sum(axis=axes, keepdims=True) + dvar * (-2.0 * xmu).mean(axis=axes,
                                                                                      keepdims=True)
    dx = dxhat * std_inv + dvar * 2.0 * xmu / n + dmean / n
    return dx, dgamma, dbeta


def _quiet(fn: Runner) -> Runner:
    """``fn`` with NumPy floating-point warnings off (textbook float16 sums
    overflow; that shows as a WRONG result, not as a warning)."""
    def run():
        with np.errstate(all="ignore"):
            return fn()
    return run


def _textbook_params(inp, to_dev):
    """Parameters in the activations' dtype, as a tutorial model holds them."""
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
    from .ops import Unsupported

    try:
        import torch
        from .. import torch as bnkernels_torch
    except ImportError as exc:
        raise Unsupported(f"bnkernels.torch needs torch ({exc})") from None
    cls = _torch_class(inp.x.ndim, bnkernels_torch)
    if cls is None or out is not None:
        raise Unsupported("torch's batch norm layers take 2-D to 5-D input, and no out=")

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
    from .ops import Unsupported

    raise Unsupported("the textbook code has no torch module")


def _module_torch(inp, tensor, F):
    import torch

    cls = _torch_class(inp.x.ndim, torch.nn)
    if cls is None:
        from .ops import Unsupported

        raise Unsupported("torch's batch norm layers take 2-D to 5-D input")
    return _module_step(cls, inp, tensor)


#: Every operation, in the order they are reported. The bytes are those of
#: a two-pass method (``ops.BYTES_MODEL``).
OPERATIONS = {op.name: op for op in (
    Operation("train", "training forward", 3, _train_reference, _train_bnkernels, _train_textbook, _train_torch),
    Operation("infer", "inference forward", 2, _infer_reference, _infer_bnkernels, _infer_textbook, _infer_torch),
    Operation("backward", "backward", 5, _backward_reference, _backward_bnkernels, _backward_textbook,
              _backward_torch),
    Operation("train-add-relu", "training forward + residual + ReLU", 4, _add_relu_reference,
              _add_relu_bnkernels, _add_relu_textbook, _add_relu_torch),
    Operation("torch-module", "training step of a torch BatchNorm layer (forward + backward, autograd)", 8,
              _backward_reference, _module_bnkernels, _module_textbook, _module_torch, default=False),
)}

__all__ = ["OPERATIONS", "Operation", "Runner", "textbook_backward", "textbook_forward_infer",
           "textbook_forward_train"]
