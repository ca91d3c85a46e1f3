"""The ``numba-cuda`` backend: Numba CUDA kernels (``kernels.py``) launched
with plans from ``bnkernels/backends/launch.py``.

Arrays:

- GPU arrays (CuPy, Numba device arrays, torch CUDA tensors, anything with
  ``__cuda_array_interface__``) are used in place, without a copy, when they
  are C-contiguous; results come back as the same kind of array (CuPy in,
  CuPy out; Numba in, Numba out; torch in, torch out). Non-contiguous CuPy
  and torch arrays are made contiguous on the device; other non-contiguous
  device arrays take a (slow) round trip through the host.
- NumPy input is copied to the device and the results copied back: a
  convenience path, slow for real work. Running statistics given as host
  arrays are still updated in place.

Streams: work on CuPy arrays is queued on CuPy's current stream, on torch
tensors on torch's current stream, otherwise on Numba's default stream. GPU
results are returned without synchronizing (as any CUDA library would);
host results are synchronized by the copy back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from numba import cuda

from ...validation import ChannelLayout, compute_dtype
from .. import launch
from ..outputs import deliver
from .kernels import get_kernels

name = "numba-cuda"

#: Launch-formula knobs (see ``launch.Tuning``); tests shrink the blocks so
#: that the CUDA simulator stays fast.
TUNING = launch.Tuning()

_ACC = {np.dtype(np.float32): numba.float32, np.dtype(np.float64): numba.float64}


@dataclass
class Operand:
    """An argument as this backend sees it: where it lives and what kind of
    array the caller used (so results can be returned as the same kind)."""

    kind: str  # "numpy", "numba", "cupy", "torch" or "cai"
    source: object  # what the caller passed
    device: object = None  # numba DeviceNDArray (None for host arrays until needed)
    host: np.ndarray | None = None

    @property
    def shape(self):
        return (self.host if self.host is not None else self.device).shape

    @property
    def dtype(self):
        return (self.host if self.host is not None else self.device).dtype


def _kind(x) -> str:
    module = type(x).__module__.split(".")[0]
    if module == "cupy":
        return "cupy"
    if module == "torch":
        return "torch"
    if cuda.devicearray.is_cuda_ndarray(x):
        return "numba"
    if hasattr(x, "__cuda_array_interface__"):
        return "cai"
    return "numpy"


def asarray(x) -> Operand:
    """Wrap an argument without copying anything to or from the device."""
    if isinstance(x, Operand):
        return x
    kind = _kind(x)
    if kind == "numpy":
        return Operand(kind, x, host=np.asarray(x))
    if kind == "cupy" and not x.flags.c_contiguous:
        import cupy
        x = cupy.ascontiguousarray(x)
    elif kind == "torch":
        x = x.detach().contiguous()
    return Operand(kind, x, device=x if kind == "numba" else cuda.as_cuda_array(x))


def _stream(x: Operand):
    if x.kind == "cupy":
        import cupy
        return cuda.external_stream(cupy.cuda.get_current_stream().ptr)
    if x.kind == "torch":
        import torch
        return cuda.external_stream(torch.cuda.current_stream().cuda_stream)
    return cuda.default_stream()


def _to_device(x, stream, dtype=None):
    """A C-contiguous device array of x's data (flat views share memory)."""
    x = asarray(x)
    if x.host is not None:
        host = np.ascontiguousarray(x.host, dtype=dtype)
        return cuda.to_device(host, stream=stream)
    dev = x.device
    if not dev.is_c_contiguous():  # rare: non-contiguous Numba/CAI arrays
        dev = cuda.to_device(np.ascontiguousarray(dev.copy_to_host(stream=stream)), stream=stream)
    return dev


def _param(p: Operand | None, stream):
    """A per-channel parameter on the device, or a 1-element dummy."""
    if p is None:
        return cuda.to_device(np.zeros(1, np.float32), stream=stream), 0
    return _to_device(p, stream), 1


