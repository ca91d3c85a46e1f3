"""What is timed: :class:`Implementation` (a named candidate on a device;
``prepare(op, inputs)`` does the set-up and returns the timed callable) for
the bnkernels backends, the textbook NumPy/CuPy code and torch, and
:func:`implementation_catalog` (every implementation this machine knows
of, and why one cannot run here)."""
from __future__ import annotations

from dataclasses import dataclass
from importlib.util import find_spec
from typing import Any, Callable, Sequence

import numpy as np

from .ops import BASELINE, CANDIDATE, EPS, Inputs, TEXTBOOK, TORCH, Unsupported, _host


Runner = Callable[[], Sequence[Any]]




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


def _bshape(x, axis):
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return tuple(shape)


def _axes(x, axis):
    return tuple(i for i in range(x.ndim) if i != axis % x.ndim)


def _xp(a):
    """The array module of ``a``: cupy for CuPy arrays, else numpy."""
    if type(a).__module__.partition(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def textbook_forward_train(x, gamma, beta, axis=1, eps=EPS):
    """Training forward as tutorials write it: ``x.mean``, ``x.var`` and
    broadcasting (NumPy or CuPy arrays). Returns ``(y, mean, var)``
    (statistics with kept dims)."""
    xp = _xp(x)
    axes = _axes(x, axis)
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    y = (x - mean) / xp.sqrt(var + eps) * gamma.reshape(_bshape(x, axis)) + beta.reshape(_bshape(x, axis))
    return y, mean, var


def textbook_forward_infer(x, running_mean, running_var, gamma, beta, axis=1, eps=EPS):
    """Inference forward as tutorials write it, from running statistics."""
    xp = _xp(x)
    bs = _bshape(x, axis)
    return ((x - running_mean.reshape(bs)) / xp.sqrt(running_var.reshape(bs) + eps)
            * gamma.reshape(bs) + beta.reshape(bs))


def textbook_backward(dy, x, mean, var, gamma, axis=1, eps=EPS):
    """Backward as tutorials write it out, step by step through mean and var
    (the staged computational-graph derivation). ``mean``, ``var``: the
    forward's statistics with kept dims. Returns ``(dx, dgamma, dbeta)``."""
    xp = _xp(x)
    axes = _axes(x, axis)
    n = x.size // x.shape[axis]
    xmu = x - mean
    std_inv = 1.0 / xp.sqrt(var + eps)
    xhat = xmu * std_inv
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * xhat).sum(axis=axes)
    dxhat = dy * gamma.reshape(_bshape(x, axis))
    dvar = (dxhat * xmu).sum(axis=axes, keepdims=True) * -0.5 * std_inv**3
    dmean = (-dxhat * std_inv).sum(axis=axes, keepdims=True) + dvar * (-2.0 * xmu).mean(axis=axes,
                                                                                      keepdims=True)
    dx = dxhat * std_inv + dvar * 2.0 * xmu / n + dmean / n
    return dx, dgamma, dbeta


def _quiet(fn: Runner) -> Runner:
    """``fn`` with NumPy floating-point warnings off (textbook float16 sums
    overflow; that shows as a WRONG result, not as a warning)."""
    def run():
        with np.errstate(all="ignore"):
            return fn()
    return run


def _cupy():
    import cupy

    return cupy


def _converters(device: str):
    """(host -> device array, device array -> host) for a device kind."""
    if device == "gpu":
        cp = _cupy()
        return cp.asarray, cp.asnumpy
    return np.asarray, _host


