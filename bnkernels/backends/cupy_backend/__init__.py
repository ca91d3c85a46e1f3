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

Devices and streams: a call runs on the device of its input (CuPy's current
device for host input) and on CuPy's current stream, or torch's current
stream for torch tensors, without synchronizing (host results are
synchronized by the copy back). Per (device, stream, host thread) the
backend keeps the reductions' counters and each plan's workspace
(``gpu/workspace.py``), so a call allocates only what it returns.

bfloat16: CuPy has no bfloat16 dtype. A torch (CUDA or CPU) bfloat16 tensor
or a NumPy bfloat16 array (ml_dtypes') is held as a CuPy int16 array of the
same memory (``t.view(torch.int16)``), its operand saying bfloat16; the
kernels take int16 storage as bfloat16 bits (``bind.storage_name``: their
``__nv_bfloat16`` instantiations), outputs are allocated as int16 arrays,
and results go back as the caller's bfloat16 (a torch bfloat16 tensor of
the same memory, or a NumPy bfloat16 array). Per-channel vectors in
bfloat16 are widened to float32 exactly on the device.

Compilation: lazily, on first use, once per device (``functools.cache``);
CuPy also caches the binaries on disk.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from ...validation import bfloat16_dtype, host_array, is_bfloat16
from ...validation import is_torch as _is_torch
from ..gpu import geometry
from ..gpu.workspace import CounterCache, ScratchCache
from ..gpu.members import GpuBackend
from ..gpu.operand import Operand
from . import bind, sources

name = "cupy"

#: Launch-formula knobs (see ``gpu.geometry.Tuning``).
TUNING = geometry.Tuning()


_cupy_module = []


#: How a bfloat16 array is held for CuPy (the same bits), and bfloat16's NaN
#: bits (the poison of an output).
BF16_BITS = np.dtype(np.int16)
_BF16_NAN = np.int16(0x7FC0)


def _holds_bf16(dtype) -> bool:
    """Whether a buffer of ``dtype`` (a CuPy array's, or a plan's: bfloat16
    itself) holds bfloat16 bits."""
    return is_bfloat16(dtype) or np.dtype(dtype) == BF16_BITS


class Bf16Operand(Operand):
    """A bfloat16 argument: ``device`` a CuPy int16 array of its memory (or
    ``host`` a NumPy bfloat16 array); its dtype is bfloat16."""

    @property
    def dtype(self):
        return bfloat16_dtype()