def _like(x: Operand, dev, stream):
    """Return a device result as the kind of array the caller used."""
    if x.kind == "numpy":
        return dev.copy_to_host(stream=stream)
    if x.kind == "cupy":
        import cupy
        return cupy.asarray(dev)
    if x.kind == "torch":
        import torch
        return torch.as_tensor(dev, device="cuda")
    return dev


def _limits():
    return launch.DeviceLimits.from_device(cuda.get_current_device())


_counters: dict = {}


def _counters_for(groups: int, stream):
    """Zeroed int32 counters for the last-block merge, cached per context
    and stream; the kernels leave them zero again after each launch."""
    handle = getattr(stream, "handle", None)
    key = (id(cuda.current_context()), getattr(handle, "value", handle) or 0)
    cur = _counters.get(key)
    if cur is None or cur.size < groups:
        cur = cuda.to_device(np.zeros(max(groups, 64), np.int32), stream=stream)
        _counters[key] = cur
    return cur


POISON_ENV = launch.POISON_ENV


def _empty(shape, dtype, stream):
    """An uninitialized device buffer; with ``BNKERNELS_POISON=1`` it is
    filled with NaN instead, so an element no kernel writes shows up (the
    tests run this way)."""
    if launch.poison_requested():
        return cuda.to_device(np.full(shape, np.nan, dtype), stream=stream)
    return cuda.device_array(shape, dtype=dtype, stream=stream)


def _reduce_launch(layout: ChannelLayout, acc_dtype, stream, n_stages: int):
    """The plan, ``n_stages`` (C, splits) staging buffers and the counters."""
    plan = launch.reduce_plan(layout.outer, layout.channels, layout.inner, _limits(), TUNING)
    stages = [_empty((layout.channels, plan.splits), acc_dtype, stream) for _ in range(n_stages)]
    return plan, stages, _counters_for(plan.groups, stream)


def _elementwise_launch(total):
    return launch.elementwise_plan(total, _limits(), TUNING)


def _run_stats(x: Operand, layout: ChannelLayout, gamma, beta, eps: float, running, stream):
    """Launch stats_{planes,rows}. Returns the flat device input and the
    per-channel device arrays k, scale, shift, mean, invstd, dmean, m2."""
    cdt = compute_dtype(x.dtype)
    kernels = get_kernels(_ACC[cdt])
    C, n = layout.channels, layout.count
    xd = _to_device(x, stream).reshape(-1)
    out = [_empty(C, cdt, stream) for _ in range(7)]
    if C:
        g, has_g = _param(gamma, stream)
        b, has_b = _param(beta, stream)
        if running is not None:
            rm_op, rv_op, factor = asarray(running[0]), asarray(running[1]), running[2]
            rm, rv = _to_device(rm_op, stream), _to_device(rv_op, stream)
        else:
            rm = rv = _empty(1, np.float32, stream)
            factor = 0.0
        plan, stages, counters = _reduce_launch(layout, cdt, stream, 3)  # count, mean, m2
        kernel = kernels.stats_rows if layout.inner == 1 else kernels.stats_planes
        kernel[plan.grid, plan.block, stream](
            xd, layout.outer, C, layout.inner, 1.0 / n, n / (n - 1) if n > 1 else 0.0, eps, factor,
            has_g, has_b,
            int(running is not None), g, b, rm, rv, *out, *stages, counters)
        if running is not None:
            for op, dev in ((rm_op, rm), (rv_op, rv)):
                if op.host is not None:  # host running stats are still updated in place
                    dev.copy_to_host(op.host, stream=stream)
    return xd, out


def forward_train(x: Operand, layout: ChannelLayout, gamma, beta, eps: float, relu: bool, running, out=None):
    """See ``numpy_backend.forward_train``; kernels: stats_{planes,rows} + apply
    (2 reads and 1 write of x)."""
    stream = _stream(x)
    xd, (kk, scale, shift, mean, invstd, _, _) = _run_stats(x, layout, gamma, beta, eps, running, stream)
    y = _empty(xd.shape, x.dtype, stream)
    if xd.size:
        ep = _elementwise_launch(xd.size)
        get_kernels(_ACC[compute_dtype(x.dtype)]).apply[ep.grid, ep.block, stream](
            xd, y, layout.channels, layout.inner, kk, scale, shift, int(relu))
    return deliver(_like(x, y.reshape(layout.shape), stream), out), _like(x, mean, stream), _like(x, invstd, stream)


