"""Stand-ins for CuPy and ``numba.cuda`` whose kernels do nothing: with
them, the time of a call is bnkernels' own host cost (validation, planning,
wrapping, allocation, launching), which a real GPU adds to every kernel.
Used by ``bnkernels bench --host-overhead`` (``host_overhead.py``), in a
process of its own: :func:`install` replaces the real modules there.

Device arrays hold NumPy memory (never touched by the no-op kernels);
:data:`COUNTS` counts the allocations and the launches. Nothing here checks
what a real device would (it measures cost, not correctness: the kernels'
correctness is proven by the simulator and the host harness).
"""
from __future__ import annotations

import math
import sys
import types
from collections import Counter
from dataclasses import replace

import numpy as np

#: ``allocations``: device buffers made; ``launches``: kernels launched.
COUNTS: Counter = Counter()
#: Whether launches are recorded in :data:`LAUNCHES` (tests; not while timing).
RECORD_LAUNCHES = False


class DeviceArray:
    """A device array of either stand-in: NumPy memory behind the attributes
    the backends read (shape, dtype, ``data.ptr``,
    ``__cuda_array_interface__``, Numba's ``copy_to_host`` /
    ``copy_to_device`` / ``is_c_contiguous``). Not an ``ndarray``, so the
    backends see it as a GPU array.

    Cheap to make (what the table measures is bnkernels' cost, not the
    stand-in's): the attributes are plain slots read from the NumPy array
    once, and the pointer is given by the maker when it knows it."""

    __module__ = "cupy"  # what the backends' kind detection reads
    __slots__ = ("_a", "_ptr", "shape", "dtype", "size", "ndim", "strides", "device")

    def __init__(self, a, ptr=None, device=None):
        self._a = a
        self.device = _DEVICES[_CURRENT[0]] if device is None else device  # where it was made, as CuPy's
        # NumPy's own pointer query costs microseconds: once, and only when not known
        self._ptr = a.__array_interface__["data"][0] if ptr is None else ptr
        self.shape, self.dtype, self.size, self.ndim, self.strides = a.shape, a.dtype, a.size, a.ndim, a.strides

    flags = property(lambda self: self._a.flags)
    data = property(lambda self: types.SimpleNamespace(ptr=self._ptr))

    @property
    def __cuda_array_interface__(self):
        a = self._a
        return {"shape": a.shape, "typestr": a.dtype.str, "data": (self._ptr, False),
                "strides": None if a.flags.c_contiguous else a.strides, "version": 3}

    def reshape(self, *shape):
        a = self._a.reshape(*shape)
        return type(self)(a, self._ptr if a.size else None, self.device)

    def astype(self, dtype):
        return _device(type(self), self._a, dtype)

    def __getitem__(self, key):
        return type(self)(self._a[key], device=self.device)

    def __setitem__(self, key, value):
        self._a[key] = value._a if isinstance(value, DeviceArray) else value

    def copy_to_host(self, ary=None, stream=None):
        host = np.array(self._a)
        if ary is not None:
            ary[...] = host
            return ary
        return host

    def copy_to_device(self, ary, stream=None):
        self._a[...] = ary._a if isinstance(ary, DeviceArray) else ary

    def is_c_contiguous(self):
        return self._a.flags.c_contiguous


#: The stand-in CuPy's devices (two, so that "the array's device, not the
#: current one" can be tested), the current one and stream, and what each
#: launch saw: ``(current device, current stream, grid, block)``.
_DEVICES = [types.SimpleNamespace(id=0), types.SimpleNamespace(id=1)]
_CURRENT = [0]
_STREAM = [0]  # the current stream's handle (0: the default stream)
CAPTURING = [False]  # whether the current stream is being captured into a CUDA graph
LAUNCHES: list = []


def on_device(a: DeviceArray, device_id: int) -> DeviceArray:
    """``a`` as if made on another device (its memory stays where it is)."""
    return type(a)(a._a, a._ptr, _DEVICES[device_id])


class NumbaDeviceArray(DeviceArray):
    __module__ = "numba.cuda.cudadrv.devicearray"


def _host(a):
    return a._a if isinstance(a, DeviceArray) else np.asarray(a)


#: Device memory: a ring of 256 MiB handed out in order, as a caching
#: allocator hands out blocks (no system call per buffer; the no-op kernels
#: never write it, and a call needs far less than the ring).
_ARENA = np.empty(256 << 20, np.uint8)
_ARENA_PTR = _ARENA.__array_interface__["data"][0]
_next = [0]


def _new(cls, shape, dtype, fill=None):
    COUNTS["allocations"] += 1
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    start = _next[0] if _next[0] + nbytes <= _ARENA.size else 0
    _next[0] = start + (nbytes + 255) // 256 * 256
    a = _ARENA[start:start + nbytes].view(dtype).reshape(shape)
    if fill is not None:
        a[...] = fill
    return cls(a, _ARENA_PTR + start)


def _device(cls, a, dtype=None):
    """``a`` as a device array of ``cls`` (a copy, counted, unless it is one
    already of that dtype and contiguous)."""
    if isinstance(a, cls) and (dtype is None or a.dtype == dtype) and a.flags.c_contiguous:
        return a
    if not isinstance(a, DeviceArray) and hasattr(a, "__cuda_array_interface__") and dtype is None:
        # another library's device array (a stand-in torch tensor): wrapped, no copy, on its device
        face = a.__cuda_array_interface__
        index = getattr(getattr(a, "device", None), "index", None)
        return cls(np.empty(face["shape"], face["typestr"]), face["data"][0],
                   _DEVICES[_CURRENT[0] if index is None else index])
    host = np.ascontiguousarray(_host(a), dtype=dtype)
    out = _new(cls, host.shape, host.dtype)
    out._a[...] = host
    return out


