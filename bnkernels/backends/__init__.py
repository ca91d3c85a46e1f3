"""Backend registry and dispatch.

A backend is a module with the members of ``interface.Backend`` (the stages
of a normalization and their fused forms; ``numpy_backend`` is the
reference implementation). Backends are looked up by
name on every call; nothing is chosen at import time, so any number of
backends can be used side by side in one process.

Names:

- ``"numpy"``: vectorized NumPy, always available.
- ``"numba"``: fused parallel CPU kernels (preferred for host arrays when
  numba is installed).
- ``"cupy"``: CUDA C++ kernels (``kernels/``) through ``cupy.RawModule``.
- ``"numba-cuda"``: Numba CUDA kernels.
- ``"cuda"``: the best usable GPU backend; falls back to the best CPU backend
  with a :class:`~bnkernels.BackendFallbackWarning` (Python's warnings
  filters decide how often it shows), or raises
  :class:`~bnkernels.BackendUnavailableError` instead when the environment
  variable ``BNKERNELS_NO_FALLBACK=1``.
- ``"auto"``: follow the input: arrays exposing ``__cuda_array_interface__``
  go to a GPU backend, host arrays to the best CPU backend. The environment
  variable ``BNKERNELS_BACKEND`` overrides ``"auto"``.
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable

from ..errors import BackendFallbackWarning, BackendUnavailableError
from . import probes

ENV_VAR = "BNKERNELS_BACKEND"
#: Set to 1: ``backend="cuda"`` raises instead of falling back to the CPU.
NO_FALLBACK_VAR = "BNKERNELS_NO_FALLBACK"


@dataclass(frozen=True)
class BackendSpec:
    name: str
    device: str  # "cpu" or "gpu"
    module: str  # the implementation module
    requirement: Callable[[], str | None]  # None when usable, else why not
    install: str  # what a user installs to get it
    package: str | None = None  # the optional package it imports (None: always there)


def _always() -> None:
    return None


#: Every backend, in order of preference within its device kind.
BACKENDS: tuple[BackendSpec, ...] = (
    BackendSpec("cupy", "gpu", "bnkernels.backends.cupy_backend", probes.cupy_device_problem, probes.CUDA_EXTRA,
                "cupy"),
    BackendSpec("numba-cuda", "gpu", "bnkernels.backends.numba_cuda", probes.numba_cuda_device_problem,
                probes.CUDA_EXTRA, "numba.cuda"),
    BackendSpec("numba", "cpu", "bnkernels.backends.numba_backend",
                lambda: probes.missing_package("numba"),
                'pip install "bnkernels[numba]"', "numba"),
    BackendSpec("numpy", "cpu", "bnkernels.backends.numpy_backend", _always, "numpy (always installed)"),
)
_BY_NAME = {spec.name: spec for spec in BACKENDS}
SELECTORS = ("auto", "cuda")


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend is usable here, and if not, why."""

    name: str
    device: str
    available: bool
    reason: str | None
    install: str


def _unavailable_reason(spec: BackendSpec) -> str | None:
    return spec.requirement() or probes.module_problem(spec.module)


def _install_hint(spec: BackendSpec) -> str:
    """What to install for an unusable backend: its extra, unless its
    package is there and what is missing is the GPU or its driver."""
    if spec.device == "gpu" and not probes.missing_package(spec.package) and probes.driver_problem():
        return "an NVIDIA GPU and its driver (the Python packages are installed)"
    return spec.install


def available_backends() -> dict[str, BackendStatus]:
    """Status of every backend, in order of preference.

    Returns a dict ``name -> BackendStatus(name, device, available, reason,
    install)``; ``reason`` says why an unavailable backend
    cannot run here.
    """
    out = {}
    for spec in BACKENDS:
        reason = _unavailable_reason(spec)
        out[spec.name] = BackendStatus(spec.name, spec.device, reason is None, reason,
                                       spec.install if reason is None else _install_hint(spec))
    return out


def backend_details(name: str) -> str:
    """What a usable backend says of how it runs here (its module's
    ``describe()``, e.g. threads), or "" when it has nothing to say."""
    describe = getattr(_load(_BY_NAME[name]), "describe", None)
    return describe() if describe is not None else ""


def runs_on_gpu(impl) -> bool:
    """Whether a backend module (from :func:`resolve`) is a GPU backend."""
    return _BY_NAME[impl.name].device == "gpu"


