"""Batch normalization: ``bn_forward``, ``bn_backward``, ``channel_stats``,
``merge_stats``.

Each function picks a backend (``bnkernels.backends.resolve``), validates
every argument (``bnkernels.validation``) and only then runs the backend's
stages through ``bnkernels.engine``, so a call that fails leaves running
statistics untouched. The float64 oracle is ``bnkernels.reference``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import axes, call_cache, distributed, dlpack, engine, masking, memory_order
from . import validation as v
from .backends import resolve, runs_on_gpu
from .backends.interface import Moments


@dataclass(frozen=True)
class SavedStats:
    """Per-channel statistics that ``bn_backward`` needs.

    ``mean`` and ``invstd = 1 / sqrt(var_biased + eps)``: shape (C,), float32
    (float64 for float64 input). In inference mode they are derived from the
    running statistics.
    """

    mean: np.ndarray
    invstd: np.ndarray


class ChannelStats(Moments):
    """Per-channel reduction: ``count`` values per channel, their ``mean`` and
    ``m2`` (sum of squared deviations from the mean), shape (C,), float64.

    Partial results from disjoint parts of a batch (other processes, other
    chunks) combine exactly with :func:`merge_stats`.
    """

    @property
    def var(self) -> np.ndarray:
        """Biased variance ``m2 / count`` (what batch norm normalizes with)."""
        return self.m2 / self.count

    @property
    def unbiased_var(self) -> np.ndarray:
        """Unbiased variance ``m2 / (count - 1)`` (what running_var stores)."""
        return self.m2 / (self.count - 1)


def bn_forward(x, gamma=None, beta=None, running_mean=None, running_var=None, *, training=True,
               momentum=0.1, eps=1e-5, axis=1, activation=None, backend="auto",
               return_saved=False, num_batches_tracked=None, out=None, mask=None, residual=None, comm=None):
    """Batch normalization forward.

    ``y = (x - mean) / sqrt(var + eps) * gamma + beta`` per channel, plus the
    optional ``residual``, then the optional fused activation.

    Args:
        x: array of any shape with ndim >= 1, float16, float32 or float64.
            Channels are along ``axis``; strided and transposed arrays work.
            NumPy, CuPy, torch, Numba device arrays, or any other array with
            ``__dlpack__`` (JAX's: viewed without a copy, ``bnkernels.dlpack``),
            as may every array argument; ``out`` and the running statistics
            in training must then be writable (JAX arrays are not).
        gamma, beta: per-channel scale and shift, shape (C,), or None
            (scale 1, shift 0).
        running_mean, running_var: shape (C,), float16, float32 or float64
            (updated in float32 or better, stored rounded), or None.
            Training updates them in place (only after every check passed):
            ``running = (1 - momentum) * running + momentum * batch``, with the
            unbiased batch variance in ``running_var``. An empty batch (no
            values per channel) leaves them untouched, as in torch; its y is
            empty and its saved statistics are zeros. Inference
            (``training=False``) normalizes with them and requires both.
        training: normalize with batch statistics (True) or running ones.
        momentum: weight of the new batch in [0, 1], or None for a cumulative
            average, which then needs ``num_batches_tracked`` (the number of
            batches already averaged in; the layer counts for you).
        eps: added to the variance; finite, >= 0.
        axis: the channel axis, negative allowed. 1 for NCHW, -1 for NHWC.
            Or several (a tuple, as Keras' axis lists): statistics per
            element of those axes over all the others, and gamma, beta,
            the running and the saved statistics of those axes' shape
            (``bnkernels.axes``; what is written must be C-contiguous).
        activation: None or ``"relu"`` (fused after the affine).
        backend: ``"auto"``, ``"cuda"``, or a backend name (see
            ``bnkernels.available_backends()``).
        return_saved: also return the :class:`SavedStats` for backward.
        out: where to write ``y``: an array of the same type, shape and
            dtype as ``x``, or ``x`` itself (in place); it must not
            otherwise overlap ``x``. Saves allocating (and, for large
            arrays, page-faulting) a new output on every call; the
            ``numba`` backend writes into a C-contiguous ``out`` directly,
            the others copy their result into it.
        mask: Keras masking: a boolean array of x's shape without the
            channel axis (and of x's library); in training the statistics
            use only the positions where it is true (``bnkernels.masking``),
            the output is computed everywhere. Ignored in inference.
        residual: ``z``, of x's shape and dtype (any strides), added before
            the activation in the same pass: ``y = relu(bn(x) + z)`` with
            ``activation="relu"`` (a ResNet block's add-ReLU; Apex's fused
            add-ReLU, oneDNN's ``fuse_norm_add_relu``). ``out`` may be ``z``
            itself. Its gradient: ``bn_backward(..., y=y, activation="relu",
            residual=True)``.
        comm: synchronized batch norm (``bnkernels.distributed``): a
            communicator (``MPI()``, ``Torch()``, ``NCCL(...)``, or a raw
            mpi4py one) whose every rank makes this call on its part of
            the batch (any size, empty included). Training normalizes with
            the statistics of all the parts together (one all-gather of
            each rank's count, mean and M2, merged exactly) and updates
            the running statistics identically on every rank; the saved
            statistics are the global ones. Inference needs no statistics
            but still takes part (a header only), so that ranks which
            disagree on ``training``, the channels or the dtype raise
            ``bnkernels.SyncError`` together instead of hanging; a rank whose
            arguments are refused raises its error and the others a
            SyncError naming it. Not with ``mask``.

    Returns:
        ``y`` with the shape and dtype of ``x`` (half input is computed in
        float32; ``out`` when given), or ``(y, saved)`` if ``return_saved``.
        For a DLPack ``x`` (JAX) ``y`` is an array of its library (NumPy
        where that has no ``from_dlpack``); ``saved`` stays NumPy.

    Raises:
        TypeError, ValueError: bad arguments (message names the argument).
        BackendUnavailableError: a named backend cannot run here.
    """
    if comm is not None and not isinstance(comm, distributed.Call):  # one synchronized call, whatever follows
        return distributed.synchronized(comm, distributed.FORWARD, lambda call: bn_forward(
            x, gamma, beta, running_mean, running_var, training=training, momentum=momentum, eps=eps, axis=axis,
            activation=activation, backend=backend, return_saved=return_saved,
            num_batches_tracked=num_batches_tracked, out=out, mask=mask, residual=residual, comm=call))
    prepared = call_cache.UNCACHED  # (a synchronized call is never kept: its stages run between collectives)
    if mask is None and comm is None:
        # first of all, a call described like an earlier one (its description decides every branch below)
        arrays = (x, gamma, beta, running_mean, running_var, residual)
        key = call_cache.forward_key(arrays, training, momentum, eps, axis, activation, backend,
                                     num_batches_tracked, return_saved, out)
        prepared = call_cache.lookup(key)
        if prepared is not None and prepared is not call_cache.UNCACHED:
            y, saved = prepared.run(arrays, num_batches_tracked)
            return (y, saved) if return_saved else y
    if dlpack.any_foreign((x, gamma, beta, running_mean, running_var, out, mask, residual)):
        # other libraries' arrays (JAX...): the call again on NumPy/CuPy views of them, results back in x's
        # library; after the cache lookup (it never keeps such a call), so that its hits pay nothing for this
        return dlpack.call(bn_forward, dict(
            x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var, training=training,
            momentum=momentum, eps=eps, axis=axis, activation=activation, backend=backend,
            return_saved=return_saved, num_batches_tracked=num_batches_tracked, out=out, mask=mask,
            residual=residual, comm=comm), ("out", "running_mean", "running_var") if training is True or training is np.True_
            else ("out",))
    if mask is not None:
        if comm is not None:
            raise ValueError("mask and comm cannot be used together: masked statistics are not synchronized")
        return _forward_masked(x, gamma, beta, running_mean, running_var, training, momentum, eps, axis, activation,
                               backend, return_saved, num_batches_tracked, out, mask, residual)
    perm = memory_order.order(x)
    if perm is not None:  # run in x's memory order: no copy, y with x's strides
        y, saved = bn_forward(memory_order.permute(x, perm), gamma, beta, running_mean, running_var,
                              training=training, momentum=momentum, eps=eps, axis=memory_order.axis_in(perm, axis),
                              activation=activation, backend=backend, return_saved=True,
                              num_batches_tracked=num_batches_tracked, out=memory_order.permute(out, perm),
                              residual=memory_order.permute(residual, perm), comm=comm)
        y = out if out is not None else memory_order.permute(y, memory_order.inverse(perm))
        return (y, saved) if v.check_flag(return_saved, "return_saved") else y
    if axes.is_several(axis):
        return _forward_on_axes(x, gamma, beta, running_mean, running_var, training=training, momentum=momentum,
                                eps=eps, axis=axis, activation=activation, backend=backend,
                                return_saved=return_saved, num_batches_tracked=num_batches_tracked, out=out,
                                residual=residual, comm=comm)
    c = _check_forward(x, gamma, beta, running_mean, running_var, training, momentum, eps, axis, activation,
                       backend, num_batches_tracked, out, residual)
    return_saved = v.check_flag(return_saved, "return_saved")
    impl, x, layout, gamma, beta, relu, eps = c.impl, c.x, c.layout, c.gamma, c.beta, c.relu, c.eps
    training, running_mean, running_var, factor, out, out_view = (c.training, c.running_mean, c.running_var,
                                                                  c.factor, c.out, c.out_view)
    if comm is not None:
        comm.describe(layout.channels, x.dtype, training)
    if training:
        if comm is None:  # (synchronized: the count of every rank's batch together, checked by the exchange)
            v.check_training_count(layout)
        # an empty batch (as torch): an empty y, zero statistics, the running ones untouched
        empty = layout.count == 0 and comm is None
        running = None if running_mean is None or empty else (running_mean, running_var, factor)
        y, mean, invstd = engine.forward_train(impl, x, layout, gamma, beta, eps, relu, running, out_view,
                                               exchange=comm, residual=c.residual)
    else:
        if running_mean is None:
            raise ValueError("inference (training=False) normalizes with the running statistics: "
                             "pass running_mean and running_var")
        y, mean, invstd = engine.forward_infer(impl, x, layout, running_mean, running_var, gamma, beta, eps,
                                               relu, out_view, residual=c.residual)
    if out is not None:
        y = out  # the caller's object (its memory holds the result)
    if prepared is None:  # a description met for the first time, checked and run: keep its prepared call
        call_cache.store(key, impl, lambda: _prepared().forward_from_checked(c, arrays))
    if return_saved:
        return y, SavedStats(mean, invstd)
    return y


def _prepared():
    """``bnkernels.prepared`` (which imports this module)."""
    from . import prepared

    return prepared


def _forward_masked(x, gamma, beta, running_mean, running_var, training, momentum, eps, axis, activation, backend,
                    return_saved, num_batches_tracked, out, mask, residual):
    """:func:`bn_forward` with a ``mask``: every check, then the statistics
    of the masked positions (a copy of them), then ``finalize ->
    normalize`` on all of x (``engine.forward_with_moments``)."""
    c = _check_forward(x, gamma, beta, running_mean, running_var, training, momentum, eps, axis, activation,
                       backend, num_batches_tracked, out, residual)
    return_saved = v.check_flag(return_saved, "return_saved")
    masking.check(mask, x, c.layout)
    if not c.training:  # inference: the running statistics, the mask plays no part (as Keras)
        return bn_forward(x, gamma, beta, running_mean, running_var, training=False, momentum=momentum, eps=eps,
                          axis=axis, activation=activation, backend=backend, return_saved=return_saved,
                          num_batches_tracked=num_batches_tracked, out=out, residual=residual)
    stats = channel_stats(masking.selected(x, c.layout, mask), axis=-1, backend=c.impl.name)
    if stats.count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got 1 position of mask of shape "
                         f"{tuple(mask.shape)}")
    C = c.layout.channels
    # fully masked: mean 0, variance 0, as Keras computes them (a count of 1 with M2 0 is variance 0 to
    # finalize; no running statistics are updated from it)
    moments = (Moments(stats.count, stats.mean, stats.m2) if stats.count
               else Moments(1, np.zeros(C), np.zeros(C)))
    running = (None if c.running_mean is None or stats.count == 0
               else (c.running_mean, c.running_var, c.factor))
    y, mean, invstd = engine.forward_with_moments(c.impl, c.x, c.layout, moments, c.gamma, c.beta, c.eps, c.relu,
                                                  running, c.out_view, residual=c.residual)
    y = out if out is not None else y
    return (y, SavedStats(mean, invstd)) if return_saved else y


def _backward_through_activation(dy, x, saved_mean, saved_invstd, gamma, axis, training, backend, out, mask,
                                 activation, y, residual, comm=None):
    """:func:`bn_backward` of ``y = act(bn(x) [+ z])``: ``g = dy * (y > 0)``
    for ReLU (the backend's ``relu_backward``: the pass that writes dz is
    needed anyway, and fusing the mask into both backward passes would read
    y twice instead), then batch norm's backward of ``g``."""
    relu = v.check_activation(activation)
    residual = v.check_flag(residual, "residual")
    if relu != (y is not None):
        raise ValueError("activation='relu' needs y, the forward's output (the gradient flows where y > 0), "
                         "and y is only used with it" if relu else
                         "y is only used with activation='relu' (pass the forward's activation too)")
    g = dy
    if relu:
        impl = resolve(backend, x)
        perm = memory_order.order(dy)  # in dy's memory order: no copy, g with dy's strides
        def p(a, order):
            return a if order is None else memory_order.permute(a, order)

        dy_b = v.check_input(v.convert(p(dy, perm), "dy", impl.asarray), "dy")
        g = impl.relu_backward(dy_b, v.check_like_x(p(y, perm), "y", dy_b, impl.asarray))
        g = p(g, None if perm is None else memory_order.inverse(perm))
    grads = bn_backward(g, x, saved_mean, saved_invstd, gamma, axis=axis, training=training, backend=backend,
                        out=out, mask=mask, comm=comm)
    return (*grads, g) if residual else grads


def _backward_masked(dy, x, saved_mean, saved_invstd, gamma, axis, backend, out, mask):
    """:func:`bn_backward` with a ``mask`` (``bnkernels.masking``): dx =
    gamma * invstd * dy everywhere, batch norm's correction at the masked
    positions, from the sums over all of them."""
    c = _check_backward(dy, x, saved_mean, saved_invstd, gamma, axis, backend, out)
    masking.check(mask, x, c.layout)
    impl, layout = c.impl, c.layout
    sums = impl.backward_reduce(c.dy, c.x, layout, c.saved_mean, c.saved_invstd)
    dx, dgamma, dbeta = impl.backward_apply(c.dy, c.x, layout, c.saved_mean, c.saved_invstd, c.gamma, sums,
                                            layout.count, c.out_view, frozen=True)
    dx = out if out is not None else dx
    n = masking.count(mask)
    if n:
        rows = [masking.selected(a, layout, mask) for a in (dy, x)]
        sub = v.channel_layout(rows[1].shape, -1)
        dx_rows, _, _ = impl.backward_apply(*(impl.asarray(r) for r in rows), sub, c.saved_mean, c.saved_invstd,
                                            c.gamma, sums, n)
        masking.scatter(dx, layout, mask, dx_rows)
    return dx, dgamma, dbeta


def _forward_on_axes(x, gamma, beta, running_mean, running_var, *, axis, training, out, return_saved, residual,
                     **options):
    """:func:`bn_forward` with several channel axes (``bnkernels.axes``):
    on the merged view, results viewed back."""
    m = axes.merge(np.shape(x), axis)
    written = training is True
    out_view = None if out is None else m.written_view(out, "out")
    y, saved = bn_forward(m.view(x, "x"), m.flat_param(gamma, "gamma"), m.flat_param(beta, "beta"),
                          m.flat_param(running_mean, "running_mean", written),
                          m.flat_param(running_var, "running_var", written), training=training, axis=m.axis,
                          out=out_view, return_saved=True,
                          residual=None if residual is None else m.view(residual, "residual"), **options)
    y = m.unview(y) if out is None else out
    saved = SavedStats(m.shaped(saved.mean), m.shaped(saved.invstd))
    return (y, saved) if v.check_flag(return_saved, "return_saved") else y


@dataclass(frozen=True)
class _Forward:
    """The checked arguments of a forward call (:func:`_check_forward`)."""

    impl: object
    x: object
    out: object
    out_view: object
    layout: object
    training: bool
    gamma: object
    beta: object
    running_mean: object
    running_var: object
    eps: float
    relu: bool
    momentum: float | None
    factor: float
    residual: object = None


def _check_forward(x, gamma, beta, running_mean, running_var, training, momentum, eps, axis, activation, backend,
                   num_batches_tracked, out, residual=None) -> _Forward:
    """Every check of :func:`bn_forward` (also what ``prepare_forward``
    checks once): resolve the backend, validate, check aliasing."""
    impl = resolve(backend, x)
    gpu_backend = runs_on_gpu(impl)  # GPU running statistics are fine there, whatever x is
    given = {"x": x, "gamma": gamma, "beta": beta, "running_mean": running_mean, "running_var": running_var}
    x = v.check_input(v.convert(x, "x", impl.asarray))
    out, out_view = v.check_out(out, x, given["x"])
    residual, given["residual"] = v.check_like_x(residual, "residual", x, impl.asarray), residual
    layout = v.channel_layout(x.shape, axis)
    training = v.check_flag(training, "training")
    C = layout.channels
    gamma = v.check_per_channel(gamma, "gamma", C, asarray=impl.asarray)
    beta = v.check_per_channel(beta, "beta", C, asarray=impl.asarray)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if training:  # updated in place: the caller's memory, never a copy
        running_mean = v.writable_view(running_mean, "running_mean", gpu_backend=gpu_backend)
        running_var = v.writable_view(running_var, "running_var", gpu_backend=gpu_backend)
    stats_asarray = None if training else impl.asarray
    running_mean = v.check_per_channel(running_mean, "running_mean", C, asarray=stats_asarray,
                                       dtypes=v.RUNNING_DTYPES)
    running_var = v.check_per_channel(running_var, "running_var", C, asarray=stats_asarray,
                                      dtypes=v.RUNNING_DTYPES)
    momentum = v.check_momentum(momentum)
    eps = v.check_eps(eps)
    relu = v.check_activation(activation)
    factor = v.running_factor(momentum, num_batches_tracked, used=training and running_mean is not None)
    arrays = {"x": x, "gamma": gamma, "beta": beta, "running_mean": running_mean, "running_var": running_var,
              "residual": residual}
    check_forward_aliasing(arrays, given, training, out_view)
    return _Forward(impl, x, out, out_view, layout, training, gamma, beta, running_mean, running_var, eps, relu,
                    momentum, factor, residual)


def check_forward_aliasing(arrays: dict, given: dict, training: bool, out_view=None) -> None:
    """A forward's aliasing rule: in training the running statistics are
    written, and so is ``out``; nothing written may share memory with
    anything else (``out`` may be x or the residual itself). ``arrays``:
    the arguments as the backend converted them, ``given``: as the caller
    passed them (by name: x, gamma, beta, running_mean, running_var and
    optionally residual)."""
    memory = {name: v.memory_of(a, given[name]) for name, a in arrays.items()}
    stats = ("running_mean", "running_var")
    written = {name: memory[name] for name in stats} if training else {}
    v.check_aliasing({"out": out_view, **written},
                     {name: m for name, m in memory.items() if name not in written}, in_place=("x", "residual"))


def bn_backward(dy, x, saved_mean, saved_invstd, gamma=None, *, axis=1, training=True, backend="auto",
                out=None, mask=None, activation=None, y=None, residual=False, comm=None):
    """Gradients of :func:`bn_forward`: of the training forward, or with
    ``training=False`` of the inference forward.

    Args:
        dy: gradient of the output, same shape and dtype as ``x``.
        x: the forward's input. Any array argument may be a DLPack array
            (JAX's) as in :func:`bn_forward`: ``dx``, ``dgamma`` and
            ``dbeta`` then come back in the library of x (else of dy).
        saved_mean, saved_invstd: ``saved.mean`` and ``saved.invstd`` from
            ``bn_forward(..., return_saved=True)``, shape (C,).
        gamma: the forward's scale, shape (C,), or None.
        training: False for the gradient of ``bn_forward(training=False)``
            (pass the saved statistics it returned, from the running ones):
            the running statistics are constants, so ``dx = dy * gamma *
            invstd``; ``dgamma`` and ``dbeta`` as in training. How frozen
            batch norm is fine-tuned (torchvision's ``FrozenBatchNorm2d``).
        axis, backend: as in :func:`bn_forward`.
        mask: the forward's ``mask`` (training): the gradient of statistics
            of the masked positions only.
        out: where to write ``dx``, as in :func:`bn_forward` (``dy`` or
            ``x`` itself for an in-place result).
        activation, y: the forward's ``activation`` and, for ``"relu"``,
            its output ``y``: the gradient flows where ``y > 0`` (``g = dy
            * (y > 0)``, one pass of the backend, then batch norm's
            backward of ``g``).
        residual: True when the forward had a ``residual`` z: also return
            ``dz = g`` (``dy`` itself without an activation).
        comm: the forward's communicator (synchronized batch norm): one
            all-reduce of every rank's ``sum(dy)`` and ``sum(dy * xhat)``
            (and count), so that ``dx`` is the exact gradient of the
            normalization by the global statistics. ``dgamma`` and ``dbeta``
            are this rank's contributions (torch's convention): their sum
            over the ranks, which data-parallel training makes for every
            parameter gradient, is the gradient of the whole batch. With
            ``training=False`` the call takes part with a header only (see
            :func:`bn_forward`). Not with ``mask``.

    Returns:
        ``(dx, dgamma, dbeta)`` (and ``dz`` with ``residual=True``): ``dx``
        like ``x`` (``out`` when given); ``dgamma = sum(g * xhat)`` and
        ``dbeta = sum(g)`` per channel, shape (C,), float32 (float64 for
        float64 input). They are returned even when ``gamma`` is None.
    """
    if comm is not None and not isinstance(comm, distributed.Call):  # one synchronized call, as bn_forward
        return distributed.synchronized(comm, distributed.BACKWARD, lambda call: bn_backward(
            dy, x, saved_mean, saved_invstd, gamma, axis=axis, training=training, backend=backend, out=out,
            mask=mask, activation=activation, y=y, residual=residual, comm=call))
    fused = activation is not None or y is not None or residual is not False
    masked = mask is not None and training is True
    prepared = call_cache.UNCACHED
    if not (fused or masked or comm is not None):
        arrays = (dy, x, saved_mean, saved_invstd, gamma)
        key = call_cache.backward_key(arrays, axis, backend, out) if training is True else None
        prepared = call_cache.lookup(key)
        if prepared is not None and prepared is not call_cache.UNCACHED:
            return prepared.run(arrays)
    if dlpack.any_foreign((dy, x, saved_mean, saved_invstd, gamma, out, mask, y)):  # as in bn_forward
        return dlpack.call(bn_backward, dict(
            dy=dy, x=x, saved_mean=saved_mean, saved_invstd=saved_invstd, gamma=gamma, axis=axis,
            training=training, backend=backend, out=out, mask=mask, activation=activation, y=y,
            residual=residual, comm=comm), ("out",), like=("x", "dy"))
    if fused:
        return _backward_through_activation(dy, x, saved_mean, saved_invstd, gamma, axis, training, backend, out,
                                            mask, activation, y, residual, comm)
    if masked:
        if comm is not None:
            raise ValueError("mask and comm cannot be used together: masked statistics are not synchronized")
        return _backward_masked(dy, x, saved_mean, saved_invstd, gamma, axis, backend, out, mask)
    perm = memory_order.order(x)
    if perm is not None:  # in x's memory order, as bn_forward
        p = memory_order.permute
        dy = dy if hasattr(dy, "shape") else np.asarray(dy)  # a list: in x's logical order
        dx, dgamma, dbeta = bn_backward(p(dy, perm), p(x, perm), saved_mean,
                                        saved_invstd, gamma, axis=memory_order.axis_in(perm, axis),
                                        training=training, backend=backend, out=p(out, perm), comm=comm)
        return (p(dx, memory_order.inverse(perm)) if out is None else out), dgamma, dbeta
    if axes.is_several(axis):
        m = axes.merge(np.shape(x), axis)
        out_view = None if out is None else m.written_view(out, "out")
        dx, dgamma, dbeta = bn_backward(m.view(dy, "dy"), m.view(x, "x"), m.flat_param(saved_mean, "saved_mean"),
                                        m.flat_param(saved_invstd, "saved_invstd"), m.flat_param(gamma, "gamma"),
                                        axis=m.axis, training=training, backend=backend, out=out_view, comm=comm)
        return (m.unview(dx) if out is None else out), m.shaped(dgamma), m.shaped(dbeta)
    c = _check_backward(dy, x, saved_mean, saved_invstd, gamma, axis, backend, out)
    training = v.check_flag(training, "training")
    if comm is not None:
        comm.describe(c.layout.channels, c.x.dtype, training)
    out, out_view = c.out, c.out_view
    dx, dgamma, dbeta = engine.backward(c.impl, c.dy, c.x, c.layout, c.saved_mean, c.saved_invstd, c.gamma,
                                        out_view, exchange=comm, training=training)
    if prepared is None and training:
        call_cache.store(key, c.impl, lambda: _prepared().PreparedBackward(c, arrays))
    return (dx if out is None else out), dgamma, dbeta


def channel_stats(x, *, axis=1, backend="auto") -> ChannelStats:
    """Per-channel count, mean and M2 of ``x`` (reduction over all other axes).

    Accumulated around a shift near the mean (never E[x^2] - E[x]^2). The
    CPU backends form and square the deviations in float64 (no overflow or
    underflow for any float16/float32 data); the GPU backends work
    float16/float32 input in float32. Either way M2 is accurate to about
    1e-7 relative for float16/float32 input, whatever the mean.

    Args:
        x: array with ndim >= 1, float16/32/64; channels along ``axis``;
            a DLPack array (JAX's) too, viewed without a copy.
    Returns:
        :class:`ChannelStats` with float64 ``mean`` and ``m2`` of shape (C,)
        (NumPy for a DLPack x as for a NumPy one).
    """
    if dlpack.is_foreign(x):
        return dlpack.call(channel_stats, dict(x=x, axis=axis, backend=backend))
    perm = memory_order.order(x)
    if perm is not None:
        return channel_stats(memory_order.permute(x, perm), axis=memory_order.axis_in(perm, axis), backend=backend)
    if axes.is_several(axis):
        m = axes.merge(np.shape(x), axis)
        s = channel_stats(m.view(x, "x"), axis=m.axis, backend=backend)
        return ChannelStats(s.count, m.shaped(s.mean), m.shaped(s.m2))
    impl = resolve(backend, x)
    x = v.check_input(v.convert(x, "x", impl.asarray))
    layout = v.channel_layout(x.shape, axis)
    moments = impl.statistics(x, layout)
    return ChannelStats(moments.count, moments.mean, moments.m2)


def merge_stats(a: ChannelStats, b: ChannelStats) -> ChannelStats:
    """Merge two partial reductions of disjoint data by Chan's formula.

    ``n = na + nb``, ``delta = mean_b - mean_a``,
    ``mean = mean_a + delta * nb / n``,
    ``m2 = m2_a + m2_b + delta**2 * na * nb / n``.
    Either side may have count 0 (it then contributes nothing). The engine
    merges partial moments with the same function (``engine.merge_pair``).
    """
    for name, s in (("a", a), ("b", b)):
        if not isinstance(s, ChannelStats):
            raise TypeError(f"{name} must be a ChannelStats, got {type(s).__name__}")
    if np.shape(a.mean) != np.shape(b.mean):
        raise ValueError(f"cannot merge statistics of {np.shape(a.mean)[0]} and "
                         f"{np.shape(b.mean)[0]} channels")
    return engine.merge_pair(a, b)


@dataclass(frozen=True)
class _Backward:
    """The checked arguments of a backward call (:func:`_check_backward`)."""

    impl: object
    dy: object
    x: object
    out: object
    out_view: object
    layout: object
    saved_mean: object
    saved_invstd: object
    gamma: object


def _check_backward(dy, x, saved_mean, saved_invstd, gamma, axis, backend, out) -> _Backward:
    """Every check of :func:`bn_backward` (also what ``prepare_backward``
    checks once)."""
    impl = resolve(backend, x)
    given = {"dy": dy, "x": x, "saved_mean": saved_mean, "saved_invstd": saved_invstd, "gamma": gamma}
    x = v.check_input(v.convert(x, "x", impl.asarray))
    dy = v.check_input(v.convert(dy, "dy", impl.asarray), "dy")
    v.check_same_shape(dy, x)
    out, out_view = v.check_out(out, x, given["x"])
    layout = v.channel_layout(x.shape, axis)
    C = layout.channels
    need = "pass saved.mean and saved.invstd from bn_forward(..., return_saved=True)"
    saved_mean = v.check_per_channel(saved_mean, "saved_mean", C, asarray=impl.asarray, required=need)
    saved_invstd = v.check_per_channel(saved_invstd, "saved_invstd", C, asarray=impl.asarray,
                                       required=need)
    gamma = v.check_per_channel(gamma, "gamma", C, asarray=impl.asarray)
    arrays = {"dy": dy, "x": x, "saved_mean": saved_mean, "saved_invstd": saved_invstd, "gamma": gamma}
    v.check_aliasing({"out": out_view}, {name: v.memory_of(a, given[name]) for name, a in arrays.items()},
                     in_place=("dy", "x"))
    return _Backward(impl, dy, x, out, out_view, layout, saved_mean, saved_invstd, gamma)