class _Kernel:
    """A launch that does nothing but count (with a compiled kernel's
    resources, as CuPy's ``RawKernel`` reports them)."""

    num_regs, shared_size_bytes = 40, 12292

    def __call__(self, *args, **kwargs):
        COUNTS["launches"] += 1
        if RECORD_LAUNCHES:
            LAUNCHES.append((_CURRENT[0], _STREAM[0], *args[:2]))

    def __getitem__(self, config):
        return self


class _MadeCurrent:
    """A context manager that makes ``value`` the current one of ``slot`` (a
    one-item list: the stand-in's current device or stream) while entered."""

    def __init__(self, slot: list, value):
        self._slot, self._value, self._previous = slot, value, []

    def __enter__(self):
        self._previous.append(self._slot[0])
        self._slot[0] = self._value
        return self

    def __exit__(self, *exc):
        self._slot[0] = self._previous.pop()
        return False


def _fake_cupy():
    cp = types.ModuleType("cupy")
    cp.__version__ = "stand-in"
    cp.ndarray = DeviceArray
    cp.uint32 = np.uint32
    cp.asarray = lambda a, dtype=None: _device(DeviceArray, a, dtype)
    cp.ascontiguousarray = lambda a, dtype=None: _device(DeviceArray, a, dtype)
    cp.empty = lambda shape, dtype=np.float64: _new(DeviceArray, shape, dtype)
    cp.zeros = lambda shape, dtype=np.float64: _new(DeviceArray, shape, dtype, 0)
    cp.full = lambda shape, value, dtype=None: _new(DeviceArray, shape, dtype, value)
    cp.asnumpy = lambda a: np.array(_host(a))

    class Device(_MadeCurrent):
        attributes = {"MultiProcessorCount": 132, "MaxThreadsPerBlock": 1024, "MaxThreadsPerMultiProcessor": 2048,
                      "MaxGridDimX": 2**31 - 1, "MaxGridDimY": 65535}

        def __init__(self, device_id=None):
            self.id = _CURRENT[0] if device_id is None else device_id
            super().__init__(_CURRENT, self.id)

    class RawModule:
        def __init__(self, **kwargs):
            pass

        def get_function(self, name):
            return _Kernel()

    class ExternalStream(_MadeCurrent):
        """A stream by handle (torch's, for the cupy backend); as a context
        manager, the current stream."""

        def __init__(self, ptr, device_id=None):
            self.ptr = ptr
            super().__init__(_STREAM, ptr)

    cp.cuda = types.SimpleNamespace(Device=Device, ExternalStream=ExternalStream,
                                    get_current_stream=lambda: types.SimpleNamespace(ptr=_STREAM[0],
                                                                                     is_capturing=lambda: CAPTURING[0]),
                                    runtime=types.SimpleNamespace(getDeviceCount=lambda: len(_DEVICES),
                                                                  getDevice=lambda: _CURRENT[0]))
    cp.RawModule = RawModule
    return cp


def _fake_numba_cuda():
    cuda = types.ModuleType("numba.cuda")
    context = object()
    stream = types.SimpleNamespace(handle=None)
    cuda.devicearray = types.SimpleNamespace(is_cuda_ndarray=lambda x: isinstance(x, NumbaDeviceArray))
    cuda.as_cuda_array = lambda a: _device(NumbaDeviceArray, a) if not isinstance(a, NumbaDeviceArray) else a
    cuda.to_device = lambda a, stream=None: _device(NumbaDeviceArray, np.array(_host(a)))
    cuda.device_array = lambda shape, dtype=np.float64, stream=None: _new(NumbaDeviceArray, shape, dtype)
    cuda.default_stream = lambda: stream
    cuda.external_stream = lambda ptr: stream
    cuda.current_context = lambda: context
    cuda.get_current_device = lambda: types.SimpleNamespace(MULTIPROCESSOR_COUNT=132)
    cuda.is_available = lambda: True
    cuda.jit = lambda *args, **kwargs: (lambda fn: _Kernel()) if not args or not callable(args[0]) else _Kernel()
    cuda.libdevice = types.ModuleType("numba.cuda.libdevice")  # what the kernels name (never compiled here)
    return cuda


def install():
    """Replace ``cupy`` and ``numba.cuda`` in this process (before any
    bnkernels GPU backend is imported) and declare both backends usable."""
    sys.modules["cupy"] = _fake_cupy()
    try:
        import numba
    except ImportError:  # then only the cupy backend is measured
        pass
    else:
        numba.cuda = sys.modules["numba.cuda"] = _fake_numba_cuda()
        # what the kernels module imports to build its intrinsics (never compiled here)
        extending = sys.modules["numba.cuda.extending"] = types.ModuleType("numba.cuda.extending")
        extending.intrinsic = lambda fn: fn
    from .. import backends

    backends.BACKENDS = tuple(replace(s, requirement=lambda: None) if s.device == "gpu" else s
                              for s in backends.BACKENDS)
    backends._BY_NAME = {s.name: s for s in backends.BACKENDS}
