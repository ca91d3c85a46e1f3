"""The ``cupy`` backend: CUDA C++ kernels (``kernels/*.cu``) compiled with
NVRTC through ``cupy.RawModule``, launched with the plans of ``plans.py``.

Arrays: CuPy arrays are used in place and results are CuPy arrays; other GPU
arrays (``__cuda_array_interface__``: Numba, torch) are wrapped without a
copy and results come back as CuPy arrays; NumPy input is copied to the
device and results copied back (a convenience path; running statistics given
as NumPy arrays are still updated in place). Non-contiguous inputs are made
contiguous on the device first.

Streams: everything runs on CuPy's current stream, without synchronizing
(host results are synchronized by the copy back).

Compilation: lazily, on first use, once per device (``functools.cache``);
CuPy also caches the binaries on disk.
"""
from __future__ import annotations

import functools

import numpy as np

from ...validation import ChannelLayout, compute_dtype
from .. import launch
from ..outputs import deliver
from . import plans, sources

name = "cupy"

#: Launch-formula knobs (see ``bnkernels.backends.launch.Tuning``).
TUNING = launch.Tuning()


def _cupy():
    import cupy

    return cupy


class Operand:
    """An argument: its device array, and whether the caller gave a host
    array (results then go back to the host)."""

    def __init__(self, source):
        cp = _cupy()
        self.host = isinstance(source, np.ndarray) or not hasattr(source, "__cuda_array_interface__")
        self.array = np.asarray(source) if self.host else cp.asarray(source)

    @property
    def shape(self):
        return self.array.shape

    @property
    def dtype(self):
        return self.array.dtype

    def device(self, dtype=None):
        """A C-contiguous device array (a copy only when needed)."""
        return _cupy().ascontiguousarray(self.array, dtype=dtype)


def asarray(x):
    """Wrap an argument without any copy."""
    return x if isinstance(x, Operand) else Operand(x)


@functools.cache
def _module(device_id: int):
    """The compiled RawModule of all kernels for one device."""
    cp = _cupy()
    with cp.cuda.Device(device_id):
        return cp.RawModule(code=sources.read_source(), options=sources.nvrtc_options(),
                            name_expressions=sources.name_expressions())


class _Device:
    """What ``plans.run_*`` need, on the current CuPy device and stream."""

    def __init__(self):
        cp = _cupy()
        self.cp = cp
        self.device_id = cp.cuda.Device().id
        attrs = cp.cuda.Device().attributes
        self.limits = launch.DeviceLimits(
            sm_count=attrs["MultiProcessorCount"],
            max_threads_per_block=attrs["MaxThreadsPerBlock"],
            max_threads_per_sm=attrs["MaxThreadsPerMultiProcessor"],
            max_grid_x=attrs["MaxGridDimX"], max_grid_y=attrs["MaxGridDimY"])
        self.tuning = TUNING

    def alloc(self, shape, dtype):
        if launch.poison_requested():
            return self.cp.full(shape, np.nan, dtype)
        return self.cp.empty(shape, dtype)

    def counters(self, n):
        return _counters(self.device_id, self.cp.cuda.get_current_stream().ptr, n)

    def aligned(self, *arrays):
        return all(a.data.ptr % 16 == 0 for a in arrays)

    def run(self, launch_: plans.Launch):
        kernel = _module(self.device_id).get_function(launch_.kernel)
        kernel(launch_.grid, launch_.block, launch_.args, shared_mem=launch_.shared_mem)


_counter_cache: dict = {}


def _counters(device_id, stream_ptr, n):
    """Zeroed uint32 counters per (device, stream); kernels leave them zero."""
    cp = _cupy()
    cur = _counter_cache.get((device_id, stream_ptr))
    if cur is None or cur.size < n:
        cur = cp.zeros(max(n, 64), cp.uint32)
        _counter_cache[(device_id, stream_ptr)] = cur
    return cur


def _result(x: Operand, a):
    return _cupy().asnumpy(a) if x.host else a


def _param(p, dtype):
    return None if p is None else asarray(p).device(dtype)


