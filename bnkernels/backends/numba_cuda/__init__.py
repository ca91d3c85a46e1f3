"""The ``numba-cuda`` backend: Numba CUDA kernels (``kernels.py``, the
elementwise ones in ``elementwise.py``, storage accesses in ``vectors.py``), run by
the launch sequences both GPU backends share (``backends/gpu/plans.py``,
bound to these kernels by ``bind.py``); its members are
``gpu/members.py``'s, on the arrays adapter below.

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
- The kernels compile for the dtype of each argument, so device vectors
  (gamma, running statistics) are passed in their own dtype.
- bfloat16 (Numba has no such dtype): the kernels take its bits as int16
  arrays and convert (``vectors.py``), computing in float32 with float32
  saved statistics, as for float16. A torch CUDA bfloat16 tensor (whose
  ``__cuda_array_interface__`` torch refuses) is viewed as int16
  (``t.view(torch.int16)``) and its results come back as torch bfloat16
  tensors; NumPy bfloat16 (ml_dtypes) goes to the device as its bits and
  comes back as bfloat16. A Numba device array of int16 bits can be passed
  to the members as bfloat16 through :func:`as_bfloat16` (the public
  functions refuse integer data); its results are int16 bit arrays. In
  this backend an int16 device array always holds bfloat16 bits: copies to
  the host are viewed as bfloat16.

Streams: work on CuPy arrays is queued on CuPy's current stream, on torch
tensors on torch's current stream, otherwise on Numba's default stream. GPU
results are returned without synchronizing (as any CUDA library would);
host results are synchronized by the copy back.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from ...validation import bfloat16_dtype, is_bfloat16
from ..gpu import geometry
from ..gpu.workspace import CounterCache, ScratchCache
from ..gpu.members import GpuBackend
from ..gpu.operand import Operand
from . import bind

name = "numba-cuda"

#: Launch-formula knobs (see ``gpu.geometry.Tuning``); tests shrink the
#: blocks so that the CUDA simulator stays fast.
TUNING = geometry.Tuning()

POISON_ENV = geometry.POISON_ENV

#: The device dtype of bfloat16 data: its bits.
BITS = np.dtype(np.int16)
_BF16_NAN = 0x7FC0  # what poisoned bfloat16 buffers hold


class _Bfloat16(Operand):
    """A bfloat16 argument: its device array holds the bits (int16)."""

    @property
    def dtype(self):
        return bfloat16_dtype()


def as_bfloat16(a) -> Operand:
    """A Numba device array of bfloat16 bits (int16) as a bfloat16 argument
    of this backend's members (``x``, ``dy``, the residual)."""
    if not cuda.devicearray.is_cuda_ndarray(a) or np.dtype(a.dtype) != BITS:
        raise TypeError(f"expected a Numba device array of int16 bits, got {type(a).__name__} of {a.dtype}")
    return _Bfloat16("numba", a, device=a)


def _bits(host):
    """A host array as the kernels take it: bfloat16 as its int16 bits."""
    return host.view(BITS) if is_bfloat16(host.dtype) else host


def _torch_bits(t):
    """A torch CUDA tensor as one ``cuda.as_cuda_array`` accepts (bfloat16: int16 bits)."""
    if str(t.dtype) == "torch.bfloat16":
        import torch
        return t.view(torch.int16)
    return t


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


def _capturing(kind: str) -> bool:
    """Whether the stream work on this kind of array goes to is being
    captured into a CUDA graph (CuPy's or torch's; Numba has no graphs)."""
    if kind == "cupy":
        import cupy
        is_capturing = getattr(cupy.cuda.get_current_stream(), "is_capturing", None)
        return bool(is_capturing()) if is_capturing is not None else False
    if kind == "torch":
        import torch
        return bool(torch.cuda.is_current_stream_capturing())
    return False


#: Counters and workspaces of captured calls, kept for the process's life
#: (as the cupy backend's ``CAPTURED``: a graph holds only their addresses).
CAPTURED: list = []


