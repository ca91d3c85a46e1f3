"""The ``cupy`` backend: CUDA C++ kernels (``kernels/*.cu``) compiled with
NVRTC through ``cupy.RawModule``, run by the launch sequences both GPU
backends share (``backends/gpu/plans.py``, bound to these kernels by
``bind.py``); its members are ``gpu/members.py``'s, on the arrays adapter
below.

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

from ..gpu import geometry
from ..gpu.counters import CounterCache
from ..gpu.members import GpuBackend, Operand
from . import bind, sources

name = "cupy"

#: Launch-formula knobs (see ``gpu.geometry.Tuning``).
TUNING = geometry.Tuning()


def _cupy():
    import cupy

    return cupy


@functools.cache
def _module(device_id: int):
    """The compiled RawModule of all kernels for one device."""
    cp = _cupy()
    with cp.cuda.Device(device_id):
        return cp.RawModule(code=sources.read_source(), options=sources.nvrtc_options(),
                            name_expressions=sources.name_expressions())


_counters = CounterCache()


class _Device:
    """What ``gpu.plans`` needs, on the current CuPy device and stream."""

    def __init__(self):
        cp = _cupy()
        self.cp = cp
        self.device_id = cp.cuda.Device().id
        attrs = cp.cuda.Device().attributes
        self.limits = geometry.DeviceLimits(
            sm_count=attrs["MultiProcessorCount"],
            max_threads_per_block=attrs["MaxThreadsPerBlock"],
            max_threads_per_sm=attrs["MaxThreadsPerMultiProcessor"],
            max_grid_x=attrs["MaxGridDimX"], max_grid_y=attrs["MaxGridDimY"])
        self.tuning = TUNING

    def alloc(self, shape, dtype):
        if geometry.poison_requested():
            return self.cp.full(shape, np.nan, dtype)
        return self.cp.empty(shape, dtype)

    def zeros(self, shape, dtype):
        return self.cp.zeros(shape, dtype)

    def counters(self, n):
        key = (self.device_id, self.cp.cuda.get_current_stream().ptr)
        return _counters.zeroed(key, n, lambda size: self.cp.zeros(size, self.cp.uint32))

    def aligned(self, *arrays):
        return all(a.data.ptr % 16 == 0 for a in arrays)

    def run(self, launch):
        bound = bind.bind(launch)
        kernel = _module(self.device_id).get_function(bound.kernel)
        kernel(bound.grid, bound.block, bound.args, shared_mem=bound.shared_mem)


class Arrays:
    """The arrays adapter of ``gpu.members`` for CuPy."""

    def operand(self, x):
        if isinstance(x, Operand):
            return x
        if isinstance(x, np.ndarray) or not hasattr(x, "__cuda_array_interface__"):
            return Operand("numpy", x, host=np.asarray(x))
        return Operand("cupy", x, device=_cupy().asarray(x))

    def device(self, x_op):
        return _Device()

    def flat(self, op, dev, dtype=None):
        return dev.cp.ascontiguousarray(op.array, dtype=dtype).reshape(-1)

    def vector(self, op, dev, dtype):
        return dev.cp.ascontiguousarray(op.array, dtype=dtype)

    def result(self, x_op, a, dev):
        return dev.cp.asnumpy(a) if x_op.is_host else a

    def to_host(self, a, dev):
        return dev.cp.asnumpy(a)

    def to_device(self, host, dev):
        return dev.cp.asarray(host)

    def write_back(self, op, a, dev):
        if op.is_host:
            op.host[...] = a if isinstance(a, np.ndarray) else dev.cp.asnumpy(a)
        else:
            op.device[...] = dev.cp.asarray(a).astype(op.dtype)


_backend = GpuBackend(Arrays())
# the interface.Backend members: asarray, statistics, finalize, ..., backward
globals().update(_backend.members())
