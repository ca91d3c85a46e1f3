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

For the prepared calls (``prepared.py``):

- ``context(x)``: where a call on the caller's array x runs now (hashable:
  devices and stream), None for host data or while the stream is captured
  into a CUDA graph; ``needs_entering(dev)``: whether a replay must make
  dev's device and stream current;
- ``direct(a, dtype)``: whether the caller's array can go to a kernel as it
  is; ``kernel_array(a)``: it as a kernel argument (no copy);
- ``shaped_outputs``: whether results are allocated in x's shape (kernels
  that take pointers) rather than flat.

Every member takes and returns what ``interface.Backend`` says.
"""
from __future__ import annotations

import numpy as np

from ...validation import compute_dtype
from ..coefficients import dx_coefficients, update_running
from ..interface import OPTIONAL_MEMBERS, ChannelLayout, GradSums, Moments, Normalization, member_names
from ..outputs import deliver
from . import plans, prepared
from .operand import Operand

__all__ = ["GpuBackend", "Operand"]  # Operand: where the adapters' tests look for it


def _stats_dtype(*ops) -> np.dtype:
    """``plans.stats_dtype`` of operands."""
    return plans.stats_dtype(*(op.dtype for op in ops))


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
        dtype = plans.saved_dtype(ops[0].dtype, ops[1].dtype)
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

    def normalize(self, x, layout: ChannelLayout, norm: Normalization, relu: bool, out=None, residual=None):
        """Kernel: apply (apply_residual with a residual)."""
        x, dev = self._start(x)
        with dev:
            coeffs = {"k": norm.k, "scale": norm.scale, "shift": norm.shift}
            y = plans.run_apply(dev, self.arrays.flat(x, dev), layout, coeffs, relu, self._flat(residual, dev))
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
                       out=None, frozen: bool = False, grads: GradSums | None = None):
        """Kernel: dx, with coefficients from the host (float64)."""
        x, dev = self._start(x)
        with dev:
            A = self.arrays
            acc = compute_dtype(x.dtype)
            a, b, c = dx_coefficients(sums.sum_dy, sums.sum_dy_xhat, count, self._host(invstd, dev),
                                      self._host(gamma, dev), frozen)
            coeffs = {n: A.to_device(np.asarray(v, acc), dev)
                      for n, v in zip(plans.BWD_OUTPUTS[1], (self._host(mean, dev), a, b, c))}
            dx = plans.run_dx(dev, A.flat(A.operand(dy), dev), A.flat(x, dev), layout, coeffs)
            g = sums if grads is None else grads
            grads = (A.to_device(np.asarray(s, acc), dev) for s in (g.sum_dy_xhat, g.sum_dy))
            return (deliver(A.result(x, dx.reshape(layout.shape), dev), out), *self._result(x, dev, *grads))

    # --- fused forms ----------------------------------------------------------

    def _flat(self, a, dev):
        """An optional array like x (the residual) flat on dev, or None."""
        return None if a is None else self.arrays.flat(self.arrays.operand(a), dev)

    def relu_backward(self, dy, y):
        """Kernel: relu_backward."""
        dy, dev = self._start(dy)
        with dev:
            A = self.arrays
            g = plans.run_relu_backward(dev, A.flat(dy, dev), A.flat(A.operand(y), dev))
            return A.result(dy, g.reshape(tuple(dy.shape)), dev)

    def forward_train(self, x, layout: ChannelLayout, gamma, beta, eps: float, relu: bool, running, out=None,
                      residual=None):
        """Kernels: stats (finalize fused) + apply: 2 reads and 1 write of x
        (and 1 read of the residual)."""
        x, dev = self._start(x)
        with dev:
            A = self.arrays
            g, b = self._vectors(dev, compute_dtype(x.dtype), gamma, beta)
            run, back = self._running(running, dev) if running is not None else (None, [])
            y, stats = plans.run_forward_train(dev, A.flat(x, dev), layout, g, b, run, eps, relu,
                                               self._flat(residual, dev))
            for op, d in back:
                A.write_back(op, d, dev)
            y = deliver(A.result(x, y.reshape(layout.shape), dev), out)
            return (y, *self._result(x, dev, stats["mean"], stats["invstd"]))

    def forward_infer(self, x, layout: ChannelLayout, running_mean, running_var, gamma, beta, eps: float,
                      relu: bool, out=None, residual=None):
        """Kernels: infer_coeffs (scale and shift in the workspace) + apply:
        1 read and 1 write of x."""
        x, dev = self._start(x)
        with dev:
            A = self.arrays
            g, b = self._vectors(dev, compute_dtype(x.dtype), gamma, beta)
            rm, rv = self._stats_pair(dev, running_mean, running_var)
            y, out_ = plans.run_forward_infer(dev, A.flat(x, dev), layout, rm, rv, g, b, eps, relu,
                                              self._flat(residual, dev))
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

    # --- prepared forms (plan once, execute many times: ``prepared.py``) -------

    def prepare_forward_train(self, x, layout: ChannelLayout, gamma, beta, eps: float, relu: bool, running,
                              residual=None):
        """:meth:`forward_train` for arrays like these, recorded once per
        context: ``call(x, gamma, beta, running, residual=None) -> (y, mean,
        invstd)``."""
        return prepared.forward_train(self, x, layout, gamma, beta, eps, relu, running, residual)

    def prepare_forward_infer(self, x, layout: ChannelLayout, running_mean, running_var, gamma, beta, eps: float,
                              relu: bool, residual=None):
        """:meth:`forward_infer` likewise: ``call(x, running_mean,
        running_var, gamma, beta, residual=None) -> (y, mean, invstd)``."""
        return prepared.forward_infer(self, x, layout, running_mean, running_var, gamma, beta, eps, relu,
                                      residual)

    def prepare_backward(self, dy, x, layout: ChannelLayout, mean, invstd, gamma):
        """:meth:`backward` likewise: ``call(dy, x, mean, invstd, gamma) ->
        (dx, dgamma, dbeta)``."""
        return prepared.backward(self, dy, x, layout, mean, invstd, gamma)

    def members(self) -> dict:
        """The module-level names of a backend module: every
        ``interface.Backend`` member but ``name`` (the module's own), and the
        optional ones."""
        names = [n for n in member_names() if n != "name"] + list(OPTIONAL_MEMBERS)
        return {name: getattr(self, name) for name in names}
