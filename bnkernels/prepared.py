"""Prepared calls: batch norm planned once for a description of its
arguments, then executed many times (cuDNN's plan/execute, for training
loops).

``prepare_forward(x, gamma, beta, running_mean, running_var, ...)`` checks
everything ``bn_forward`` checks, once, and returns a
:class:`PreparedForward`; calling it with arrays described alike (kind,
shape, strides, dtype: :func:`describe`) runs the forward without
resolving the backend, re-deriving the layout or re-checking the options.
On a GPU backend the launches are recorded once per device, stream and
host thread (``backends/gpu/prepared.py``): a call binds its arrays,
allocates its outputs and launches. ``prepare_backward`` does the same for
``bn_backward``. ``bn_forward`` and ``bn_backward`` themselves keep such
calls for the argument descriptions they meet on a GPU backend
(``call_cache.py``).

What a call still checks: that each array is described as the one it was
prepared for (a clear ``ValueError`` naming the argument otherwise), the
running factor of a cumulative average, and that nothing written (the
running statistics) overlaps anything read, from the arrays' addresses
(an overlap found there gets ``bn_forward``'s own check and message). A
call runs on the GPU device of its x and the stream current at the call.
"""
from __future__ import annotations

from . import engine
from .call_cache import describe
from . import validation as v
from .batch_norm import SavedStats, _check_backward, _check_forward, check_forward_aliasing


def _show(desc) -> str:
    if desc is None:
        return "None"
    kind, shape, strides, dtype = desc[:4]
    where = "" if len(desc) == 4 else " on the GPU" if desc[4] else " on the CPU"
    if len(desc) > 5 and desc[5]:
        where += ", requiring grad"
    return (f"{kind.__module__.split('.')[0]}.{kind.__name__} of shape {tuple(shape)}, strides {strides} and "
            f"dtype {dtype}{where}")


def _descriptions(names, arrays) -> tuple:
    out = []
    for name, a in zip(names, arrays):
        if a is not None and not hasattr(a, "shape"):
            raise TypeError(f"a prepared call takes arrays: {name} is a {type(a).__name__}")
        out.append(describe(a))
    return tuple(out)


class _Prepared:
    """What both prepared calls share: the argument descriptions, and the
    byte ranges of the arrays relative to their addresses."""

    def __init__(self, names, arrays, written=()):
        self._names = names
        self._descriptions = _descriptions(names, arrays)
        # byte ranges relative to each array's address (fixed by its description), of the
        # arrays that have bytes; per (written w, other i) the interval d = p_w - p_i must
        # fall in for their ranges to meet: lo_i - hi_w < d < hi_i - lo_w
        extents = {i: v.extent_offsets(a) for i, a in enumerate(arrays) if a is not None and _addressable(a)}
        extents = {i: e for i, e in extents.items() if e[1] > e[0]}
        written = [i for i, n in enumerate(names) if n in written and i in extents]
        self._pairs = [(w, i, extents[i][0] - extents[w][1], extents[i][1] - extents[w][0])
                       for w in written for i in extents if i != w]
        self._involved = sorted({i for pair in self._pairs for i in pair[:2]})

    def _check(self, arrays) -> None:
        for name, a, desc in zip(self._names, arrays, self._descriptions):
            got = describe(a)
            if got != desc:
                raise ValueError(f"{name} is a {_show(got)}, but this call was prepared for a {_show(desc)}: "
                                 "prepare another call for it")

    def _may_overlap(self, arrays) -> bool:
        """Whether a written array's bytes may overlap another array's
        (by address ranges: conservative for interleaved views)."""
        if not self._pairs:
            return False
        pointer = {i: v.data_pointer(arrays[i]) for i in self._involved}
        for w, i, lo, hi in self._pairs:
            if lo < pointer[w] - pointer[i] < hi:
                return True
        return False


def _addressable(a) -> bool:
    """Whether :func:`validation.data_pointer` reads ``a`` (an array, not
    a list made into one)."""
    return v.is_torch(a) or hasattr(a, "__array_interface__") or hasattr(
        a, "__cuda_array_interface__")


