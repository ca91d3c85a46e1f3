"""The machine: caches, memory and usable cores, the copy-bandwidth
ceiling and the same-size copy (:func:`measure_copy_ceiling`,
``copy_implementation``), the devices that time calls (:class:`CpuDevice`,
:class:`CudaDevice`), and :func:`system_info` for reports."""
from __future__ import annotations

import functools
import os
import platform
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..backends import cpu_caches
from .ops import COPY, GiB, Inputs, MiB, Unsupported
from .implementations import Implementation, Runner, _cupy
from .timing import EventTimer, Timing, time_calls


def last_level_cache_bytes() -> int | None:
    """Size of the largest data/unified CPU cache this machine reports
    (Linux sysfs: ``backends.cpu_caches``), or None."""
    level = cpu_caches.last_level()
    return level.size if level.reported else None


def available_memory_bytes() -> int:
    """``MemAvailable`` from /proc/meminfo, else 4 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 4 * GiB


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_ceiling_bytes() -> int:
    """CPU copy-buffer size: twice the last-level cache (so source and
    destination together are 4x the cache), at least 256 MiB, at most 2 GiB
    and an eighth of the available memory (never below 64 MiB)."""
    llc = last_level_cache_bytes() or 64 * MiB
    size = min(max(2 * llc, 256 * MiB), 2 * GiB, available_memory_bytes() // 8)
    return max(size, 64 * MiB)


@dataclass
class Ceiling:
    """Memory-bandwidth ceiling of a device: the best GB/s of a large copy,
    counting ``2 * buffer_bytes`` (read + write) per copy. ``variants`` maps
    each copy method tried to its GB/s."""

    device: str
    method: str
    buffer_bytes: int
    bytes: int
    times_s: list[float]
    median_s: float
    gbps: float
    variants: dict[str, float] = field(default_factory=dict)


def _check_copy_pair(dst: np.ndarray, src: np.ndarray, who: str) -> None:
    if not (src.flags.c_contiguous and dst.flags.c_contiguous) or src.shape != dst.shape:
        raise ValueError(f"{who} needs two C-contiguous arrays of one shape")


def sliced_copy(dst: np.ndarray, src: np.ndarray, pool: ThreadPoolExecutor | None = None,
                threads: int = 1) -> Callable[[], None]:
    """A callable that copies ``src`` into ``dst`` (C-contiguous, same size)
    with ``np.copyto``: one call when ``threads`` is 1, else ``threads``
    contiguous slices of the flat arrays copied on ``pool`` (NumPy releases
    the GIL)."""
    _check_copy_pair(dst, src, "sliced_copy")
    src, dst = src.reshape(-1), dst.reshape(-1)  # views
    if threads <= 1 or pool is None:
        return lambda: np.copyto(dst, src)
    bounds = np.linspace(0, src.size, threads + 1).astype(int)
    slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def run():
        list(pool.map(lambda s: np.copyto(dst[s], src[s]), slices))

    return run


@functools.cache
def _numba_copy_kernel():
    try:
        import numba
    except ImportError:
        return None

    @numba.njit(parallel=True, nogil=True)
    def parallel_copy(dst, src):
        for i in numba.prange(src.size):
            dst[i] = src[i]

    return parallel_copy


def numba_copy(dst: np.ndarray, src: np.ndarray) -> Callable[[], None] | None:
    """A callable that copies ``src`` into ``dst`` (C-contiguous, same shape)
    in a Numba parallel loop on Numba's threads (the threads the ``numba``
    backend uses), or None when numba is not installed. On the 2-core VM
    this was written on it copies a hot 3-51 MB array at about 59-70 GB/s
    against 27-55 GB/s for ``np.copyto``."""
    kernel = _numba_copy_kernel()
    if kernel is None:
        return None
    _check_copy_pair(dst, src, "numba_copy")
    bits = np.dtype(f"u{src.itemsize}")  # any dtype, as unsigned integers of its size
    s, d = src.reshape(-1).view(bits), dst.reshape(-1).view(bits)
    return lambda: kernel(d, s)


def measure_copy_ceiling(buffer_bytes: int | None = None, repeat: int = 5, warmup: int = 1,
                         threads: int | None = None) -> Ceiling:
    """CPU ceiling: a copy of a large float64 buffer (default
    :func:`default_ceiling_bytes`) into a preallocated destination by
    ``np.copyto`` with one thread and with ``threads`` threads (default: the
    usable cores; each copies a contiguous slice, NumPy releases the GIL),
    and by :func:`numba_copy` when numba is installed; the fastest wins.
    GB/s from the median."""
    nbytes = default_ceiling_bytes() if buffer_bytes is None else int(buffer_bytes)
    n = max(nbytes // 8, 1)
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    moved = 2 * src.nbytes
    threads = usable_cpus() if threads is None else max(int(threads), 1)
    best = None
    variants = {}
    with ThreadPoolExecutor(max_workers=threads) as pool:
        tries = [("np.copyto, 1 thread", sliced_copy(dst, src))]
        if threads > 1:
            tries.append((f"np.copyto, {threads} threads", sliced_copy(dst, src, pool, threads)))
        parallel = numba_copy(dst, src)
        if parallel is not None:
            tries.append(("numba parallel copy", parallel))
        for method, fn in tries:
            times = time_calls(fn, repeat, max(warmup, 1))  # warm-up faults dst in
            med = statistics.median(times)
            variants[method] = moved / med / 1e9
            if best is None or med < best[2]:
                best = (method, times, med)
    method, times, med = best
    return Ceiling("cpu", method, src.nbytes, moved, times, med, moved / med / 1e9, variants)


class CpuDevice:
    """The host: calls timed with ``time.perf_counter``; ceiling: a
    multi-threaded ``np.copyto`` (:func:`measure_copy_ceiling`)."""

    kind = "cpu"
    timer = "time.perf_counter around each call"
    default_timing = Timing(repeat=5, warmup=1, min_time=0.25, max_repeat=200)
    quick_timing = Timing(repeat=3, warmup=1, min_time=0.05, max_repeat=50)

    def __init__(self):
        self.threads = usable_cpus()
        self.name = f"{cpu_model()} ({self.threads} cores)"
        self.cache_bytes = last_level_cache_bytes()
        self._pool: ThreadPoolExecutor | None = None  # the same-size copy's threads, made on first use

    def time(self, fn: Callable[[], Any], timing: Timing) -> list[float]:
        return time_calls(fn, timing.repeat, timing.warmup, timing.min_time, timing.max_repeat)

    def synchronize(self) -> None:
        """Nothing to wait for on the host."""

    def memory_budget_bytes(self) -> int:
        """What the ``--cold`` copies may use: a quarter of the available memory."""
        return available_memory_bytes() // 4

    def measure_ceiling(self, buffer_bytes: int | None = None, repeat: int = 5, warmup: int = 1) -> Ceiling:
        return measure_copy_ceiling(buffer_bytes, repeat, warmup, self.threads)

    def copy_implementation(self) -> Implementation:
        """The same-size copy reference (:data:`COPY`): x copied into a
        preallocated buffer of its size by the fastest copy available here:
        :func:`numba_copy` when numba is installed, else ``np.copyto`` on
        one thread or on :attr:`threads` threads, sliced as the ceiling is
        (:func:`sliced_copy`; one thread pool, kept by this device, serves
        every prepared copy), whichever of the two was faster on three
        calls (a pool's hand-offs cost more than they save on small
        arrays)."""
        use_numba = _numba_copy_kernel() is not None
        if not use_numba and self._pool is None and self.threads > 1:
            self._pool = ThreadPoolExecutor(max_workers=self.threads)
        pool, threads = self._pool, self.threads
        faster = {}  # x.nbytes -> index of the faster np.copyto variant, timed once per size

        def prepare(op: str, inp: Inputs) -> Runner:
            if op != COPY:
                raise Unsupported(op)
            dst = np.empty_like(inp.x)
            if use_numba:
                run = numba_copy(dst, inp.x)
                run()  # fault the destination's pages in: a preallocated buffer is a used one
                return run
            tries = [sliced_copy(dst, inp.x)] + ([sliced_copy(dst, inp.x, pool, threads)] if pool else [])
            if inp.x.nbytes not in faster:  # the --cold copies of one case reuse the choice
                times = [min(time_calls(fn, 3, 1)) for fn in tries]  # the warm-up faults dst in
                faster[inp.x.nbytes] = times.index(min(times))
            run = tries[faster[inp.x.nbytes]]
            run()  # fault the destination's pages in (again, when the choice was made on another copy)
            return run

        if use_numba:
            return Implementation("numba-copy", prepare,
                                  "a Numba parallel loop copying x into a preallocated buffer",
                                  role=COPY, checked=False)
        return Implementation("np.copyto", prepare,
                              f"np.copyto of x into a preallocated buffer, on 1 or {threads} threads "
                              "(the faster)", role=COPY, checked=False)


class CudaDevice:
    """The current CUDA device through CuPy: calls timed with CUDA events
    (:class:`EventTimer`); ceiling: ``cupy.copyto`` between two preallocated
    device buffers (default 1 GiB each, far beyond any L2)."""

    kind = "gpu"
    timer = "CUDA events (cupy.cuda.Event) around each call, stop event synchronized"
    default_timing = Timing(repeat=20, warmup=3, min_time=0.2, max_repeat=2000)
    quick_timing = Timing(repeat=10, warmup=2, min_time=0.05, max_repeat=500)

    def __init__(self, cupy_module=None):
        cp = _cupy() if cupy_module is None else cupy_module
        self._cp = cp
        dev = cp.cuda.Device()
        props = cp.cuda.runtime.getDeviceProperties(dev.id)
        name = props.get("name", b"CUDA device")
        self.name = f"{name.decode() if isinstance(name, bytes) else name} (device {dev.id})"
        self.cache_bytes = int(props.get("l2CacheSize", 0)) or None
        self._timer = EventTimer(cp.cuda.Event, cp.cuda.get_elapsed_time, dev.synchronize)

    def time(self, fn: Callable[[], Any], timing: Timing) -> list[float]:
        return self._timer.time(fn, timing)

    def synchronize(self) -> None:
        """Wait for all work queued on the device."""
        self._timer.synchronize()

    def memory_budget_bytes(self) -> int:
        free, _total = self._cp.cuda.runtime.memGetInfo()
        return free // 4

    def measure_ceiling(self, buffer_bytes: int | None = None, repeat: int = 20, warmup: int = 3) -> Ceiling:
        cp = self._cp
        nbytes = min(GiB, self.memory_budget_bytes()) if buffer_bytes is None else int(buffer_bytes)
        n = max(nbytes // 8, 1)
        src = cp.ones(n, dtype=cp.float64)
        dst = cp.empty_like(src)
        times = self._timer.time(lambda: cp.copyto(dst, src), Timing(repeat, max(warmup, 1)))
        med = statistics.median(times)
        moved = 2 * n * 8
        method = "cupy.copyto device to device"
        return Ceiling("gpu", method, n * 8, moved, times, med, moved / med / 1e9,
                       {method: moved / med / 1e9})

    def copy_implementation(self) -> Implementation:
        """The same-size copy reference (:data:`COPY`): ``cupy.copyto`` of x
        (on the device) into a preallocated device buffer of its size."""
        cp = self._cp

        def prepare(op: str, inp: Inputs) -> Runner:
            if op != COPY:
                raise Unsupported(op)
            src = cp.asarray(inp.x)
            dst = cp.empty_like(src)
            return lambda: cp.copyto(dst, src)

        return Implementation("cupy.copyto", prepare, "cupy.copyto of x into a preallocated device buffer",
                              device="gpu", role=COPY, checked=False)


def make_device(kind: str):
    """:class:`CpuDevice` for ``"cpu"``, :class:`CudaDevice` for ``"gpu"``."""
    if kind == "cpu":
        return CpuDevice()
    if kind == "gpu":
        return CudaDevice()
    raise ValueError(f"unknown device kind {kind!r}")


#: ``--cold`` makes at most this many copies of the inputs.

def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo, else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def system_info() -> dict:
    """Versions and machine facts for ``bnkernels info`` and bench headers.

    Does not import optional packages (torch's version comes from its
    installed metadata).
    """
    from importlib import metadata

    from .. import __version__

    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    return {
        "bnkernels": __version__,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "python_executable": sys.executable,
        "numpy": np.__version__,
        "torch": torch_version,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "last_level_cache_bytes": last_level_cache_bytes(),
        "caches": cpu_caches.describe(),
        "memory_available_bytes": available_memory_bytes(),
    }


__all__ = [
    'Ceiling', 'CpuDevice', 'CudaDevice', '_check_copy_pair', '_numba_copy_kernel',
    'available_memory_bytes', 'cpu_model', 'default_ceiling_bytes', 'last_level_cache_bytes',
    'make_device', 'measure_copy_ceiling', 'numba_copy', 'sliced_copy', 'system_info', 'usable_cpus',
]
