"""Prepared calls: batch norm planned once for a description of its
arguments, then executed many times (cuDNN's plan/execute, for training
loops).

``prepare_forward(x, gamma, beta, running_mean, running_var, ...)`` checks
everything ``bn_forward`` checks, once, and returns a
:class:`PreparedForward`; calling it with arrays of the same kind, shape and
dtype runs a training forward without resolving the backend, re-deriving
the layout or re-checking the options. On a GPU backend the launches are
bound once (``backends/gpu/plans.Program``): a call wraps its arrays,
allocates y, mean and invstd, and launches. ``prepare_backward`` does the
same for ``bn_backward``.

What a call still checks: that each array has the kind, shape and dtype it
was prepared for (a clear ``ValueError`` naming the argument otherwise),
and, whenever an array is not the one of the previous call, that nothing
written (the running statistics) overlaps anything read. A prepared call
runs on the GPU device and stream current when it was prepared.
"""
from __future__ import annotations

from . import engine
from . import validation as v
from .batch_norm import SavedStats, _check_backward, _check_forward, check_forward_aliasing


def _signature(a):
    """What a prepared call compares: kind, shape, dtype (None for None)."""
    return None if a is None else (type(a), tuple(a.shape), getattr(a, "dtype", None))


def _describe(sig) -> str:
    if sig is None:
        return "None"
    kind, shape, dtype = sig
    return f"{kind.__module__.split('.')[0]}.{kind.__name__} of shape {shape} and dtype {dtype}"


class _Prepared:
    """What both prepared calls share: the argument signatures and the
    identity of the arrays whose aliasing was last checked."""

    def __init__(self, names, given):
        self._names = names
        self._signatures = {n: _signature(given[n]) for n in names}
        self._checked = tuple(id(given[n]) for n in names)

    def _check(self, given: dict, check_aliasing) -> None:
        for name in self._names:
            sig = _signature(given[name])
            if sig != self._signatures[name]:
                raise ValueError(f"{name} is a {_describe(sig)}, but this call was prepared for a "
                                 f"{_describe(self._signatures[name])}: prepare another call for it")
        ids = tuple(id(given[n]) for n in self._names)
        if ids != self._checked:
            check_aliasing()
            self._checked = ids


class PreparedForward(_Prepared):
    """A training forward prepared by :func:`prepare_forward`.

    ``call(x, gamma=None, beta=None, running_mean=None, running_var=None,
    num_batches_tracked=None)`` returns ``(y, SavedStats)`` as
    ``bn_forward(..., training=True, return_saved=True)`` would; the
    running statistics are updated in place.
    """

    _NAMES = ("x", "gamma", "beta", "running_mean", "running_var")

    def __init__(self, checked, given):
        super().__init__(self._NAMES, given)
        c = checked
        self._impl, self._momentum = c.impl, c.momentum
        running = None if c.running_mean is None else (c.running_mean, c.running_var, c.factor)
        self._call = engine.prepare_forward_train(c.impl, c.x, c.layout, c.gamma, c.beta, c.eps, c.relu, running)

    def __call__(self, x, gamma=None, beta=None, running_mean=None, running_var=None, num_batches_tracked=None):
        given = {"x": x, "gamma": gamma, "beta": beta, "running_mean": running_mean, "running_var": running_var}
        self._check(given, lambda: self._check_aliasing(given))
        a = self._impl.asarray
        running = None
        if running_mean is not None:
            factor = v.running_factor(self._momentum, num_batches_tracked, used=True)
            running = (a(running_mean), a(running_var), factor)
        y, mean, invstd = self._call(a(x), None if gamma is None else a(gamma), None if beta is None else a(beta),
                                     running)
        return y, SavedStats(mean, invstd)

    def _check_aliasing(self, given):
        arrays = {n: None if a is None else self._impl.asarray(a) for n, a in given.items()}
        check_forward_aliasing(arrays, given, training=True)


class PreparedBackward(_Prepared):
    """A backward prepared by :func:`prepare_backward`.

    ``call(dy, x, saved_mean, saved_invstd, gamma=None)`` returns ``(dx,
    dgamma, dbeta)`` as ``bn_backward`` would.
    """

    _NAMES = ("dy", "x", "saved_mean", "saved_invstd", "gamma")

    def __init__(self, checked, given):
        super().__init__(self._NAMES, given)
        c = checked
        self._impl = c.impl
        self._call = engine.prepare_backward(c.impl, c.dy, c.x, c.layout, c.saved_mean, c.saved_invstd, c.gamma)

    def __call__(self, dy, x, saved_mean, saved_invstd, gamma=None):
        given = {"dy": dy, "x": x, "saved_mean": saved_mean, "saved_invstd": saved_invstd, "gamma": gamma}
        self._check(given, lambda: None)  # nothing given is written: dx is new
        a = self._impl.asarray
        return self._call(a(dy), a(x), a(saved_mean), a(saved_invstd), None if gamma is None else a(gamma))


def prepare_forward(x, gamma=None, beta=None, running_mean=None, running_var=None, *, momentum=0.1, eps=1e-5,
                    axis=1, activation=None, backend="auto") -> PreparedForward:
    """A training forward prepared for arrays like these (see the module
    docstring); arguments as ``bn_forward``'s, all checked now (nothing is
    computed or updated)."""
    checked = _check_forward(x, gamma, beta, running_mean, running_var, True, momentum, eps, axis, activation,
                             backend, None if momentum is not None else 0, None)
    v.check_training_count(checked.layout)
    given = {"x": x, "gamma": gamma, "beta": beta, "running_mean": running_mean, "running_var": running_var}
    return PreparedForward(checked, given)


def prepare_backward(dy, x, saved_mean, saved_invstd, gamma=None, *, axis=1, backend="auto") -> PreparedBackward:
    """A backward prepared for arrays like these; arguments as
    ``bn_backward``'s, all checked now."""
    checked = _check_backward(dy, x, saved_mean, saved_invstd, gamma, axis, backend, None)
    given = {"dy": dy, "x": x, "saved_mean": saved_mean, "saved_invstd": saved_invstd, "gamma": gamma}
    return PreparedBackward(checked, given)
