"""bnkernels' batch norm as torch custom operators (``torch.library``).

Two operators in the ``bnkernels`` namespace, each with a fake (meta)
kernel, so that ``torch.compile(fullgraph=True)`` and ``torch.export``
trace through them, and an autograd formula tying the two together:

``torch.ops.bnkernels.batch_norm(input, weight, bias, running_mean,
running_var, training, momentum, eps, axis, backend) -> (y, save_mean,
save_invstd, new_running_mean, new_running_var)``
    ``bnkernels.bn_forward``, functional: torch registers autograd
    formulas only for operators that mutate nothing, so the updated
    running statistics are outputs (empty where nothing is updated:
    inference, or none given) and :func:`batch_norm` copies them into the
    buffers (C values; ``torch.compile`` traces the copy as torch's own
    functional batch norm's). ``save_mean`` and ``save_invstd`` are (C,),
    float32 (float64 for float64 input): the batch's statistics in
    training, those of the running statistics in inference (what the
    backward of either needs).

``torch.ops.bnkernels.batch_norm_backward(grad_out, input, weight,
save_mean, save_invstd, training, axis, backend) -> (grad_input,
grad_weight, grad_bias)``
    ``bnkernels.bn_backward``: the gradient of the training forward, or of
    the inference forward with the running statistics held constant.
    grad_weight/grad_bias have the weight's dtype (the saved statistics'
    dtype when there is no weight).

Tensors reach the kernels without a copy: CPU tensors as NumPy views (a
bfloat16 one through its int16 bits), CUDA tensors as they are, run by a
GPU backend on torch's current stream. Results keep the input's memory
format (``channels_last`` stays ``channels_last``): where a backend's
result is laid out otherwise than ``torch.empty_like(input)`` (a
non-dense input), it is copied into such a tensor, so that the real and
the fake kernels agree on strides.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..batch_norm import bn_backward, bn_forward
from ..validation import host_array, is_bfloat16

Tensor = torch.Tensor


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the saved statistics for data of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _to_kernel(t: Optional[Tensor]):
    """What bnkernels gets for a tensor: a CUDA tensor itself, a CPU one as
    ``validation.host_array`` views it (NumPy, the same memory, bfloat16
    through its bits: in-place updates reach the tensor)."""
    if t is None:
        return None
    t = t.detach()
    return t if t.is_cuda else host_array(t)


def to_tensor(a) -> Tensor:
    """A bnkernels result (or a host array) as a torch tensor, without a
    copy: a tensor as it is, a NumPy array (ml_dtypes' bfloat16 through its
    bits) by ``torch.from_numpy``."""
    if isinstance(a, Tensor):
        return a
    a = np.asarray(a)
    if is_bfloat16(a.dtype):
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _like_input(result: Tensor, input: Tensor) -> Tensor:
    """``result`` laid out as ``torch.empty_like(input)`` (what the fake
    kernels say): as it is when it already is (contiguous and
    channels_last inputs: always), else copied into such a tensor."""
    if result.numel() == 0:  # (an empty result may have any strides, zeros included: no format of its own)
        return torch.empty_like(input)
    if result.stride() == input.stride() or result.numel() == 1:  # (a dense input's empty_like has its strides)
        return result
    target = torch.empty_like(input)
    return result if result.stride() == target.stride() else target.copy_(result)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _channels(input: Tensor, axis: int) -> int:
    return input.shape[axis] if input.dim() > 0 else 0


def _updated(running: Optional[Tensor], training: bool) -> Optional[Tensor]:
    """The tensor the kernels update in place for a running statistic:
    a copy (the operator mutates none of its arguments), or None."""
    return running.clone() if training and running is not None else None


def _forward(input, weight, bias, running_mean, running_var, training, momentum, eps, axis, backend, comm=None):
    """bn_forward on tensors: ``(y, save_mean, save_invstd)``, y laid out as
    ``torch.empty_like(input)``; the running statistics given are updated
    in place in training. ``comm``: synchronized over its ranks (the
    statistics of every rank's batch; ``bnkernels.distributed``)."""
    y, saved = bn_forward(_to_kernel(input), _to_kernel(weight), _to_kernel(bias), _to_kernel(running_mean),
                          _to_kernel(running_var), training=training, momentum=momentum, eps=eps, axis=axis,
                          backend=backend, return_saved=True, comm=comm)
    acc = _acc_dtype(input.dtype)
    return _like_input(to_tensor(y), input), _cast(to_tensor(saved.mean), acc), _cast(to_tensor(saved.invstd), acc)


def _backward(grad_out, input, weight, save_mean, save_invstd, training, axis, backend, comm=None):
    """bn_backward on tensors: ``(grad_input, grad_weight, grad_bias)``,
    the parameter gradients in the weight's dtype (else the statistics').
    ``comm``: the forward's; one all-reduce, grad_input of the global
    normalization, grad_weight/grad_bias this rank's share (sum them over
    the ranks, as data-parallel training does)."""
    dx, dgamma, dbeta = bn_backward(_to_kernel(grad_out), _to_kernel(input), _to_kernel(save_mean),
                                    _to_kernel(save_invstd), _to_kernel(weight), axis=axis, training=training,
                                    backend=backend, comm=comm)
    dtype = save_mean.dtype if weight is None else weight.dtype
    return _like_input(to_tensor(dx), input), _cast(to_tensor(dgamma), dtype), _cast(to_tensor(dbeta), dtype)


@torch.library.custom_op("bnkernels::batch_norm", mutates_args=())
def batch_norm_op(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
                  momentum: float, eps: float, axis: int,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    new_mean, new_var = _updated(running_mean, training), _updated(running_var, training)
    stats = (new_mean, new_var) if training else (running_mean, running_var)
    y, mean, invstd = _forward(input, weight, bias, *stats, training, momentum, eps, axis, backend)
    acc = mean.dtype
    return (y, mean, invstd,
            input.new_empty(0, dtype=acc) if new_mean is None else new_mean,  # (outputs must not alias)
            input.new_empty(0, dtype=acc) if new_var is None else new_var)


@batch_norm_op.register_fake
def _batch_norm_fake(input, weight, bias, running_mean, running_var, training, momentum, eps, axis, backend):
    acc, channels = _acc_dtype(input.dtype), _channels(input, axis)

    def updated(running):
        return torch.empty_like(running) if training and running is not None else input.new_empty(0, dtype=acc)

    return (torch.empty_like(input), input.new_empty(channels, dtype=acc), input.new_empty(channels, dtype=acc),
            updated(running_mean), updated(running_var))


@torch.library.custom_op("bnkernels::batch_norm_backward", mutates_args=())
def batch_norm_backward_op(grad_out: Tensor, input: Tensor, weight: Optional[Tensor], save_mean: Tensor,
                           save_invstd: Tensor, training: bool, axis: int,
                           backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(grad_out, input, weight, save_mean, save_invstd, training, axis, backend)


@batch_norm_backward_op.register_fake
def _batch_norm_backward_fake(grad_out, input, weight, save_mean, save_invstd, training, axis, backend):
    dtype, channels = (save_mean.dtype if weight is None else weight.dtype), _channels(input, axis)
    return torch.empty_like(input), input.new_empty(channels, dtype=dtype), input.new_empty(channels, dtype=dtype)


def _save(ctx, input, weight, save_mean, save_invstd, training, axis, backend, comm=None):
    """Keep what the backward needs (both the operator's and the eager form's)."""
    ctx.save_for_backward(input, weight, save_mean, save_invstd)
    ctx.training, ctx.axis, ctx.backend, ctx.comm = training, axis, backend, comm


def _setup_context(ctx, inputs, output):
    input, weight, bias, _, _, training, _, _, axis, backend = inputs
    _save(ctx, input, weight, output[1], output[2], training, axis, backend)


def _input_grads(ctx, grad_y, backward):
    """The gradients of the 10 inputs (``input``, ``weight``, ``bias``; None
    for the others) by ``backward`` (the operator, or ``_backward``
    eagerly). The saved statistics are outputs for the backward's sake
    only: no gradient flows through them (as in torch's own batch norm)."""
    input, weight, save_mean, save_invstd = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    if not any(need):  # (never with a comm: autograd calls a backward only where some input needs a gradient)
        return (None,) * 10
    grads = backward(grad_y, input, weight, save_mean, save_invstd, ctx.training, ctx.axis, ctx.backend)
    return (*(g if n else None for g, n in zip(grads, need)), *(None,) * 7)


def _op_backward(ctx, grad_y, *_):
    return _input_grads(ctx, grad_y, batch_norm_backward_op)


batch_norm_op.register_autograd(_op_backward, setup_context=_setup_context)


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, backend: str = "auto", comm=None) -> Tensor:
    """``torch.nn.functional.batch_norm`` on bnkernels' kernels, differentiable.

    Args:
        input: (N, C, *) tensor, float16, bfloat16, float32 or float64, on
            the CPU (run by the numba backend, else numpy) or CUDA (a GPU
            backend, on torch's current stream); any memory format.
        running_mean, running_var: (C,) float tensors or None (required
            when ``training`` is False); updated in place in training:
            ``running = (1 - momentum) * running + momentum * batch``, with
            the unbiased batch variance.
        weight, bias: (C,) tensors or None.
        training: normalize with the batch's statistics (True) or the
            running ones (False).
        momentum, eps: as in torch.
        backend: a bnkernels backend name (``"auto"``: by the tensor's
            device; see ``bnkernels.available_backends()``).
        comm: synchronized batch norm: a ``bnkernels.distributed``
            communicator (``Torch(group)``) whose every rank makes this
            call, and later its backward, on its part of the batch (any
            size, 0 included). Training normalizes with the statistics of
            all the parts and updates the running statistics alike on
            every rank; the backward's input gradient is that of the
            global normalization and the weight/bias gradients are this
            rank's shares (their sum over the ranks, which data-parallel
            training forms, is the whole batch's). Eager only (the
            custom operators do not take it): under ``torch.compile`` it
            raises. ``bnkernels.torch.SyncBatchNorm`` passes it for you.

    Returns:
        y: like ``input`` (same shape, dtype, device and memory format).

    Unlike torch's, the statistics are exact for data far from zero (a
    shifted Welford reduction, never E[x^2] - E[x]^2). Errors are
    bnkernels' (ValueError/TypeError naming the argument).
    """
    if running_mean is None and not training:
        raise ValueError("running_mean and running_var must be given when training is False "
                         "(inference normalizes with them)")
    return batch_norm_on_axis(input, running_mean, running_var, weight, bias, training, momentum, eps, 1, backend,
                              comm)


def batch_norm_on_axis(input, running_mean, running_var, weight, bias, training, momentum, eps, axis: int,
                       backend: str, comm=None) -> Tensor:
    """:func:`batch_norm` with the channels along ``axis`` (Keras: -1):
    the operator, then the running statistics' in-place update."""
    training = bool(training)
    if comm is not None and torch.compiler.is_compiling():
        # the operators' schema has no place for a communicator, and a traced graph would replay collectives
        # the protocol numbers call by call
        raise RuntimeError("bnkernels: synchronized batch norm (comm=...) runs eagerly, not under torch.compile: "
                           "call it outside the compiled region (torch.compiler.disable), as "
                           "bnkernels.torch.SyncBatchNorm does")
    if not torch.compiler.is_compiling():
        # eager: the same kernels through an autograd.Function, the running
        # statistics updated in place (the operator's dispatch, its
        # functional copies of the statistics and their copy back cost tens
        # of microseconds a step, which tracing needs and eager does not)
        return _Eager.apply(input, weight, bias, running_mean, running_var, training, float(momentum), float(eps),
                            int(axis), backend, comm)
    y, _, _, new_mean, new_var = batch_norm_op(input, weight, bias, running_mean, running_var, training,
                                               float(momentum), float(eps), int(axis), backend)
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return y


class _Eager(torch.autograd.Function):
    """The eager form of ``bnkernels::batch_norm`` and its autograd formula
    (the same ``_forward``/``_backward``; only y is differentiable), with
    the communicator of synchronized batch norm as an 11th argument."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps, axis, backend,
                comm=None):
        y, mean, invstd = _forward(input, weight, bias, running_mean, running_var, training, momentum, eps, axis,
                                   backend, comm)
        _save(ctx, input, weight, mean, invstd, training, axis, backend, comm)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        def backward(*args):  # the forward's comm: every rank's backward takes part in the all-reduce
            return _backward(*args, comm=ctx.comm)

        return (*_input_grads(ctx, grad_y, backward), None)
