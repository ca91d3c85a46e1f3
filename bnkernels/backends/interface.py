"""What every backend implements: the stages of a normalization on a
canonical view, and the fused forms of the fast paths.

The public functions (``bnkernels.batch_norm``) validate every argument and
then compose these members through ``bnkernels.engine``. A backend is a
module; ``isinstance(module, Backend)`` checks that it has every member.
``numpy_backend`` is the reference implementation. Nothing here imports an
optional package.

The canonical view (:class:`ChannelLayout`) of an input ``x`` is a 3-D
``(outer, G, inner)`` reshape of it, with one group of statistics per index
of the middle axis (the values of a group are reduced over ``outer`` and
``inner``):

============== ==================== ============================ ===================
norm            input                view ``(outer, G, inner)``    affine index
============== ==================== ============================ ===================
batch norm      (N, C, H, W), axis 1 (N, C, H*W)                  g
instance norm   (N, C, H, W)         (1, N*C, H*W)                g % C
group norm      (N, C, H, W), G      (1, N*G, C/G*H*W)            (g % G)*C/G + i//(H*W)
layer norm      (rows, F)            (1, rows, F)                 i
============== ==================== ============================ ===================

The affine parameters (gamma, beta) are indexed by :class:`Affine`: the
identity on the groups for batch norm (``affine=None``), a map of the group
``g`` and the inner index ``i`` otherwise. Today every backend runs views
whose affine is per group, or that have no affine parameters; a view with an
:class:`Affine` map and parameters (group, layer norm with weights) is
refused by the engine (``require_affine_per_group``) until the norm family
(issue 16) adds its kernels.

Arrays: each member takes the backend's own arrays (``asarray`` makes them,
without copying) and returns arrays of the kind the caller gave for ``x``,
except the reductions' results (:class:`Moments`, :class:`GradSums`), which
are small float64 NumPy arrays on the host so that any process can merge
them exactly (``engine.merge``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Affine:
    """Which affine channel an element of group ``g`` at inner index ``i``
    uses: ``(g % period) * span + i // divisor``, ``channels`` in all."""

    channels: int
    period: int
    span: int
    divisor: int

    def index(self, g, i):
        return (g % self.period) * self.span + i // self.divisor


@dataclass(frozen=True)
class ChannelLayout:
    """The canonical view of an input of ``shape``.

    ``axis`` is the axis of the statistics groups; the view is ``(outer, C,
    inner)`` with ``outer = prod(shape[:axis])``, ``inner =
    prod(shape[axis+1:])`` (``inner > 1``: channel planes, NCHW-like;
    ``inner == 1``: channel fastest, NHWC or 2-D). For batch norm ``shape``
    and ``axis`` are the input's own (any strides); the other norms reshape
    the input to ``(outer, G, inner)`` first, with ``axis`` 1.
    ``affine``: None when gamma and beta are per group (batch norm), else
    the :class:`Affine` map of the affine axis.
    """

    shape: tuple[int, ...]
    axis: int  # non-negative
    affine: Affine | None = None

    @property
    def channels(self) -> int:
        """The number of statistics groups (batch norm: channels)."""
        return self.shape[self.axis]

    @property
    def outer(self) -> int:
        return math.prod(self.shape[: self.axis])

    @property
    def inner(self) -> int:
        return math.prod(self.shape[self.axis + 1 :])

    @property
    def count(self) -> int:
        """Number of values reduced per group (``outer * inner``)."""
        return self.outer * self.inner

    @property
    def reduce_axes(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.shape)) if i != self.axis)

    @property
    def param_shape(self) -> tuple[int, ...]:
        """Shape that broadcasts a per-channel vector against the input."""
        return tuple(self.channels if i == self.axis else 1 for i in range(len(self.shape)))

    @property
    def affine_channels(self) -> int:
        """Length of gamma and beta."""
        return self.channels if self.affine is None else self.affine.channels


def require_affine_per_group(layout: ChannelLayout, gamma, beta) -> None:
    """Refuse, with the reason, affine parameters that the backends' kernels
    cannot index yet (an :class:`Affine` map other than the groups)."""
    if layout.affine is not None and (gamma is not None or beta is not None):
        raise NotImplementedError("gamma and beta indexed across the statistics groups (group or layer norm "
                                  "with weights) need the norm-family kernels, which do not exist yet")


@dataclass(frozen=True)
class Moments:
    """The statistics stage's result: ``count`` values per group, their
    ``mean`` and ``m2`` (sum of squared deviations from the mean), float64
    NumPy arrays of shape (G,). Partial moments of disjoint data merge
    exactly (``engine.merge``, Chan's formula)."""

    count: int
    mean: np.ndarray
    m2: np.ndarray


@dataclass(frozen=True)
class Normalization:
    """The finalize stage's result.

    ``mean``, ``invstd``: (G,) in the compute dtype (float32 for
    float16/32 input, float64 for float64), arrays of the kind the caller
    gave for x: what ``SavedStats`` holds. ``k``, ``scale``, ``shift``: the
    normalize stage's coefficients, ``y = (x - k) * scale + shift``, (G,)
    in the backend's working form (float64 NumPy arrays on the CPU,
    compute-dtype device arrays on a GPU).
    """

    mean: Any
    invstd: Any
    k: Any
    scale: Any
    shift: Any