def forward_infer(x: Operand, layout: ChannelLayout, running_mean, running_var, gamma, beta, eps: float,
                  relu: bool, out=None):
    """See ``numpy_backend.forward_infer``; kernels: infer_coeffs + apply."""
    stream = _stream(x)
    cdt = compute_dtype(x.dtype)
    k = get_kernels(_ACC[cdt])
    C = layout.channels
    dx = _to_device(x, stream).reshape(-1)
    kk, scale, shift, invstd = (_empty(C, cdt, stream) for _ in range(4))
    y = _empty(dx.shape, x.dtype, stream)
    if C:
        g, has_g = _param(gamma, stream)
        b, has_b = _param(beta, stream)
        rm, rv = _to_device(running_mean, stream), _to_device(running_var, stream)
        threads = 128
        k.infer_coeffs[math.ceil(C / threads), threads, stream](rm, rv, eps, has_g, has_b, g, b, kk, scale,
                                                               shift, invstd)
        if dx.size:
            ep = _elementwise_launch(dx.size)
            k.apply[ep.grid, ep.block, stream](dx, y, C, layout.inner, kk, scale, shift, int(relu))
    y = y.reshape(layout.shape)
    return deliver(_like(x, y, stream), out), _like(x, kk, stream), _like(x, invstd, stream)


def backward(dy: Operand, x: Operand, layout: ChannelLayout, mean, invstd, gamma, out=None):
    """See ``numpy_backend.backward``; kernels: bwd_{planes,rows} + dx."""
    stream = _stream(x)
    cdt = compute_dtype(x.dtype)
    k = get_kernels(_ACC[cdt])
    C, n = layout.channels, layout.count
    xd = _to_device(x, stream).reshape(-1)
    dyd = _to_device(dy, stream).reshape(-1)
    dgamma, dbeta, kk, a, b, c = (_empty(C, cdt, stream) for _ in range(6))
    dx = _empty(xd.shape, x.dtype, stream)
    if C:
        g, has_g = _param(gamma, stream)
        m, s = _to_device(mean, stream), _to_device(invstd, stream)
        if n:
            plan, stages, counters = _reduce_launch(layout, cdt, stream, 2)  # sum(dy), sum(dy * (x - k))
            kernel = k.bwd_rows if layout.inner == 1 else k.bwd_planes
            kernel[plan.grid, plan.block, stream](dyd, xd, layout.outer, C, layout.inner, 1.0 / n, has_g, g,
                                                  m, s, dgamma, dbeta, kk, a, b, c, *stages, counters)
            ep = _elementwise_launch(xd.size)
            k.dx[ep.grid, ep.block, stream](dyd, xd, dx, C, layout.inner, kk, a, b, c)
        else:
            zeros = np.zeros(C, cdt)
            dgamma, dbeta = cuda.to_device(zeros, stream=stream), cuda.to_device(zeros, stream=stream)
    dx = deliver(_like(x, dx.reshape(layout.shape), stream), out)
    return dx, _like(x, dgamma, stream), _like(x, dbeta, stream)


def channel_stats(x: Operand, layout: ChannelLayout):
    """Per-channel mean and M2 as float64 host arrays, from the statistics
    kernel (mean = k + (mean - k) formed in float64)."""
    if layout.count == 0:
        zeros = np.zeros(layout.channels)
        return zeros, zeros.copy()
    stream = _stream(x)
    _, (kk, _, _, _, _, dmean, m2) = _run_stats(x, layout, None, None, 0.0, None, stream)
    host = [a.copy_to_host(stream=stream).astype(np.float64) for a in (kk, dmean, m2)]
    return host[0] + host[1], host[2]
