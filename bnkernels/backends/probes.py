"""Can this process run a GPU backend? Probes that say why not.

Each probe returns ``None`` when its requirement is met, otherwise a short
reason that names what is missing (package, driver, device); the registry
adds what to install. Results are cached per process on first use, never at import time;
``clear_probe_cache()`` forgets them (tests use it).
"""
from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.metadata
import os
import sys

def _one_line(exc: BaseException) -> str:
    """An exception as one line (driver errors come with blank lines)."""
    return " ".join(f"{type(exc).__name__}: {exc}".split()).rstrip(" :")


CUDA_EXTRA = 'pip install "bnkernels[cuda13]" (CUDA 13 driver) or "bnkernels[cuda12]"'


@functools.cache
def missing_package(module: str) -> str | None:
    """``None`` if ``module`` imports, else why not."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        return f"{exc.name or module} is not installed"
    except ImportError as exc:  # installed but broken (e.g. a missing shared library)
        return f"{module} is installed but fails to import: {_one_line(exc)}"
    return None


@functools.cache
def module_problem(module: str) -> str | None:
    """``None`` if a backend's own module loads, else why not: its
    requirements can be met while the module still fails (as Numba's
    on-disk cache once did in a read-only install), and such a backend
    must be reported unusable rather than fail every call."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # anything at all: the backend cannot run
        return f"the backend module {module} fails to load: {_one_line(exc)}"
    return None


#: The NVIDIA driver's library, loaded by every CUDA program.
DRIVER_LIBRARY = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
_CUDA_ERROR_NO_DEVICE = 100


@functools.cache
def driver_problem() -> str | None:
    """Why the NVIDIA driver cannot run CUDA here, or None: asked of the
    driver itself (``cuInit``, ``cuDeviceGetCount``) before any GPU
    package, whose own messages mislead without a driver (CuPy reports "CUDA
    driver version is insufficient" on a machine that has none)."""
    try:
        lib = ctypes.CDLL(DRIVER_LIBRARY)
    except OSError:
        return f"no NVIDIA driver found ({DRIVER_LIBRARY} cannot be loaded)"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    no_device = "no CUDA device is visible" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
    err = lib.cuInit(0)
    if err == _CUDA_ERROR_NO_DEVICE:
        return no_device
    if err:
        return f"the NVIDIA driver failed to initialize (cuInit returned CUDA error {err})"
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) or count.value == 0:
        return no_device
    return None


def distribution_version(name: str) -> str | None:
    """The installed version of a distribution (pip's name), or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def cupy_device_problem() -> str | None:
    """Why CuPy cannot reach a GPU (no cupy / no driver / no device), or None."""
    problem = missing_package("cupy")
    if problem:
        return problem
    if driver_problem():
        return f"cupy is installed but the CUDA driver is not usable: {driver_problem()}"
    import cupy

    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError: no driver, driver too old, ...
        return f"cupy is installed but the CUDA driver is not usable: {_one_line(exc)}"
    if count == 0:
        return "cupy is installed but no CUDA device is visible (check CUDA_VISIBLE_DEVICES)"
    return None


@functools.cache
def numba_cuda_device_problem() -> str | None:
    """Why numba-cuda cannot reach a GPU, or None."""
    problem = missing_package("numba.cuda")
    if problem:
        return problem
    who = "numba-cuda is installed"
    if distribution_version("numba-cuda") is None:  # numba bundles a deprecated numba.cuda of its own
        who = "numba-cuda is not installed (numba's own numba.cuda is)"
    from numba import config, cuda

    if driver_problem() and not getattr(config, "ENABLE_CUDASIM", 0):  # the simulator needs no driver
        return f"{who} but the CUDA driver is not usable: {driver_problem()}"

    try:
        if cuda.is_available():
            return None
        cuda.detect()  # raises with the driver's own reason when it can
    except Exception as exc:
        return f"{who} but the CUDA driver is not usable: {_one_line(exc)}"
    return f"{who} but no CUDA driver or device was found"


def clear_probe_cache() -> None:
    for probe in (missing_package, module_problem, driver_problem, cupy_device_problem,
                  numba_cuda_device_problem):
        probe.cache_clear()