def is_device_array(x) -> bool:
    """True for arrays that live on a CUDA device (CuPy, Numba, torch CUDA)."""
    return hasattr(x, "__cuda_array_interface__")


def _load(spec: BackendSpec):
    return importlib.import_module(spec.module)


def _best(device: str):
    """First usable backend of a device kind: (spec, None) or (None, reasons)."""
    reasons = []
    for spec in BACKENDS:
        if spec.device != device:
            continue
        reason = _unavailable_reason(spec)
        if reason is None:
            return spec, None
        reasons.append(f"{spec.name}: {reason} (to get it: {_install_hint(spec)})")
    return None, reasons


def _no_fallback() -> bool:
    value = os.environ.get(NO_FALLBACK_VAR, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{NO_FALLBACK_VAR}={value!r}: expected 1 (backend='cuda' raises instead of falling back "
                     "to the CPU) or 0")


def _why_no_gpu(reasons: list[str]) -> str:
    """Why no GPU backend runs, in a few words: nothing installed, the
    driver (what a user can act on), or the first backend's own reason;
    ``bnkernels info`` has every backend's."""
    gpu = [spec for spec in BACKENDS if spec.device == "gpu"]
    if all(probes.missing_package(spec.package) for spec in gpu):
        return f"no GPU backend is installed (to get one: {probes.CUDA_EXTRA})"
    if probes.driver_problem():
        return f"no usable GPU: {probes.driver_problem()}"
    return f"no GPU backend is usable ({reasons[0]})"


def _fall_back(cpu_name: str, reasons: list[str]) -> None:
    """Warn (or, with BNKERNELS_NO_FALLBACK=1, raise) that backend='cuda'
    runs on the CPU. Each call warns: Python's warnings machinery decides
    what is shown (by default once per calling line), so users' filters,
    "error" included, work at any time."""
    why = _why_no_gpu(reasons)
    if _no_fallback():
        raise BackendUnavailableError(f"backend='cuda': {why}, and {NO_FALLBACK_VAR}=1 forbids falling back to "
                                      "the CPU (`bnkernels info` shows every backend's reason)")
    warnings.warn(f"backend='cuda' fell back to the CPU backend {cpu_name!r}: {why}. `bnkernels info` shows "
                  f"every backend's reason; {NO_FALLBACK_VAR}=1 raises instead", BackendFallbackWarning,
                  stacklevel=4)


def check_backend_name(backend) -> None:
    """A ``backend`` argument: a string naming a selector or a backend
    (whether it can run here is decided when it is used)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend not in SELECTORS and backend not in _BY_NAME:
        raise ValueError(f"unknown backend {backend!r}; valid names: {_valid_names()}")


def _valid_names() -> str:
    return ", ".join(repr(n) for n in (*SELECTORS, *_BY_NAME))


def resolve(backend: str, x=None):
    """Return the backend module that should run an operation on ``x``.

    Raises ``ValueError`` for an unknown name, ``BackendUnavailableError`` when
    an explicitly named backend (or any GPU backend for a GPU array) cannot
    run here.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    origin = f"backend={backend!r}"
    if backend == "auto":
        override = os.environ.get(ENV_VAR, "").strip()
        if override and override != "auto":
            backend, origin = override, f"{ENV_VAR}={override!r}"
    on_device = is_device_array(x)

    if backend == "auto" or backend == "cuda":
        spec, reasons = _best("gpu")
        if spec is not None and (on_device or backend == "cuda"):
            return _load(spec)
        if on_device:
            raise BackendUnavailableError(
                "the input is a GPU array but no GPU backend is usable: " + "; ".join(reasons or []))
        cpu_spec, _ = _best("cpu")
        if backend == "cuda":
            _fall_back(cpu_spec.name, reasons)
        return _load(cpu_spec)

    spec = _BY_NAME.get(backend)
    if spec is None:
        raise ValueError(f"unknown backend {backend!r} (from {origin}); valid names: {_valid_names()}")
    reason = _unavailable_reason(spec)
    if reason is not None:
        raise BackendUnavailableError(f"{origin} is not available: {reason}. To get it: {_install_hint(spec)}")
    if on_device and spec.device == "cpu":
        raise TypeError(f"{origin} runs on the CPU but the input is a GPU array; "
                        "use backend='cuda' or copy the array to the host first")
    return _load(spec)
