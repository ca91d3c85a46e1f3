"""What is timed: :class:`Implementation` (a named candidate on a device;
``prepare(op, inputs)`` does the set-up and returns the timed callable) for
the bnkernels backends, the textbook NumPy/CuPy code and torch, and
:func:`implementation_catalog` (every implementation this machine knows
of, and why one cannot run here)."""
from __future__ import annotations

from dataclasses import dataclass
from importlib.util import find_spec
from typing import Any, Callable

import numpy as np

from .operations import OPERATIONS, Runner
from .ops import BASELINE, CANDIDATE, Inputs, TEXTBOOK, TORCH, Unsupported, _host


@dataclass(frozen=True)
class Implementation:
    """A named implementation to check and time.

    ``prepare(op, inputs)`` takes host :class:`Inputs`, does the set-up
    (copies to the device, a forward pass for backward, ...) and returns a
    zero-argument callable that runs ``op`` once and returns its outputs:
    ``(y,)`` for ``"train"`` and ``"infer"``, ``(dx, dgamma, dbeta)`` for
    ``"backward"``. It raises :class:`Unsupported` for what it cannot do.
    ``to_host`` turns one output into a NumPy array. ``device``: ``"cpu"`` or
    ``"gpu"`` (which :class:`CpuDevice`/:class:`CudaDevice` times it);
    ``role``: :data:`CANDIDATE`, :data:`TEXTBOOK`, :data:`TORCH` or
    :data:`COPY`. ``checked``: False for the same-size copy, which has no
    outputs to check (:func:`run_one` then only calls it once untimed).
    """

    name: str
    prepare: Callable[[str, Inputs], Runner]
    description: str = ""
    to_host: Callable[[Any], np.ndarray] = _host
    device: str = "cpu"
    role: str = CANDIDATE
    checked: bool = True


def _cupy():
    import cupy

    return cupy


def _converters(device: str):
    """(host -> device array, device array -> host) for a device kind. On
    the GPU, bfloat16 data go as torch CUDA tensors (CuPy has no bfloat16;
    bnkernels' GPU backends take torch's)."""
    if device == "gpu":
        cp = _cupy()

        def to_dev(a):
            if a.dtype.name == "bfloat16":
                return _torch_bfloat16(a, "cuda")
            return cp.asarray(a)

        def to_host(a):
            return _host(a) if type(a).__module__.startswith("torch") else cp.asnumpy(a)

        return to_dev, to_host
    return np.asarray, _host