class PreparedForward(_Prepared):
    """A forward prepared by :func:`prepare_forward`.

    ``call(x, gamma=None, beta=None, running_mean=None, running_var=None,
    num_batches_tracked=None, *, residual=None)`` returns ``(y,
    SavedStats)`` as ``bn_forward(..., return_saved=True)`` would
    (training: the running statistics are updated in place).
    """

    _NAMES = ("x", "gamma", "beta", "running_mean", "running_var", "residual")

    def __init__(self, checked, given: tuple):
        c = checked
        self.training = c.training
        super().__init__(self._NAMES, given, written=("running_mean", "running_var") if c.training else ())
        self._impl, self._momentum = c.impl, c.momentum
        self._uses_running = c.running_mean is not None and c.layout.count > 0  # an empty batch updates nothing
        # the arrays as given, as later calls will pass them (not as validation converted them)
        x, gamma, beta, running_mean, running_var, residual = given
        extra = {} if residual is None else {"residual": residual}
        if c.training:
            running = (running_mean, running_var, c.factor) if self._uses_running else None
            self._call = engine.prepare_forward_train(c.impl, x, c.layout, gamma, beta, c.eps, c.relu, running,
                                                      **extra)
        else:
            self._call = engine.prepare_forward_infer(c.impl, x, c.layout, running_mean, running_var, gamma, beta,
                                                      c.eps, c.relu, **extra)

    def __call__(self, x, gamma=None, beta=None, running_mean=None, running_var=None, num_batches_tracked=None, *,
                 residual=None):
        arrays = (x, gamma, beta, running_mean, running_var, residual)
        self._check(arrays)
        return self.run(arrays, num_batches_tracked)

    def run(self, arrays: tuple, num_batches_tracked=None):
        """The call on arrays known to be described as prepared."""
        x, gamma, beta, running_mean, running_var, residual = arrays
        extra = () if residual is None else (residual,)
        if not self.training:
            v.running_factor(self._momentum, num_batches_tracked, used=False)  # checked all the same
            y, mean, invstd = self._call(x, running_mean, running_var, gamma, beta, *extra)
            return y, SavedStats(mean, invstd)
        factor = v.running_factor(self._momentum, num_batches_tracked, used=running_mean is not None)
        if self._may_overlap(arrays):
            self._check_aliasing(arrays)
        running = (running_mean, running_var, factor) if self._uses_running else None
        y, mean, invstd = self._call(x, gamma, beta, running, *extra)
        return y, SavedStats(mean, invstd)

    def _check_aliasing(self, arrays):
        given = dict(zip(self._NAMES, arrays))
        converted = {n: None if a is None else self._impl.asarray(a) for n, a in given.items()}
        check_forward_aliasing(converted, given, training=True)


class PreparedBackward(_Prepared):
    """A backward prepared by :func:`prepare_backward`.

    ``call(dy, x, saved_mean, saved_invstd, gamma=None)`` returns ``(dx,
    dgamma, dbeta)`` as ``bn_backward`` would (nothing given is written).
    """

    _NAMES = ("dy", "x", "saved_mean", "saved_invstd", "gamma")

    def __init__(self, checked, given: tuple):
        super().__init__(self._NAMES, given)
        c = checked
        self._call = engine.prepare_backward(c.impl, *given[:2], c.layout, *given[2:])

    def __call__(self, dy, x, saved_mean, saved_invstd, gamma=None):
        arrays = (dy, x, saved_mean, saved_invstd, gamma)
        self._check(arrays)
        return self.run(arrays)

    def run(self, arrays: tuple):
        """The call on arrays known to be described as prepared."""
        return self._call(*arrays)


def prepare_forward(x, gamma=None, beta=None, running_mean=None, running_var=None, *, training=True,
                    momentum=0.1, eps=1e-5, axis=1, activation=None, backend="auto",
                    residual=None) -> PreparedForward:
    """A forward prepared for arrays like these (see the module docstring);
    arguments as ``bn_forward``'s, all checked now (nothing is computed or
    updated). ``training=False`` prepares inference (running statistics
    required); a ``residual`` prepares calls that each pass one."""
    checked = _check_forward(x, gamma, beta, running_mean, running_var, training, momentum, eps, axis, activation,
                             backend, None if momentum is not None else 0, None, residual)
    return forward_from_checked(checked, (x, gamma, beta, running_mean, running_var, residual))


def forward_from_checked(checked, given: tuple) -> PreparedForward:
    """A :class:`PreparedForward` from ``batch_norm._check_forward``'s
    result and the arrays as given (the call cache's entry point)."""
    if checked.training:
        v.check_training_count(checked.layout)
    elif checked.running_mean is None:
        raise ValueError("inference (training=False) normalizes with the running statistics: "
                         "pass running_mean and running_var")
    return PreparedForward(checked, given)


def prepare_backward(dy, x, saved_mean, saved_invstd, gamma=None, *, axis=1, backend="auto") -> PreparedBackward:
    """A backward prepared for arrays like these; arguments as
    ``bn_backward``'s, all checked now."""
    checked = _check_backward(dy, x, saved_mean, saved_invstd, gamma, axis, backend, None)
    return PreparedBackward(checked, (dy, x, saved_mean, saved_invstd, gamma))