def bf16_to_float32(xp, bits):
    """bfloat16 bits (an int16 array of ``xp``: CuPy, or NumPy in tests) as
    float32, exactly: the bits in the top half of a binary32."""
    return (bits.astype(np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(xp, values):
    """float32 (or float64, rounded to float32 first) to bfloat16 bits
    (int16), rounding to nearest even; NaN -> 0x7fc0 (still NaN)."""
    f = xp.ascontiguousarray(values, dtype=np.float32)
    u = f.view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16
    bits = xp.where(xp.isnan(f), np.uint32(0x7FC0), rounded)
    return bits.astype(np.uint16).view(np.int16)


def _cupy():
    """CuPy, imported on first use (``import bnkernels`` never imports it)."""
    if not _cupy_module:
        import cupy

        _cupy_module.append(cupy)
    return _cupy_module[0]


@functools.cache
def _module(device_id: int):
    """The compiled RawModule of all kernels for one device."""
    cp = _cupy()
    with cp.cuda.Device(device_id):
        return cp.RawModule(code=sources.read_source(), options=sources.nvrtc_options(),
                            name_expressions=sources.name_expressions())


@functools.cache
def _function(device_id: int, name: str):
    """A kernel of :func:`_module` (CuPy looks it up by name on every
    ``get_function``)."""
    return _module(device_id).get_function(name)


@functools.cache
def _limits(device_id: int) -> geometry.DeviceLimits:
    attrs = _cupy().cuda.Device(device_id).attributes  # ~100 driver queries: once per device
    defaults = geometry.DeviceLimits(sm_count=1)
    return geometry.DeviceLimits(
        sm_count=attrs["MultiProcessorCount"], max_threads_per_block=attrs["MaxThreadsPerBlock"],
        max_threads_per_sm=attrs["MaxThreadsPerMultiProcessor"], max_grid_x=attrs["MaxGridDimX"],
        max_grid_y=attrs["MaxGridDimY"],
        registers_per_sm=attrs.get("MaxRegistersPerMultiprocessor", defaults.registers_per_sm),
        shared_per_sm=attrs.get("MaxSharedMemoryPerMultiprocessor", defaults.shared_per_sm),
        max_blocks_per_sm=attrs.get("MaxBlocksPerMultiprocessor", defaults.max_blocks_per_sm))


@functools.cache
def _resident(device_id: int, name: str, threads: int) -> int:
    """Resident blocks per SM of a compiled kernel (its registers and static
    shared memory, as the driver loaded it)."""
    f = _function(device_id, name)
    return geometry.resident_blocks(_limits(device_id), threads, f.num_regs, f.shared_size_bytes)


_counters = CounterCache()
_scratch = ScratchCache()

#: Counters and workspaces of calls captured into CUDA graphs: a graph
#: replays its kernels on any stream, possibly while another graph of the
#: same stream, or eager calls there, run too, so a captured call never
#: shares the per-stream ones; and its memory must outlive the call (the
#: graph holds only the addresses), so it is kept for the process's life.
CAPTURED: list = []


def _captured(a):
    CAPTURED.append(a)
    return a


def _capturing(stream) -> bool:
    """Whether work queued on ``stream`` is being captured into a graph."""
    is_capturing = getattr(stream, "is_capturing", None)
    return bool(is_capturing()) if is_capturing is not None else False


class _Device:
    """What ``gpu.plans`` needs, on x's device and stream: a context manager
    that makes them current for the call (CuPy's current stream, or torch's
    current stream for torch tensors)."""

    def __init__(self, device_id, stream):
        cp = _cupy()
        self.cp = cp
        self.device_id = device_id
        self.stream = stream  # None: CuPy's current stream
        self.limits = _limits(device_id)
        self.tuning = TUNING
        self.poison = geometry.poison_requested()
        self.capturing = False  # set when entered
        self._contexts = []

    def __enter__(self):
        contexts = [self.cp.cuda.Device(self.device_id)] + ([self.stream] if self.stream is not None else [])
        for c in contexts:
            c.__enter__()
        self._contexts.append(contexts)
        stream = self.cp.cuda.get_current_stream()
        self.key = (self.device_id, stream.ptr)
        self.capturing = _capturing(stream)
        return self

    def __exit__(self, *exc):
        for c in reversed(self._contexts.pop()):
            c.__exit__(*exc)
        return False

    def alloc(self, shape, dtype):
        if _holds_bf16(dtype):  # bfloat16: its bits in an int16 array
            if self.poison:
                return self.cp.full(shape, _BF16_NAN, BF16_BITS)
            return self.cp.empty(shape, BF16_BITS)
        if self.poison:
            return self.cp.full(shape, np.nan, dtype)
        return self.cp.empty(shape, dtype)

    def zeros(self, shape, dtype):
        return self.cp.zeros(shape, BF16_BITS if _holds_bf16(dtype) else dtype)

    def counters(self, n):
        if self.capturing:
            return _captured(self.cp.zeros(max(n, 64), self.cp.uint32))
        return _counters.zeroed(self.key, n, lambda size: self.cp.zeros(size, self.cp.uint32))

    def scratch(self, key, specs):
        if self.capturing:
            return {name: _captured(self.alloc(shape, dtype)) for name, (shape, dtype) in specs.items()}
        return _scratch.get((self.key, key), specs, self.alloc)

    def aligned(self, *arrays):
        return all(_pointer(a) % 16 == 0 for a in arrays)

    def resident_blocks(self, launch):
        """``gpu.plans.occupancy``: of the instantiation ``launch`` runs."""
        return _resident(self.device_id, bind.kernel_name(launch), math.prod(launch.block))

    def bind(self, launch):
        bound = bind.bind(launch)
        kernel, grid, block, shared = _function(self.device_id, bound.kernel), bound.grid, bound.block, bound.shared_mem
        # a partial, not a lambda: a replay calls it directly (one Python frame fewer per launch)
        return functools.partial(kernel, grid, block, shared_mem=shared), bound.args

    def run(self, launch):
        fn, args = self.bind(launch)
        fn(args)


def _torch_stream(source):
    """CuPy's view of torch's current stream on the tensor's device."""
    import torch

    stream = torch.cuda.current_stream(source.device)
    return _cupy().cuda.ExternalStream(stream.cuda_stream, source.device.index)


def _pointer(a) -> int:
    """A kernel argument's address: a CuPy array's, or a pointer passed as
    it is (``Arrays.kernel_array``)."""
    return int(a) if isinstance(a, np.integer) else a.data.ptr


class Arrays:
    """The arrays adapter of ``gpu.members`` for CuPy."""

    #: Kernels take pointers: results are allocated in the caller's shape.
    shaped_outputs = True

    def operand(self, x):
        if isinstance(x, Operand):
            return x
        if _is_torch(x) and str(x.dtype) == "torch.bfloat16":
            if not x.is_cuda:
                return Bf16Operand("numpy", x, host=host_array(x))
            import torch

            return Bf16Operand("torch", x, device=_cupy().asarray(x.detach().view(torch.int16)))
        if isinstance(x, np.ndarray) or not hasattr(x, "__cuda_array_interface__"):
            host = np.asarray(x)
            return (Bf16Operand if is_bfloat16(host.dtype) else Operand)("numpy", x, host=host)
        kind = "torch" if _is_torch(x) else "cupy"
        return Operand(kind, x, device=_cupy().asarray(x))

    def context(self, x):
        """Where a call on device array ``x`` runs now: ``(x's device, the
        current device, the stream)``; None for host data, and while the
        stream is captured into a CUDA graph (a captured call gets counters
        and a workspace of its own: ``CAPTURED``)."""
        cp = _cupy()
        if _is_torch(x):
            if not x.is_cuda:
                return None
            import torch

            if torch.cuda.is_current_stream_capturing():
                return None
            return x.device.index, cp.cuda.runtime.getDevice(), torch.cuda.current_stream(x.device).cuda_stream
        if not hasattr(x, "__cuda_array_interface__"):
            return None
        stream = cp.cuda.get_current_stream()
        if _capturing(stream):
            return None
        device = x.device.id if isinstance(x, cp.ndarray) else cp.asarray(x).device.id
        return device, cp.cuda.runtime.getDevice(), stream.ptr

    def needs_entering(self, dev):
        """Whether a prepared call must make dev's device and stream current
        (not when they are already: x on the current device, CuPy's stream)."""
        return dev.stream is not None or dev.device_id != dev.cp.cuda.runtime.getDevice()

    def direct(self, a, dtype):
        """Whether ``a`` can be passed to a kernel as it is (C-contiguous
        device memory of ``dtype``)."""
        cp = _cupy()
        if isinstance(a, cp.ndarray):
            return a.dtype == dtype and a.flags.c_contiguous
        if _is_torch(a):
            return a.is_cuda and a.is_contiguous() and str(a.dtype) == f"torch.{np.dtype(dtype).name}"
        return False

    def kernel_array(self, a):
        """``a`` (:meth:`direct`) as a kernel argument: a CuPy array as it
        is, a torch tensor as its pointer (no wrapper made per call)."""
        return a if type(a) is _cupy().ndarray or not _is_torch(a) else np.uint64(a.data_ptr())

    def device(self, x_op):
        """x's device (CuPy's current one for host data) and stream."""
        cp = _cupy()
        device_id = cp.cuda.Device().id if x_op.is_host else x_op.device.device.id
        return _Device(device_id, _torch_stream(x_op.source) if x_op.kind == "torch" else None)

    def _device_array(self, op, dev, dtype):
        """op's data contiguous on the device in ``dtype`` (None: its own;
        bfloat16 as its int16 bits, or widened exactly to float32 and then
        cast for any other dtype)."""
        cp = dev.cp
        if not is_bfloat16(op.dtype):
            return cp.ascontiguousarray(op.array, dtype=dtype)
        bits = op.device if not op.is_host else cp.asarray(np.ascontiguousarray(op.host).view(BF16_BITS))
        bits = cp.ascontiguousarray(bits)
        if dtype is None or is_bfloat16(dtype):
            return bits
        return cp.ascontiguousarray(bf16_to_float32(cp, bits), dtype=dtype)

    def flat(self, op, dev, dtype=None):
        return self._device_array(op, dev, dtype).reshape(-1)

    def vector(self, op, dev, dtype):
        return self._device_array(op, dev, dtype)

    def contiguous(self, op):
        return op.device.flags.c_contiguous

    def result(self, x_op, a, dev):
        if a.dtype == BF16_BITS:  # bfloat16 bits: the caller's bfloat16
            if x_op.is_host:
                return dev.cp.asnumpy(a).view(bfloat16_dtype())
            if x_op.kind == "torch":
                import torch

                return torch.as_tensor(a, device=torch.device("cuda", a.device.id)).view(torch.bfloat16)
            return a
        return dev.cp.asnumpy(a) if x_op.is_host else a

    def to_host(self, a, dev):
        host = dev.cp.asnumpy(a)
        return host.view(bfloat16_dtype()) if host.dtype == BF16_BITS else host

    def to_device(self, host, dev):
        host = np.asarray(host)
        return dev.cp.asarray(host.view(BF16_BITS) if is_bfloat16(host.dtype) else host)

    def write_back(self, op, a, dev):
        if is_bfloat16(op.dtype):
            if op.is_host:
                op.host[...] = self.to_host(a, dev) if not isinstance(a, np.ndarray) else a
            else:
                op.device[...] = a if a.dtype == BF16_BITS else float32_to_bf16(dev.cp, dev.cp.asarray(a))
            return
        if op.is_host:
            op.host[...] = a if isinstance(a, np.ndarray) else dev.cp.asnumpy(a)
        else:
            op.device[...] = dev.cp.asarray(a).astype(op.dtype)


_backend = GpuBackend(Arrays())
# the interface.Backend members: asarray, statistics, finalize, ..., backward
globals().update(_backend.members())
