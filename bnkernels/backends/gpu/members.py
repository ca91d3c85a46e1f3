"""The ``interface.Backend`` members of both GPU backends, written once on
top of the launch sequences of ``plans`` and an *arrays* adapter, the one
thing each backend writes itself (``cupy_backend``, ``numba_cuda``):

- ``operand(x)``: the backend's wrapper of an argument (``Operand``), no copy;
- ``device(x_op)``: the plans' device (allocation, counters, launches) on
  the stream where work on x's kind of array belongs;
- ``flat(op, dev, dtype=None)``: a C-contiguous device array of op's data,
  flat (a copy only when needed); ``vector(op, dev, dtype)``: the same for
  a (C,) vector, None for None;
- ``result(x_op, a, dev)``: a device array as the kind of array the caller
  gave for x; ``to_host(a, dev)``, ``to_device(host, dev)``;
- ``write_back(op, a, dev)``: store ``a`` (a device or host array of op's
  shape) into the caller's memory behind ``op``;
- ``contiguous(op)``: whether op's device array is C-contiguous (a flat
  view of it is its memory, no copy).

Every member takes and returns what ``interface.Backend`` says.
"""
from __future__ import annotations

import numpy as np

from ...validation import compute_dtype
from ..coefficients import dx_coefficients, update_running
from ..interface import OPTIONAL_MEMBERS, ChannelLayout, GradSums, Moments, Normalization, member_names
from ..outputs import deliver
from . import plans


class Operand:
    """An argument as a GPU backend sees it: ``kind`` (``"numpy"`` for host
    data, else the library of the device array: ``"cupy"``, ``"numba"``,
    ``"torch"``, ``"cai"``), what the caller passed (``source``) and either
    its ``host`` NumPy array or its ``device`` array (the backend's kind)."""

    def __init__(self, kind: str, source, host=None, device=None):
        self.kind, self.source, self.host, self.device = kind, source, host, device

    @property
    def is_host(self) -> bool:
        return self.host is not None

    @property
    def array(self):
        return self.host if self.host is not None else self.device

    @property
    def shape(self):
        return self.array.shape

    @property
    def dtype(self):
        return self.array.dtype


def _stats_dtype(*ops) -> np.dtype:
    """The one dtype the kernels take for a pair of per-channel statistics
    (running, or mean and variance): float64 if either is, else float32."""
    return np.dtype(np.float64 if any(op.dtype == np.float64 for op in ops) else np.float32)