def _stream(x: Operand):
    if x.kind == "cupy":
        import cupy
        return cuda.external_stream(cupy.cuda.get_current_stream().ptr)
    if x.kind == "torch":
        import torch
        return cuda.external_stream(torch.cuda.current_stream().cuda_stream)
    return cuda.default_stream()


_device_limits: dict = {}


def _limits():
    """The current device's limits (asked of the driver once per context)."""
    key = id(cuda.current_context())
    if key not in _device_limits:
        _device_limits[key] = geometry.DeviceLimits.from_device(cuda.get_current_device())
    return _device_limits[key]


_counters = CounterCache()
_scratch = ScratchCache()
_dummies: dict = {}  # per context


class _Device:
    """What ``gpu.plans`` needs, on one stream of the current context (a
    context manager, as the cupy backend's; Numba launches on the current
    context)."""

    def __init__(self, stream, capturing: bool = False):
        self.stream = stream
        self.capturing = capturing
        self.limits = _limits()
        self.tuning = TUNING
        self.poison = geometry.poison_requested()
        handle = getattr(stream, "handle", None)
        self.key = (id(cuda.current_context()), getattr(handle, "value", handle) or 0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def alloc(self, shape, dtype):
        """An uninitialized buffer; with ``BNKERNELS_POISON=1`` it is filled
        with NaN instead, so an element no kernel writes shows up (the tests
        run this way)."""
        if self.poison:
            fill = _BF16_NAN if np.dtype(dtype) == BITS else np.nan
            return cuda.to_device(np.full(shape, fill, dtype), stream=self.stream)
        return cuda.device_array(shape, dtype=dtype, stream=self.stream)

    def zeros(self, shape, dtype):
        return cuda.to_device(np.zeros(shape, dtype), stream=self.stream)

    def counters(self, n):
        if self.capturing:  # a graph's own (see the cupy backend's CAPTURED)
            CAPTURED.append(self.zeros(max(n, 64), np.int32))
            return CAPTURED[-1]
        return _counters.zeroed(self.key, n, lambda size: self.zeros(size, np.int32))

    def scratch(self, key, specs):
        if self.capturing:
            work = {name: self.alloc(shape, dtype) for name, (shape, dtype) in specs.items()}
            CAPTURED.extend(work.values())
            return work
        return _scratch.get((self.key, key), specs, self.alloc)

    def aligned(self, *arrays):
        return False  # the Numba kernels take no vectorized path

    def resident_blocks(self, launch):
        """``gpu.plans.occupancy``: of the kernel ``launch`` runs, from the
        registers and shared memory of its compiled specializations (the
        most demanding one); None before its first compilation (and under
        the simulator, which compiles nothing)."""
        compiled = list(getattr(bind.kernel_for(launch), "overloads", {}).values())
        registers = [getattr(k, "regs_per_thread", None) for k in compiled]
        if not compiled or None in registers:
            return None
        shared = max(getattr(k, "shared_mem_per_block", 0) for k in compiled)
        return geometry.resident_blocks(self.limits, math.prod(launch.block), max(registers), shared)

    def bind(self, launch):
        dummy = _dummies.get(self.key[0])  # what an absent optional array is passed as (never written)
        if dummy is None:
            dummy = _dummies[self.key[0]] = self.zeros(1, np.float32)
        configured = bind.kernel_for(launch)[launch.grid, launch.block, self.stream]
        return (lambda args: configured(*args)), bind.arguments(launch, dummy)

    def run(self, launch):
        fn, args = self.bind(launch)
        fn(args)


class Arrays:
    """The arrays adapter of ``gpu.members`` for Numba device arrays."""

    #: Kernels take 1-D arrays: results are allocated flat, then reshaped.
    shaped_outputs = False

    def operand(self, x):
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
            if str(x.dtype) == "torch.bfloat16":
                return _Bfloat16(kind, x, device=cuda.as_cuda_array(_torch_bits(x)))
        return Operand(kind, x, device=x if kind == "numba" else cuda.as_cuda_array(x))

    def device(self, x_op):
        return _Device(_stream(x_op), _capturing(x_op.kind))

    def context(self, x):
        """Where a call on device array ``x`` runs now: ``(the current
        context, the stream's handle)``; None for host data."""
        kind = _kind(x)
        if kind == "numpy" or (kind == "torch" and not x.is_cuda) or _capturing(kind):
            return None  # (captured calls have counters and a workspace of their own)
        if kind == "cupy":
            import cupy
            stream = cupy.cuda.get_current_stream().ptr
        elif kind == "torch":
            import torch
            stream = torch.cuda.current_stream().cuda_stream
        else:
            stream = 0  # Numba's default stream
        return id(cuda.current_context()), stream

    def needs_entering(self, dev):
        return False  # Numba launches on the current context, on the stream each launch names

    def direct(self, a, dtype):
        """Whether ``a`` is C-contiguous device memory of ``dtype`` (then
        :meth:`kernel_array` views it without a copy)."""
        kind = _kind(a)
        if kind == "numpy":
            return False
        if kind == "torch":
            return a.is_cuda and a.is_contiguous() and str(a.dtype) == f"torch.{np.dtype(dtype).name}"
        if a.dtype != dtype:
            return False
        if kind == "cupy":
            return a.flags.c_contiguous
        return (a if kind == "numba" else cuda.as_cuda_array(a)).is_c_contiguous()

    def kernel_array(self, a):
        """``a`` (:meth:`direct`) as the kernels take it: a 1-D Numba view."""
        if not cuda.devicearray.is_cuda_ndarray(a):
            a = cuda.as_cuda_array(_torch_bits(a.detach()) if _kind(a) == "torch" else a)
        return a if a.ndim == 1 else a.reshape(-1)

    def flat(self, op, dev, dtype=None):
        """Host data in ``dtype``; device data as it is (a copy only when
        not C-contiguous: rare, for Numba/CAI arrays)."""
        if op.is_host:
            return cuda.to_device(_bits(np.ascontiguousarray(op.host, dtype=dtype)), stream=dev.stream).reshape(-1)
        d = op.device
        if not d.is_c_contiguous():
            d = cuda.to_device(np.ascontiguousarray(d.copy_to_host(stream=dev.stream)), stream=dev.stream)
        return d.reshape(-1)

    def vector(self, op, dev, dtype):
        """As :meth:`flat`: host vectors are converted to ``dtype``, device
        ones are used as they are, but for float16 ones (float16 running
        statistics): the kernels would compute in float16, so those go
        through a ``dtype`` copy (a host round trip of C values), and so do
        bfloat16 ones (the kernels would read their bits as integers)."""
        if not op.is_host and op.device.dtype in (np.float16, BITS) and np.dtype(dtype) != op.device.dtype:
            host = np.ascontiguousarray(self.to_host(op.device, dev), dtype=dtype)
            return cuda.to_device(host, stream=dev.stream)
        return self.flat(op, dev, dtype) if op.is_host or not op.device.is_c_contiguous() else op.device

    def contiguous(self, op):
        return op.device.is_c_contiguous()

    def result(self, x_op, a, dev):
        if x_op.kind == "numpy":
            return self.to_host(a, dev)
        if x_op.kind == "cupy":
            import cupy
            return cupy.asarray(a)
        if x_op.kind == "torch":
            import torch
            t = torch.as_tensor(a, device="cuda")
            return t.view(torch.bfloat16) if np.dtype(a.dtype) == BITS else t
        return a

    def to_host(self, a, dev):
        """A device array on the host (int16: viewed as bfloat16, what it holds)."""
        if isinstance(a, np.ndarray):
            return a
        host = a.copy_to_host(stream=dev.stream)
        return host.view(bfloat16_dtype()) if host.dtype == BITS else host

    def to_device(self, host, dev):
        return cuda.to_device(_bits(np.ascontiguousarray(host)), stream=dev.stream)

    def write_back(self, op, a, dev):
        host = self.to_host(a, dev)
        if op.is_host:
            op.host[...] = host
        else:
            op.device.copy_to_device(_bits(np.ascontiguousarray(host, op.dtype)), stream=dev.stream)


_backend = GpuBackend(Arrays())
# the interface.Backend members: asarray, statistics, finalize, ..., backward
globals().update(_backend.members())