def _torch_bfloat16(a: np.ndarray, device: str):
    """NumPy's (ml_dtypes') bfloat16 array as a torch tensor (its bits)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).to(device)


def _textbook_prepare(device: str):
    to_dev, _ = _converters(device)

    def prepare(op: str, inp: Inputs) -> Runner:
        if device == "gpu" and inp.x.dtype.name == "bfloat16":
            raise Unsupported("CuPy has no bfloat16")
        return _operation(op).textbook(inp, to_dev)

    return prepare


def _operation(op: str):
    if op not in OPERATIONS:
        raise Unsupported(op)
    return OPERATIONS[op]


#: The tutorial-style NumPy implementation the CPU speed-ups are relative to.
TEXTBOOK_NUMPY = Implementation(BASELINE, _textbook_prepare("cpu"),
                                "x.mean/x.var and broadcasting, as tutorials write it", role=TEXTBOOK)


def textbook_cupy_implementation() -> Implementation:
    """The same textbook code on CuPy arrays: the GPU textbook baseline."""
    return Implementation("textbook-cupy", _textbook_prepare("gpu"),
                          "the textbook code on CuPy arrays", to_host=_cupy().asnumpy, device="gpu",
                          role=TEXTBOOK)


#: Suffix of the implementation names that pass a preallocated ``out=``.
OUT_SUFFIX = "+out"


def bnkernels_implementation(backend: str, device: str = "cpu", preallocated: bool = False) -> Implementation:
    """The public API (``bn_forward``/``bn_backward``) on a named backend;
    for a GPU backend the inputs are CuPy arrays (results stay on the GPU).
    ``preallocated``: y (dx) goes into a buffer allocated once in prepare
    (``out=``), named ``<backend>+out``: what a training loop that reuses
    its buffers sees, without the allocation (page faults for large arrays)
    that every other row includes."""
    to_dev, to_host = _converters(device)

    def prepare(op: str, inp: Inputs) -> Runner:
        out = to_dev(np.zeros_like(inp.x)) if preallocated else None  # zeros: the pages are touched
        return _operation(op).bnkernels(inp, to_dev, backend, out)

    if preallocated:
        return Implementation(backend + OUT_SUFFIX, prepare,
                              f"bnkernels backend {backend!r} writing into a preallocated out=",
                              to_host=to_host, device=device)
    return Implementation(backend, prepare, f"bnkernels backend {backend!r}", to_host=to_host,
                          device=device)


def import_torch():
    """``torch`` if it imports, else None (never raises)."""
    try:
        import torch
    except (ImportError, OSError):  # OSError: installed but a shared library is missing
        return None
    return torch


def torch_implementation(threads: int | None = None, device: str = "cpu") -> Implementation | None:
    """``torch.nn.functional.batch_norm`` (backward through autograd) on the
    CPU or, with ``device="gpu"``, on CUDA; None when torch does not import
    or has no CUDA device.

    The channel axis is moved to position 1 as a view (an NHWC array becomes
    a channels_last tensor, which torch handles without a copy). On the CPU
    the tensors share the NumPy buffers. ``threads``: if given,
    ``torch.set_num_threads(threads)`` (process-wide); otherwise torch's own
    default is left alone.
    """
    torch = import_torch()
    if torch is None or (device == "gpu" and not torch.cuda.is_available()):
        return None
    if threads is not None:
        torch.set_num_threads(threads)
    import torch.nn.functional as F

    tdev = "cuda" if device == "gpu" else "cpu"

    def tensor(a):
        if a.dtype.name == "bfloat16":
            return _torch_bfloat16(a, tdev)
        return torch.from_numpy(a).to(tdev)

    def prepare(op: str, inp: Inputs) -> Runner:
        return _operation(op).torch(inp, tensor, F)

    where = "CUDA" if device == "gpu" else "CPU"
    return Implementation("torch-cuda" if device == "gpu" else "torch", prepare,
                          f"torch {torch.__version__} F.batch_norm + autograd ({where})",
                          to_host=_host, device=device, role=TORCH)


def gpu_problem() -> str | None:
    """Why nothing can be benchmarked on a GPU here, or None. GPU benchmarks
    need CuPy with a device: the inputs are CuPy arrays, the timer CuPy's
    CUDA events and the ceiling a CuPy device-to-device copy."""
    from ..backends import probes

    problem = probes.cupy_device_problem()
    return None if problem is None else f"{problem} (GPU benchmarks need CuPy and a CUDA device)"


@dataclass(frozen=True)
class CatalogEntry:
    """One implementation ``bnkernels bench`` knows of: ``make()`` builds it,
    ``problem`` says why it cannot run here (None: it can); ``default``:
    run when ``--backends`` is not given."""

    name: str
    device: str
    role: str
    problem: str | None
    make: Callable[[], Implementation | None]
    default: bool = True


def implementation_catalog(torch_threads: int | None = None) -> dict[str, CatalogEntry]:
    """Every implementation name, in report order: bnkernels backends (CPU,
    then GPU; each also as ``<name>+out``, with a preallocated output, run
    only when named), the textbook baselines, torch on the CPU and on CUDA.
    Planned backends are listed with the reason they cannot run."""
    from ..backends import available_backends
    from ..backends.probes import CUDA_EXTRA

    gpu = gpu_problem()
    entries: list[CatalogEntry] = []
    statuses = sorted(available_backends().values(), key=lambda s: s.device != "cpu")
    for s in statuses:
        problem = None if s.available else f"{s.reason}; to get it: {s.install}"
        if s.device == "gpu" and problem is None and gpu is not None:
            problem = f"{gpu}; to get it: {CUDA_EXTRA}"
        entries.append(CatalogEntry(s.name, s.device, CANDIDATE, problem,
                                    lambda name=s.name, dev=s.device: bnkernels_implementation(name, dev)))
        # the same with a preallocated out=, run only when named
        entries.append(CatalogEntry(s.name + OUT_SUFFIX, s.device, CANDIDATE, problem,
                                    lambda name=s.name, dev=s.device: bnkernels_implementation(name, dev, True),
                                    default=False))
    entries.append(CatalogEntry(BASELINE, "cpu", TEXTBOOK, None, lambda: TEXTBOOK_NUMPY))
    entries.append(CatalogEntry("textbook-cupy", "gpu", TEXTBOOK,
                                None if gpu is None else f"{gpu}; to get it: {CUDA_EXTRA}",
                                textbook_cupy_implementation))
    torch_missing = None
    if find_spec("torch") is None:
        torch_missing = 'torch is not installed; to get it: pip install "bnkernels[torch]"'
    entries.append(CatalogEntry("torch", "cpu", TORCH, torch_missing,
                                lambda: torch_implementation(torch_threads, "cpu")))
    cuda_torch = torch_missing or gpu
    if cuda_torch is None:
        torch = import_torch()
        if torch is None:
            cuda_torch = "torch does not import"
        elif not torch.cuda.is_available():
            cuda_torch = f"torch {torch.__version__} has no CUDA device (torch.cuda.is_available() is False)"
    entries.append(CatalogEntry("torch-cuda", "gpu", TORCH, cuda_torch,
                                lambda: torch_implementation(torch_threads, "gpu")))
    return {e.name: e for e in entries}


__all__ = [
    'CatalogEntry', 'Implementation', 'OUT_SUFFIX', 'TEXTBOOK_NUMPY', '_converters', '_cupy',
    '_textbook_prepare', 'bnkernels_implementation', 'gpu_problem', 'implementation_catalog', 'import_torch',
    'textbook_cupy_implementation', 'torch_implementation',
]
