"""Can this process run a GPU backend? Probes that say why not.

Each probe returns ``None`` when its requirement is met, otherwise a short
reason that names what is missing (package, driver, device); the registry
adds what to install. Results are cached per process on first use, never at import time;
``clear_probe_cache()`` forgets them (tests use it).
"""
from __future__ import annotations

import functools
import importlib

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
def cupy_device_problem() -> str | None:
    """Why CuPy cannot reach a GPU (no cupy / no driver / no device), or None."""
    problem = missing_package("cupy")
    if problem:
        return problem
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
    from numba import cuda

    try:
        if cuda.is_available():
            return None
        cuda.detect()  # raises with the driver's own reason when it can
    except Exception as exc:
        return f"numba-cuda is installed but the CUDA driver is not usable: {_one_line(exc)}"
    return "numba-cuda is installed but no CUDA driver or device was found"


def clear_probe_cache() -> None:
    for probe in (missing_package, cupy_device_problem, numba_cuda_device_problem):
        probe.cache_clear()