@dataclass(frozen=True)
class GradSums:
    """The backward reduce stage's result: per group ``sum(dy)`` and
    ``sum(dy * xhat)`` (``xhat = (x - mean) * invstd``), float64 NumPy
    arrays of shape (G,). Partial sums of disjoint data simply add."""

    sum_dy: np.ndarray
    sum_dy_xhat: np.ndarray


@runtime_checkable
class Backend(Protocol):
    """The members of a backend module. ``layout`` is a checked
    :class:`ChannelLayout` of x; every argument was validated by the public
    function (shapes, dtypes, aliasing), so members check nothing. ``out``:
    None or the caller's buffer for the result (``validation.check_out``),
    which may be an input itself (in place). Inputs x, dy: float16, float32
    or float64, the shape of ``layout``; per-group vectors: (G,)."""

    name: str

    def asarray(self, x) -> Any:
        """The backend's view of an argument, without a copy."""

    # --- stages ---------------------------------------------------------------

    def statistics(self, x, layout: ChannelLayout) -> Moments:
        """Count, mean and M2 per group (zeros for an empty input)."""

    def finalize(self, x, layout: ChannelLayout, moments: Moments, gamma, beta, eps: float,
                 running) -> Normalization:
        """Batch statistics to :class:`Normalization` for the input x (its
        dtype, its kind of array and its device):
        ``invstd = 1 / sqrt(m2 / count + eps)``, ``k = mean``, ``scale =
        gamma * invstd``, ``shift = beta``. ``running``: None or
        ``(running_mean, running_var, factor)``, updated in place with the
        unbiased variance: ``running = (1 - factor) * running + factor *
        batch``."""

    def finalize_running(self, x, layout: ChannelLayout, running_mean, running_var, gamma, beta,
                         eps: float) -> Normalization:
        """:meth:`finalize` from running statistics (inference)."""

    def normalize(self, x, layout: ChannelLayout, norm: Normalization, relu: bool, out=None, residual=None):
        """``y = (x - k) * scale + shift``, plus ``residual`` (None, or an
        array of x's shape and dtype, any strides) in the same pass, then
        ReLU when ``relu``: shape and dtype of x (``out`` when given; it may
        be the residual itself)."""

    def backward_reduce(self, dy, x, layout: ChannelLayout, mean, invstd) -> GradSums:
        """``sum(dy)`` and ``sum(dy * xhat)`` per group; mean, invstd: (G,)
        saved statistics."""

    def backward_apply(self, dy, x, layout: ChannelLayout, mean, invstd, gamma, sums: GradSums,
                       count: int, out=None, frozen: bool = False, grads: GradSums | None = None):
        """``dx = gamma * invstd * (dy - sum_dy / count - xhat * sum_dy_xhat
        / count)``, with ``count`` the number of values the sums are over
        (all processes'); ``frozen``: the gradient of the inference forward
        (mean and invstd constants), ``dx = gamma * invstd * dy``. Returns
        ``(dx, dgamma, dbeta)``: dx like x, ``dgamma = sum_dy_xhat`` and
        ``dbeta = sum_dy`` (G,) in the compute dtype, arrays of x's kind,
        from ``grads`` when given (a synchronized backward: dx from every
        process's ``sums``, the parameter gradients from this one's own)."""

    # --- fused forms (the fast paths) -------------------------------------------

    def forward_train(self, x, layout: ChannelLayout, gamma, beta, eps: float, relu: bool, running,
                      out=None, residual=None):
        """statistics, finalize and normalize in one: returns ``(y, mean,
        invstd)`` as :meth:`normalize` and :meth:`finalize` would."""

    def backward(self, dy, x, layout: ChannelLayout, mean, invstd, gamma, out=None):
        """backward reduce and apply in one: returns ``(dx, dgamma, dbeta)``
        as :meth:`backward_apply` would, over this input's count."""

    def relu_backward(self, dy, y):
        """The gradient through a fused ReLU: ``dy``, and 0 where ``y <= 0``
        (torch's rule: a NaN output passes its gradient). dy, y: same shape
        and dtype, any strides; returns a new array like dy (dtype, kind,
        memory order)."""


#: Fused forms a backend may have besides (the engine uses them when present):
#: ``forward_infer(x, layout, running_mean, running_var, gamma, beta, eps,
#: relu, out=None, residual=None) -> (y, mean, invstd)``, finalize_running and normalize in
#: one (the GPU backends: one device context, their workspace reused).
#: ``prepare_forward_train(x, layout, gamma, beta, eps, relu, running)``,
#: ``prepare_forward_infer(x, layout, running_mean, running_var, gamma, beta,
#: eps, relu)`` and ``prepare_backward(dy, x, layout, mean, invstd, gamma)``:
#: the fused forms planned once for arrays like these (kind, shape, strides,
#: dtype: the caller guarantees every later call passes arrays so described),
#: returning a call that skips re-deriving anything (the GPU backends:
#: launches recorded once per device, stream and thread, ``gpu/prepared.py``).
OPTIONAL_MEMBERS = ("forward_infer", "prepare_forward_train", "prepare_forward_infer", "prepare_backward")


def member_names() -> list[str]:
    """Every :class:`Backend` member, attributes first."""
    return list(Backend.__annotations__) + [n for n, v in vars(Backend).items()
                                            if callable(v) and not n.startswith("_")]


def missing_members(module) -> list[str]:
    """The :class:`Backend` members ``module`` lacks (empty when it is one)."""
    return [n for n in member_names() if not hasattr(module, n)]