def _textbook_prepare(device: str):
    to_dev, _ = _converters(device)

    def prepare(op: str, inp: Inputs) -> Runner:
        x, dy, axis, eps = to_dev(inp.x), to_dev(inp.dy), inp.axis, inp.eps
        # Parameters in the activations' dtype, as a tutorial model holds them.
        gamma, beta = to_dev(inp.gamma.astype(inp.x.dtype)), to_dev(inp.beta.astype(inp.x.dtype))
        if op == "train":
            return _quiet(lambda: (textbook_forward_train(x, gamma, beta, axis, eps)[0],))
        if op == "infer":
            rm = to_dev(inp.running_mean.astype(inp.x.dtype))
            rv = to_dev(inp.running_var.astype(inp.x.dtype))
            return _quiet(lambda: (textbook_forward_infer(x, rm, rv, gamma, beta, axis, eps),))
        if op == "backward":
            with np.errstate(all="ignore"):
                _, mean, var = textbook_forward_train(x, gamma, beta, axis, eps)
            return _quiet(lambda: textbook_backward(dy, x, mean, var, gamma, axis, eps))
        raise Unsupported(op)

    return prepare


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
    from ..batch_norm import bn_backward, bn_forward

    to_dev, to_host = _converters(device)

    def prepare(op: str, inp: Inputs) -> Runner:
        x, dy, g, b = to_dev(inp.x), to_dev(inp.dy), to_dev(inp.gamma), to_dev(inp.beta)
        axis, eps = inp.axis, inp.eps
        out = to_dev(np.zeros_like(inp.x)) if preallocated else None  # zeros: the pages are touched
        if op == "train":
            return lambda: (bn_forward(x, g, b, axis=axis, eps=eps, backend=backend, out=out),)
        if op == "infer":
            rm, rv = to_dev(inp.running_mean), to_dev(inp.running_var)
            return lambda: (bn_forward(x, g, b, rm, rv, training=False, axis=axis, eps=eps,
                                       backend=backend, out=out),)
        if op == "backward":
            _, saved = bn_forward(x, g, b, axis=axis, eps=eps, backend=backend, return_saved=True)
            return lambda: bn_backward(dy, x, saved.mean, saved.invstd, g, axis=axis, backend=backend,
                                       out=out)
        raise Unsupported(op)

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
        return torch.from_numpy(a).to(tdev)

    def prepare(op: str, inp: Inputs) -> Runner:
        x, axis, eps = inp.x, inp.axis, inp.eps
        # torch takes half input with float32 parameters (mixed precision);
        # otherwise parameters must match the input dtype.
        pdt = np.float32 if x.dtype == np.float16 else x.dtype
        w, b = tensor(inp.gamma.astype(pdt)), tensor(inp.beta.astype(pdt))
        xt = tensor(x)
        if op == "train":
            xv = xt.movedim(axis, 1)
            return lambda: (F.batch_norm(xv, None, None, w, b, training=True, eps=eps).movedim(1, axis),)
        if op == "infer":
            xv = xt.movedim(axis, 1)
            rm, rv = tensor(inp.running_mean.astype(pdt)), tensor(inp.running_var.astype(pdt))
            return lambda: (F.batch_norm(xv, rm, rv, w, b, training=False, eps=eps).movedim(1, axis),)
        if op == "backward":
            xt.requires_grad_(True)
            w.requires_grad_(True)
            b.requires_grad_(True)
            y = F.batch_norm(xt.movedim(axis, 1), None, None, w, b, training=True, eps=eps)
            dyt = tensor(inp.dy).movedim(axis, 1)
            return lambda: torch.autograd.grad(y, (xt, w, b), dyt, retain_graph=True)
        raise Unsupported(op)

    where = "CUDA" if device == "gpu" else "CPU"
    return Implementation("torch-cuda" if device == "gpu" else "torch", prepare,
                          f"torch {torch.__version__} F.batch_norm + autograd ({where})",
                          to_host=lambda t: t.detach().cpu().numpy(), device=device, role=TORCH)


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
    'CatalogEntry', 'Implementation', 'OUT_SUFFIX', 'Runner', 'TEXTBOOK_NUMPY', '_axes', '_bshape',
    '_converters', '_cupy', '_quiet', '_textbook_prepare', '_xp', 'bnkernels_implementation',
    'gpu_problem', 'implementation_catalog', 'import_torch', 'textbook_backward',
    'textbook_cupy_implementation', 'textbook_forward_infer', 'textbook_forward_train',
    'torch_implementation',
]