class GpuBackend:
    """The members, for one backend's arrays adapter."""

    def __init__(self, arrays):
        self.arrays = arrays

    def asarray(self, x):
        """Wrap an argument without copying anything to or from the device."""
        return self.arrays.operand(x)

    def _start(self, x):
        x = self.arrays.operand(x)
        return x, self.arrays.device(x)

    def _vectors(self, dev, dtype, *vectors):
        A = self.arrays
        return tuple(None if v is None else A.vector(A.operand(v), dev, dtype) for v in vectors)

    def _host(self, v, dev):
        return None if v is None else np.asarray(self.arrays.to_host(self.arrays.operand(v).array, dev),
                                                 np.float64)

    def _saved(self, dev, mean, invstd):
        """The saved statistics as the kernels read them: in their own dtype
        when both are float32 or both float64 (what the forward returns: no
        cast), else both float64."""
        A = self.arrays
        ops = [A.operand(mean), A.operand(invstd)]
        same = ops[0].dtype == ops[1].dtype and ops[0].dtype in (np.float32, np.float64)
        dtype = ops[0].dtype if same else np.dtype(np.float64)
        return tuple(A.vector(op, dev, dtype) for op in ops)

    def _stats_pair(self, dev, mean, var):
        """Read-only per-channel statistics (running mean and variance) on
        the device, in :func:`_stats_dtype`."""
        ops = [self.arrays.operand(mean), self.arrays.operand(var)]
        dtype = _stats_dtype(*ops)
        return tuple(self.arrays.vector(op, dev, dtype) for op in ops)

    def _result(self, x, dev, *arrays):
        return tuple(self.arrays.result(x, a, dev) for a in arrays)

    def _running(self, running, dev):
        """Device running statistics of one dtype (what the kernels take),
        and the (operand, temporary) pairs to write back afterwards: host
        or mixed-dtype running statistics are updated through temporaries."""
        A = self.arrays
        ops = [A.operand(running[0]), A.operand(running[1])]
        dtype = _stats_dtype(*ops)
        devs, back = [], []
        for op in ops:
            d = A.vector(op, dev, dtype)
            if op.is_host or d is not op.device:
                back.append((op, d))
            devs.append(d)
        return (devs[0], devs[1], running[2]), back

    # --- stages ---------------------------------------------------------------

    def statistics(self, x, layout: ChannelLayout) -> Moments:
        """Kernel: stats (mean = k + (mean - k) formed in float64)."""
        if layout.count == 0 or layout.channels == 0:
            return Moments(layout.count, np.zeros(layout.channels), np.zeros(layout.channels))
        x, dev = self._start(x)
        with dev:
            # eps does not matter (only k, dmean and m2 are read); 1, so that
            # the kernel's invstd of a constant group is finite
            out = plans.run_stats(dev, self.arrays.flat(x, dev), layout, None, None, None, 1.0)
            k, dmean, m2 = (np.asarray(self.arrays.to_host(out[n], dev), np.float64)
                            for n in ("k", "dmean", "m2"))
            return Moments(layout.count, k + dmean, m2)

    def _finalize(self, x, dev, mean, var, gamma, beta, eps: float) -> Normalization:
        """Kernel: infer_coeffs from a (C,) mean and biased variance (device
        arrays of one dtype)."""
        acc = compute_dtype(x.dtype)
        g, b = self._vectors(dev, acc, gamma, beta)
        out = plans.run_finalize(dev, x.dtype, mean, var, g, b, eps)
        mean_out, invstd = self._result(x, dev, out["k"], out["invstd"])
        return Normalization(mean_out, invstd, out["k"], out["scale"], out["shift"])

    def finalize(self, x, layout: ChannelLayout, moments: Moments, gamma, beta, eps: float,
                 running) -> Normalization:
        """The batch mean and variance go to the device in float64; running
        statistics are updated on the host in float64 (a round trip of 2C
        values: this staged path runs between processes' exchanges)."""
        x, dev = self._start(x)
        with dev:
            mean = np.asarray(moments.mean, np.float64)
            m2 = np.asarray(moments.m2, np.float64)
            n = moments.count
            if running is not None:
                A = self.arrays
                ops = [A.operand(running[0]), A.operand(running[1])]
                host = [np.array(A.to_host(op.array, dev)) if not op.is_host else op.host for op in ops]
                with np.errstate(divide="ignore", invalid="ignore"):
                    update_running(host[0], host[1], mean, m2 / (n - 1), running[2])
                for op, h in zip(ops, host):
                    if not op.is_host:
                        A.write_back(op, h, dev)
            with np.errstate(divide="ignore", invalid="ignore"):
                var = m2 / n
            to_dev = self.arrays.to_device
            return self._finalize(x, dev, to_dev(mean, dev), to_dev(var, dev), gamma, beta, eps)

    def finalize_running(self, x, layout: ChannelLayout, running_mean, running_var, gamma, beta,
                         eps: float) -> Normalization:
        x, dev = self._start(x)
        with dev:
            return self._finalize(x, dev, *self._stats_pair(dev, running_mean, running_var), gamma, beta, eps)

    def normalize(self, x, layout: ChannelLayout, norm: Normalization, relu: bool, out=None):
        """Kernel: apply."""
        x, dev = self._start(x)
        with dev:
            coeffs = {"k": norm.k, "scale": norm.scale, "shift": norm.shift}
            y = plans.run_apply(dev, self.arrays.flat(x, dev), layout, coeffs, relu)
            return deliver(self.arrays.result(x, y.reshape(layout.shape), dev), out)

    def backward_reduce(self, dy, x, layout: ChannelLayout, mean, invstd) -> GradSums:
        """Kernel: bwd_reduce (its dx coefficients unused)."""
        x, dev = self._start(x)
        with dev:
            A = self.arrays
            m, s = self._saved(dev, mean, invstd)
            out = plans.run_bwd_reduce(dev, A.flat(A.operand(dy), dev), A.flat(x, dev), layout, None, m, s)
            sum_dy, sum_dy_xhat = (np.asarray(A.to_host(out[n], dev), np.float64) for n in ("dbeta", "dgamma"))
            return GradSums(sum_dy, sum_dy_xhat)

    def backward_apply(self, dy, x, layout: ChannelLayout, mean, invstd, gamma, sums: GradSums, count: int,
                       out=None):
        """Kernel: dx, with coefficients from the host (float64)."""
        x, dev = self._start(x)
        with dev:
            A = self.arrays
            acc = compute_dtype(x.dtype)
            a, b, c = dx_coefficients(sums.sum_dy, sums.sum_dy_xhat, count, self._host(invstd, dev),
                                      self._host(gamma, dev))
            coeffs = {n: A.to_device(np.asarray(v, acc), dev)
                      for n, v in zip(plans.BWD_OUTPUTS[1], (self._host(mean, dev), a, b, c))}
            dx = plans.run_dx(dev, A.flat(A.operand(dy), dev), A.flat(x, dev), layout, coeffs)
            grads = (A.to_device(np.asarray(s, acc), dev) for s in (sums.sum_dy_xhat, sums.sum_dy))
            return (deliver(A.result(x, dx.reshape(layout.shape), dev), out), *self._result(x, dev, *grads))

    # --- fused forms ----------------------------------------------------------

    def forward_train(self, x, layout: ChannelLayout, gamma, beta, eps: float, relu: bool, running, out=None):
        """Kernels: stats (finalize fused) + apply: 2 reads and 1 write of x."""
        x, dev = self._start(x)
        with dev:
            A = self.arrays
            g, b = self._vectors(dev, compute_dtype(x.dtype), gamma, beta)
            run, back = self._running(running, dev) if running is not None else (None, [])
            y, stats = plans.run_forward_train(dev, A.flat(x, dev), layout, g, b, run, eps, relu)
            for op, d in back:
                A.write_back(op, d, dev)
            y = deliver(A.result(x, y.reshape(layout.shape), dev), out)
            return (y, *self._result(x, dev, stats["mean"], stats["invstd"]))

    def forward_infer(self, x, layout: ChannelLayout, running_mean, running_var, gamma, beta, eps: float,
                      relu: bool, out=None):
        """Kernels: infer_coeffs (scale and shift in the workspace) + apply:
        1 read and 1 write of x."""
        x, dev = self._start(x)
        with dev:
            A = self.arrays
            g, b = self._vectors(dev, compute_dtype(x.dtype), gamma, beta)
            rm, rv = self._stats_pair(dev, running_mean, running_var)
            y, out_ = plans.run_forward_infer(dev, A.flat(x, dev), layout, rm, rv, g, b, eps, relu)
            y = deliver(A.result(x, y.reshape(layout.shape), dev), out)
            return (y, *self._result(x, dev, out_["k"], out_["invstd"]))

    def backward(self, dy, x, layout: ChannelLayout, mean, invstd, gamma, out=None):
        """Kernels: bwd_reduce (dx coefficients fused) + dx: 4 reads and 1 write."""
        x, dev = self._start(x)
        with dev:
            A = self.arrays
            g, = self._vectors(dev, compute_dtype(x.dtype), gamma)
            m, s = self._saved(dev, mean, invstd)
            dx, grads = plans.run_backward(dev, A.flat(A.operand(dy), dev), A.flat(x, dev), layout, g, m, s)
            dx = deliver(A.result(x, dx.reshape(layout.shape), dev), out)
            return (dx, *self._result(x, dev, grads["dgamma"], grads["dbeta"]))

    # --- prepared forms (plan once, execute many times) -------------------------

    def prepare_forward_train(self, x, layout: ChannelLayout, gamma, beta, eps: float, relu: bool, running):
        """:meth:`forward_train` for arrays like these, planned once: returns
        ``call(x, gamma, beta, running) -> (y, mean, invstd)``. The call runs
        on the device and stream current now; arrays of another kind, dtype
        or layout than these go through :meth:`forward_train` instead."""
        x, dev = self._start(x)
        A = self.arrays
        acc = compute_dtype(x.dtype)
        with dev:
            slots = {"x": plans.Slot("x", (layout.count * layout.channels,), x.dtype)}
            for name, v in (("gamma", gamma), ("beta", beta)):
                slots[name] = None if v is None else plans.Slot(name, (layout.channels,), acc)
            run = None
            if running is not None:
                rdt = _stats_dtype(A.operand(running[0]), A.operand(running[1]))
                slots["running_mean"], slots["running_var"] = (plans.Slot(n, (layout.channels,), rdt)
                                                               for n in ("running_mean", "running_var"))
                run = (slots["running_mean"], slots["running_var"], running[2])
            rec = plans.Recorder(dev)
            y, out = plans.run_forward_train(rec, slots["x"], layout, slots["gamma"], slots["beta"], run, eps, relu)
            program = plans.Program(rec)

        def call(x, gamma, beta, running):
            same_running = (running is None) == (run is None) and (running is None or running[2] == run[2])
            xo = A.operand(x)
            inputs = [(slots["x"], xo), (slots["gamma"], gamma), (slots["beta"], beta)]
            if running is not None and run is not None:
                inputs += [(slots["running_mean"], running[0]), (slots["running_var"], running[1])]
            arrays = self._bind_inputs(dev, inputs) if same_running else None
            if arrays is None:
                return self.forward_train(x, layout, gamma, beta, eps, relu, running)
            with dev:
                got = program(dev, arrays)
            return (A.result(xo, got[y].reshape(layout.shape), dev),
                    *self._result(xo, dev, got[out["mean"]], got[out["invstd"]]))

        return call

    def prepare_backward(self, dy, x, layout: ChannelLayout, mean, invstd, gamma):
        """:meth:`backward` planned once, as :meth:`prepare_forward_train`:
        returns ``call(dy, x, mean, invstd, gamma) -> (dx, dgamma, dbeta)``."""
        x, dev = self._start(x)
        A = self.arrays
        acc = compute_dtype(x.dtype)
        with dev:
            n = layout.count * layout.channels
            m, s = self._saved(dev, mean, invstd)
            slots = {"dy": plans.Slot("dy", (n,), x.dtype), "x": plans.Slot("x", (n,), x.dtype),
                     "mean": plans.Slot("mean", (layout.channels,), m.dtype),
                     "invstd": plans.Slot("invstd", (layout.channels,), s.dtype),
                     "gamma": None if gamma is None else plans.Slot("gamma", (layout.channels,), acc)}
            rec = plans.Recorder(dev)
            dx, out = plans.run_backward(rec, slots["dy"], slots["x"], layout, slots["gamma"], slots["mean"],
                                         slots["invstd"])
            program = plans.Program(rec)

        def call(dy, x, mean, invstd, gamma):
            xo = A.operand(x)
            arrays = self._bind_inputs(dev, [(slots["dy"], dy), (slots["x"], xo), (slots["mean"], mean),
                                             (slots["invstd"], invstd), (slots["gamma"], gamma)])
            if arrays is None:
                return self.backward(dy, x, layout, mean, invstd, gamma)
            with dev:
                got = program(dev, arrays)
            return (A.result(xo, got[dx].reshape(layout.shape), dev),
                    *self._result(xo, dev, got[out["dgamma"]], got[out["dbeta"]]))

        return call

    def _bind_inputs(self, dev, inputs):
        """``{slot: device array}`` for a prepared call's ``(slot, argument)``
        pairs (a slot is None where the plan has no such array), each the
        caller's own memory in the slot's dtype, flat; None when one would
        need a copy or is given where the plan has none (or the other way
        round): then the call takes the unprepared path."""
        A = self.arrays
        arrays = {}
        for slot, value in inputs:
            if (slot is None) != (value is None):
                return None
            if slot is None:
                continue
            op = A.operand(value)
            if op.is_host or op.dtype != slot.dtype or op.array.size != slot.size or not A.contiguous(op):
                return None
            arrays[slot] = A.flat(op, dev)  # a view: the caller's memory
        return arrays

    def members(self) -> dict:
        """The module-level names of a backend module: every
        ``interface.Backend`` member but ``name`` (the module's own), and the
        optional ones."""
        names = [n for n in member_names() if n != "name"] + list(OPTIONAL_MEMBERS)
        return {name: getattr(self, name) for name in names}
