"""How the public functions run a backend's stages (``backends.interface``).

Each function takes a resolved backend module and validated arguments. It
calls the backend's fused form when nothing has to happen between two
stages. Given an ``exchange``, it runs the stages one by one and lets the
exchange combine the reductions with those of the other participants
(other processes: synchronized batch norm) before the next stage:

- forward: ``statistics -> exchange.moments -> finalize -> normalize``;
- backward: ``backward_reduce -> exchange.grad_sums -> backward_apply``.

An exchange is any object with ``moments(Moments) -> Moments`` (the merged
moments of every participant: :func:`merge` is exact) and
``grad_sums(GradSums, count) -> (GradSums, count)`` (the summed sums and the
total count).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .backends.interface import ChannelLayout, GradSums, Moments, require_affine_per_group


def merge_pair(a, b):
    """Chan's formula for two partial moments of disjoint data (either may
    have count 0 and then contributes nothing; it is returned as is).

    ``n = na + nb``, ``delta = mean_b - mean_a``, ``mean = mean_a + delta *
    nb / n``, ``m2 = m2_a + m2_b + delta**2 * na * nb / n``, in float64.
    The result has the type of ``a`` (``Moments`` or ``ChannelStats``).
    """
    if a.count == 0 or b.count == 0:
        return b if a.count == 0 else a
    n = a.count + b.count
    ma, mb = np.asarray(a.mean, np.float64), np.asarray(b.mean, np.float64)
    delta = mb - ma
    mean = ma + delta * (b.count / n)
    m2 = np.asarray(a.m2, np.float64) + np.asarray(b.m2, np.float64) + delta**2 * (a.count * b.count / n)
    return type(a)(n, mean, m2)


def merge(parts: Sequence[Moments]) -> Moments:
    """Merge any number of partial moments, pairwise as a balanced tree (the
    rounding of m2 grows with the depth, log2 of the number of parts)."""
    parts = list(parts)
    if not parts:
        raise ValueError("merge needs at least one set of moments")
    while len(parts) > 1:
        parts = [merge_pair(*parts[i:i + 2]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
    return parts[0]


def forward_train(impl, x, layout: ChannelLayout, gamma, beta, eps: float, relu: bool, running, out=None,
                  exchange=None, residual=None):
    """Training forward: ``(y, mean, invstd)`` (see ``Backend.forward_train``;
    ``residual``: an array like x added before the activation)."""
    require_affine_per_group(layout, gamma, beta)
    if exchange is None:
        return impl.forward_train(x, layout, gamma, beta, eps, relu, running, out, **_extra(residual))
    moments = exchange.moments(impl.statistics(x, layout))
    if moments.count == 0:  # every participant's batch is empty: as a local empty batch (running ones untouched)
        return impl.forward_train(x, layout, gamma, beta, eps, relu, None, out, **_extra(residual))
    return forward_with_moments(impl, x, layout, moments, gamma, beta, eps, relu, running, out, residual)


def _extra(residual) -> dict:
    """The keyword a backend member takes only when there is a residual."""
    return {} if residual is None else {"residual": residual}


def forward_with_moments(impl, x, layout: ChannelLayout, moments: Moments, gamma, beta, eps: float, relu: bool,
                         running, out=None, residual=None):
    """A training forward normalizing with given ``moments`` (merged from
    other processes, or of the masked positions only): ``finalize ->
    normalize``; returns ``(y, mean, invstd)``."""
    require_affine_per_group(layout, gamma, beta)
    norm = impl.finalize(x, layout, moments, gamma, beta, eps, running)
    return impl.normalize(x, layout, norm, relu, out, **_extra(residual)), norm.mean, norm.invstd


def forward_infer(impl, x, layout: ChannelLayout, running_mean, running_var, gamma, beta, eps: float,
                  relu: bool, out=None, residual=None):
    """Inference forward: the backend's optional fused ``forward_infer``
    (the GPU backends: one device context, workspace reused), else
    ``finalize_running -> normalize``; returns ``(y, mean, invstd)``."""
    require_affine_per_group(layout, gamma, beta)
    fused = getattr(impl, "forward_infer", None)
    if fused is not None:
        return fused(x, layout, running_mean, running_var, gamma, beta, eps, relu, out, **_extra(residual))
    norm = impl.finalize_running(x, layout, running_mean, running_var, gamma, beta, eps)
    return impl.normalize(x, layout, norm, relu, out, **_extra(residual)), norm.mean, norm.invstd


def _converted(impl, arrays):
    return [None if a is None else impl.asarray(a) for a in arrays]


def prepare_forward_train(impl, x, layout: ChannelLayout, gamma, beta, eps: float, relu: bool, running,
                          residual=None):
    """``call(x, gamma, beta, running, residual=None) -> (y, mean,
    invstd)`` for arrays like these (a call passes them as the caller gave
    them, described alike: ``bnkernels.prepared``; a residual at every
    call exactly when one was prepared for): the backend's own prepared
    form when it has one (the GPU backends: launches recorded once), else
    its fused training forward on the converted arrays."""
    require_affine_per_group(layout, gamma, beta)
    prepare = getattr(impl, "prepare_forward_train", None)
    if prepare is not None:
        return prepare(x, layout, gamma, beta, eps, relu, running, **_extra(residual))

    def call(x, gamma, beta, running, residual=None):
        x, gamma, beta, residual = _converted(impl, (x, gamma, beta, residual))
        if running is not None:
            running = (*_converted(impl, running[:2]), running[2])
        return impl.forward_train(x, layout, gamma, beta, eps, relu, running, **_extra(residual))

    return call


def prepare_forward_infer(impl, x, layout: ChannelLayout, running_mean, running_var, gamma, beta, eps: float,
                          relu: bool, residual=None):
    """``call(x, running_mean, running_var, gamma, beta, residual=None) ->
    (y, mean, invstd)``, as :func:`prepare_forward_train`."""
    require_affine_per_group(layout, gamma, beta)
    prepare = getattr(impl, "prepare_forward_infer", None)
    if prepare is not None:
        return prepare(x, layout, running_mean, running_var, gamma, beta, eps, relu, **_extra(residual))

    def call(x, running_mean, running_var, gamma, beta, residual=None):
        x, rm, rv, gamma, beta, residual = _converted(impl, (x, running_mean, running_var, gamma, beta, residual))
        return forward_infer(impl, x, layout, rm, rv, gamma, beta, eps, relu, residual=residual)

    return call


def prepare_backward(impl, dy, x, layout: ChannelLayout, mean, invstd, gamma):
    """``call(dy, x, mean, invstd, gamma) -> (dx, dgamma, dbeta)``, as
    :func:`prepare_forward_train`."""
    require_affine_per_group(layout, gamma, None)
    prepare = getattr(impl, "prepare_backward", None)
    if prepare is not None:
        return prepare(dy, x, layout, mean, invstd, gamma)
    return lambda *arrays: impl.backward(*_converted(impl, arrays[:2]), layout, *_converted(impl, arrays[2:]))


def backward(impl, dy, x, layout: ChannelLayout, mean, invstd, gamma, out=None, exchange=None,
             training: bool = True):
    """Backward of the training forward: ``(dx, dgamma, dbeta)``; with
    ``training=False``, of the inference forward (``mean``, ``invstd`` from
    the running statistics, held constant): ``backward_reduce ->
    backward_apply(frozen)``, never exchanged (dx needs no sums; dgamma and
    dbeta are this process's, as any parameter gradient). With an exchange,
    dx is the gradient of the normalization by every participant's
    statistics, and dgamma, dbeta are this participant's contributions
    (their sum over the participants is the gradient of the whole)."""
    require_affine_per_group(layout, gamma, None)
    if not training:
        sums = impl.backward_reduce(dy, x, layout, mean, invstd)
        return impl.backward_apply(dy, x, layout, mean, invstd, gamma, sums, layout.count, out, frozen=True)
    if exchange is None:
        return impl.backward(dy, x, layout, mean, invstd, gamma, out)
    local = impl.backward_reduce(dy, x, layout, mean, invstd)
    sums, count = exchange.grad_sums(local, layout.count)
    # dx from everyone's sums; dgamma, dbeta this participant's own (summed over ranks as any parameter's gradient
    # is); a count of 0 means every x is empty (nothing to scale)
    return impl.backward_apply(dy, x, layout, mean, invstd, gamma, sums, max(count, 1), out, grads=local)


def norm_forward(impl, x, layout: ChannelLayout, weight, bias, eps: float, rms: bool, out=None):
    """Layer, RMS, group or instance norm forward on the rows view
    ``layout`` (``bnkernels.norm_family``): ``(y, mean, invstd)``, the
    backend's ``norm_forward`` member (its statistics and the affine map
    fused per row)."""
    return impl.norm_forward(x, layout, weight, bias, eps, rms, out)


def norm_backward(impl, dy, x, layout: ChannelLayout, mean, invstd, weight, rms: bool):
    """The gradients of :func:`norm_forward`: ``(dx, dweight, dbias)``."""
    return impl.norm_backward(dy, x, layout, mean, invstd, weight, rms)


__all__ = ["GradSums", "Moments", "backward", "forward_infer", "forward_train", "forward_with_moments", "merge",
           "merge_pair", "norm_backward", "norm_forward",
           "prepare_backward", "prepare_forward_infer", "prepare_forward_train"]
