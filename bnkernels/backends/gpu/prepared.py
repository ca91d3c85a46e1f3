"""Prepared calls of the GPU backends (the ``prepare_*`` members of
``members.GpuBackend``): a launch sequence of ``plans`` recorded once per
*context* and replayed, for arrays described alike.

The caller (``bnkernels.prepared``) guarantees that every call passes
arrays of the kind, shape, strides and dtype of the ones prepared for, so
nothing here re-checks them. What may differ from call to call is where
the call runs: x's device, the current device, the stream (CuPy's or
torch's current one) and the host thread. (A call while the stream is
being captured into a CUDA graph has no context: it runs the fused member,
whose counters and workspace are the captured call's own.) Those make the context (the
arrays adapter's ``context(x)`` and ``workspace.thread_number()``); each
context gets its own recording, since a recording binds that context's
counters and workspace (``workspace.py``: two streams or two threads must
never share them). A call then only looks its context up, binds its
arrays, allocates its outputs and launches.

Arrays are bound *directly* (the caller's memory, no wrapper, no copy: the
adapter's ``kernel_array``) when, at preparation, each one is a
C-contiguous device array in the dtype its kernel reads (the adapter's
``direct``). Otherwise (host data, a cast, a copy, running statistics
updated through temporaries) the prepared call runs the backend's fused
member each time, which handles all of that.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ...validation import compute_dtype
from ..interface import ChannelLayout
from . import plans
from .operand import Operand
from .workspace import thread_number

#: Recordings kept per prepared call (one per context; least recently used
#: dropped beyond this, e.g. by a program that keeps starting threads).
MAX_CONTEXTS = 16


class PreparedSequence:
    """One sequence prepared for arrays like ``arrays`` (call order, None
    where absent). ``specs``: per array its ``(name, shape, dtype)`` as the
    kernels read it, where shape None marks a scalar (bound per call as
    ``dtype(value)``: e.g. the running factor of a cumulative average); ``sequence(dev, *slots)`` runs ``plans``' sequence on a
    device (a ``Recorder`` here) and returns the output slots the call
    returns, the first of them shaped like x (``x_shape``); ``fallback``:
    the fused member, called with the call's arrays when they cannot be
    bound directly. ``x_index``: where x is among the arrays."""

    def __init__(self, backend, arrays, specs, sequence, fallback, x_index: int, x_shape):
        A = self._A = backend.arrays
        arrays = [a.source if isinstance(a, Operand) else a for a in arrays]  # as a call will pass them
        x = arrays[x_index]
        self._x_index, self._x_shape = x_index, tuple(x_shape)
        # the kind of x, which results come back as (the same at every call; no array kept:
        # a device x, since only those are bound directly)
        self._x_op = Operand(A.operand(x).kind, None)
        self._fallback, self._sequence = fallback, sequence
        self._slots = [None if a is None else plans.Slot(name, shape or (), dtype, scalar=shape is None)
                       for a, (name, shape, dtype) in zip(arrays, specs)]
        self.direct = A.context(x) is not None and all(
            a is None or slot.scalar or A.direct(a, slot.dtype) for a, slot in zip(arrays, self._slots))
        self._recordings: OrderedDict = OrderedDict()

    @property
    def contexts(self) -> int:
        """How many contexts have a recording now."""
        return len(self._recordings)

    def __call__(self, *arrays):
        if not self.direct:
            return self._fallback(*arrays)
        A = self._A
        where = A.context(arrays[self._x_index])
        if where is None:  # a stream being captured into a CUDA graph: no shared counters or workspace
            return self._fallback(*arrays)
        context = (where, thread_number())
        recording = self._recordings.get(context)
        if recording is None:
            recording = self._record(arrays[self._x_index], context)
        dev, program, results, enter = recording
        kernel_array = A.kernel_array
        bound = [(slot.dtype.type(a) if slot.scalar else kernel_array(a))
                 for slot, a in zip(self._slots, arrays) if slot is not None]
        if enter:
            with dev:
                got = program(dev, bound)
        else:
            got = program(dev, bound)
        first = got[results[0]]
        if not A.shaped_outputs:
            first = first.reshape(self._x_shape)
        x_op = self._x_op
        return (A.result(x_op, first, dev), *(A.result(x_op, got[p], dev) for p in results[1:]))

    def _record(self, x, context):
        A = self._A
        dev = A.device(A.operand(x))
        enter = A.needs_entering(dev)  # asked outside the device's context: as a call finds things
        with dev:
            rec = plans.Recorder(dev)
            results = self._sequence(rec, *self._slots)
            shapes = {results[0]: self._x_shape} if A.shaped_outputs else None
            program = plans.Program(rec, [s for s in self._slots if s is not None], shapes)
            recording = (dev, program, [program.position(r) for r in results], enter)
        self._recordings[context] = recording
        while len(self._recordings) > MAX_CONTEXTS:
            self._recordings.popitem(last=False)
        return recording


def _vector(name, C, dtype):
    return (name, (C,), dtype)


def _residual_kw(residual) -> dict:
    return {} if residual is None else {"residual": residual}


def forward_train(backend, x, layout: ChannelLayout, gamma, beta, eps: float, relu: bool, running, residual=None):
    """``call(x, gamma, beta, running, residual=None) -> (y, mean,
    invstd)``, ``running`` ``(running_mean, running_var, factor)`` or None
    as at preparation (the factor, a scalar slot, may change from call to
    call), a residual exactly when one was prepared for."""
    A = backend.arrays
    x_dtype = A.operand(x).dtype
    n, C, acc = layout.count * layout.channels, layout.channels, compute_dtype(x_dtype)
    rdt = None if running is None else plans.stats_dtype(A.operand(running[0]).dtype, A.operand(running[1]).dtype)
    specs = [("x", (n,), x_dtype), _vector("gamma", C, acc), _vector("beta", C, acc),
             _vector("running_mean", C, rdt), _vector("running_var", C, rdt), ("factor", None, np.float64),
             ("residual", (n,), x_dtype)]
    arrays = [x, gamma, beta, *(running if running is not None else (None, None, None)), residual]

    def sequence(dev, x, gamma, beta, rm, rv, factor, residual):
        y, out = plans.run_forward_train(dev, x, layout, gamma, beta, None if rm is None else (rm, rv, factor),
                                         eps, relu, residual)
        return y, out["mean"], out["invstd"]

    def fallback(x, gamma, beta, rm, rv, factor, residual):
        return backend.forward_train(x, layout, gamma, beta, eps, relu, None if rm is None else (rm, rv, factor),
                                     **_residual_kw(residual))

    seq = PreparedSequence(backend, arrays, specs, sequence, fallback, 0, layout.shape)

    def call(x, gamma, beta, running, residual=None):
        return seq(x, gamma, beta, *(running if running is not None else (None, None, None)), residual)

    call.sequence = seq
    return call


def forward_infer(backend, x, layout: ChannelLayout, running_mean, running_var, gamma, beta, eps: float,
                  relu: bool, residual=None):
    """``call(x, running_mean, running_var, gamma, beta, residual=None) ->
    (y, mean, invstd)``."""
    A = backend.arrays
    x_dtype = A.operand(x).dtype
    n, C, acc = layout.count * layout.channels, layout.channels, compute_dtype(x_dtype)
    rdt = plans.stats_dtype(A.operand(running_mean).dtype, A.operand(running_var).dtype)
    specs = [("x", (n,), x_dtype), _vector("running_mean", C, rdt), _vector("running_var", C, rdt),
             _vector("gamma", C, acc), _vector("beta", C, acc), ("residual", (n,), x_dtype)]

    def sequence(dev, x, rm, rv, gamma, beta, residual):
        y, out = plans.run_forward_infer(dev, x, layout, rm, rv, gamma, beta, eps, relu, residual)
        return y, out["k"], out["invstd"]

    def fallback(x, rm, rv, gamma, beta, residual):
        return backend.forward_infer(x, layout, rm, rv, gamma, beta, eps, relu, **_residual_kw(residual))

    seq = PreparedSequence(backend, [x, running_mean, running_var, gamma, beta, residual], specs, sequence,
                           fallback, 0, layout.shape)

    def call(x, running_mean, running_var, gamma, beta, residual=None):
        return seq(x, running_mean, running_var, gamma, beta, residual)

    call.sequence = seq
    return call


def backward(backend, dy, x, layout: ChannelLayout, mean, invstd, gamma):
    """``call(dy, x, mean, invstd, gamma) -> (dx, dgamma, dbeta)``: the
    saved statistics are read in their own dtype when both are float32 or
    both float64 (what the forward returns), else through the fallback."""
    A = backend.arrays
    x_dtype = A.operand(x).dtype
    n, C, acc = layout.count * layout.channels, layout.channels, compute_dtype(x_dtype)
    sdt = plans.saved_dtype(A.operand(mean).dtype, A.operand(invstd).dtype)
    specs = [("dy", (n,), x_dtype), ("x", (n,), x_dtype), _vector("mean", C, sdt),
             _vector("invstd", C, sdt), _vector("gamma", C, acc)]

    def sequence(dev, dy, x, mean, invstd, gamma):
        dx, out = plans.run_backward(dev, dy, x, layout, gamma, mean, invstd)
        return dx, out["dgamma"], out["dbeta"]

    def fallback(dy, x, mean, invstd, gamma):
        return backend.backward(dy, x, layout, mean, invstd, gamma)

    return PreparedSequence(backend, [dy, x, mean, invstd, gamma], specs, sequence, fallback, 1, layout.shape)