def _running_pair(running, stream_copy_back):
    """Device running statistics of one dtype; host or mixed-dtype ones are
    updated through temporaries copied back afterwards."""
    rm, rv, factor = running
    ops = [asarray(rm), asarray(rv)]
    dtype = np.float64 if np.float64 in (ops[0].dtype, ops[1].dtype) else np.float32
    devs = []
    for op, original in zip(ops, (rm, rv)):
        d = op.device(dtype)
        if op.host or d is not op.array:  # a temporary: write the result back
            stream_copy_back.append((original, d))
        devs.append(d)
    return devs[0], devs[1], factor


def _copy_back(pairs):
    cp = _cupy()
    for original, d in pairs:
        if isinstance(original, np.ndarray):
            original[...] = cp.asnumpy(d)
        else:
            original[...] = d.astype(original.dtype)


def _prepare(x):
    """The operand, the device, the accumulation dtype and the flat
    contiguous device input."""
    x = asarray(x)
    return x, _Device(), compute_dtype(x.dtype), x.device().reshape(-1)


def _no_channels(x, dev, acc, xd, layout, out):
    """Forward result of an input with C == 0: nothing to normalize."""
    empty = dev.cp.empty(0, acc)
    return deliver(_result(x, xd.reshape(layout.shape).copy()), out), _result(x, empty), _result(x, empty)


def forward_train(x, layout: ChannelLayout, gamma, beta, eps: float, relu: bool, running, out=None):
    """See ``numpy_backend.forward_train``; kernels: bn_stats + bn_apply."""
    x, dev, acc, xd = _prepare(x)
    if layout.channels == 0:
        return _no_channels(x, dev, acc, xd, layout, out)
    copy_back = []
    run = _running_pair(running, copy_back) if running is not None else None
    y, stats = plans.run_forward_train(dev, xd, layout, _param(gamma, acc), _param(beta, acc), run, eps, relu)
    _copy_back(copy_back)
    return deliver(_result(x, y.reshape(layout.shape)), out), _result(x, stats["mean"]), _result(x, stats["invstd"])


def forward_infer(x, layout: ChannelLayout, running_mean, running_var, gamma, beta, eps: float, relu: bool,
                  out=None):
    """See ``numpy_backend.forward_infer``; kernels: bn_infer_coeffs + bn_apply."""
    x, dev, acc, xd = _prepare(x)
    if layout.channels == 0:
        return _no_channels(x, dev, acc, xd, layout, out)
    rm, rv = asarray(running_mean), asarray(running_var)
    rdt = np.float64 if np.float64 in (rm.dtype, rv.dtype) else np.float32
    y, stats = plans.run_forward_infer(dev, xd, layout, rm.device(rdt), rv.device(rdt), _param(gamma, acc),
                                       _param(beta, acc), eps, relu)
    return deliver(_result(x, y.reshape(layout.shape)), out), _result(x, stats["k"]), _result(x, stats["invstd"])


def backward(dy, x, layout: ChannelLayout, mean, invstd, gamma, out=None):
    """See ``numpy_backend.backward``; kernels: bn_bwd_reduce + bn_dx."""
    x, dy = asarray(x), asarray(dy)
    dev = _Device()
    acc = compute_dtype(x.dtype)
    C = layout.channels
    if C == 0 or layout.count == 0:
        zeros = dev.cp.zeros(C, acc)
        return (deliver(_result(x, dev.cp.zeros(layout.shape, x.dtype)), out), _result(x, zeros),
                _result(x, zeros.copy()))
    result, grads = plans.run_backward(dev, dy.device().reshape(-1), x.device().reshape(-1), layout,
                                     _param(gamma, acc), asarray(mean).device(np.float64),
                                     asarray(invstd).device(np.float64))
    dx = deliver(_result(x, result.reshape(layout.shape)), out)
    return dx, _result(x, grads["dgamma"]), _result(x, grads["dbeta"])


def channel_stats(x, layout: ChannelLayout):
    """Per-channel mean and M2, float64 host arrays."""
    if layout.count == 0 or layout.channels == 0:
        zeros = np.zeros(layout.channels)
        return zeros, zeros.copy()
    x = asarray(x)
    dev = _Device()
    out = plans.run_stats(dev, x.device().reshape(-1), layout, None, None, None, 0.0)
    k, dmean, m2 = (dev.cp.asnumpy(out[n]).astype(np.float64) for n in ("k", "dmean", "m2"))
    return k + dmean, m2
