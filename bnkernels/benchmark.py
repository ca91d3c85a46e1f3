"""Measurement code behind ``bnkernels bench`` and the pytest-benchmark suite
in ``bench/``: what is timed, on what, how, and against which ceiling.

Only NumPy and the standard library are needed; PyTorch, CuPy and
matplotlib are imported when asked for (comparison points, GPU timing, the
plot) and their absence is reported, never fatal at import.

Pieces, each usable on its own:

- :class:`Case` (a shape and its channel axis), :data:`NAMED_CASES` (the
  named shapes), :func:`parse_case`, :func:`make_inputs`.
- :class:`Implementation`: a named candidate on a device. Its
  ``prepare(op, inputs)`` does all set-up outside the timed region (device
  copies, a forward pass before backward, ...) and returns a zero-argument
  callable that runs the operation once and returns its outputs.
  :func:`implementation_catalog` lists every implementation this machine
  knows of and why one cannot run here; :func:`bnkernels_implementation`,
  :data:`TEXTBOOK_NUMPY`, :func:`textbook_cupy_implementation` and
  :func:`torch_implementation` build them. Any list of implementations can be
  passed to :func:`run_benchmarks` (the tests add a deliberately wrong one).
- Devices: :class:`CpuDevice` (``time.perf_counter``; ceiling: a
  multi-threaded ``np.copyto``) and :class:`CudaDevice` (CUDA events through
  :class:`EventTimer`; ceiling: a device-to-device ``cupy.copyto``). Both
  have ``time(fn, timing)``, ``measure_ceiling(...)`` and
  ``copy_implementation()`` (the same-size copy reference, :data:`COPY`);
  nothing else in this module knows which device it runs on.
- :func:`reference_outputs` and :func:`check_outputs`: correctness against
  the float64 oracle in :mod:`bnkernels.reference`, before any timing; a
  wrong result is never timed.
- :func:`min_bytes` (:data:`BYTES_MODEL`), :func:`add_derived` (GB/s as % of
  the ceiling and of the same-size copy, speed-ups), :func:`plot_results`
  (matplotlib, optional).
"""
from __future__ import annotations

import functools
import glob
import itertools
import math
import os
import platform
import statistics
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from importlib.util import find_spec
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .reference import reference_backward, reference_forward

#: Operations, in the order they are reported.
OPS = ("train", "infer", "backward")
OP_TITLES = {"train": "training forward", "infer": "inference forward", "backward": "backward"}

#: Minimum traffic of each operation in units of ``x.nbytes`` (see
#: :func:`min_bytes`); ``"copy"`` is the same-size copy reference (:data:`COPY`).
BYTES_FACTOR = {"train": 3, "infer": 2, "backward": 5, "copy": 2}

BYTES_MODEL = (
    "minimum bytes an operation must move, in sizes of x (storage dtype), for a two-pass method: "
    "training forward 3 (read x for the statistics, read x again and write y), inference 2 "
    "(read x, write y), backward 5 (read x and dy for the sums, read x and dy again and write dx); "
    "per-channel vectors are ignored; the same-size copy 2 (read x, write a buffer of its size). "
    "GB/s = bytes / median time / 1e9"
)

ALLOCATION_NOTE = (
    "outputs are not preallocated (textbook NumPy/CuPy and torch.nn.functional.batch_norm return new "
    "arrays, and so do bn_forward and bn_backward unless given out=), so those times include "
    "allocating the outputs, as in real use; the <backend>+out rows pass a preallocated out= instead, "
    "as the copy ceiling and the same-size copy write into preallocated buffers"
)

SAME_SIZE_COPY_NOTE = (
    "% copy = GB/s / GB/s of a copy of x into a preallocated buffer of the same size on the same "
    "device, with the same threads and in the same cache state (hot, or rotated through copies with "
    "--cold), read + write counted; 100 % means the op moved its bytes as fast as that copy. The copy "
    "rows show that copy"
)

#: Roles: candidates are what is being measured (a wrong candidate fails
#: ``bnkernels bench``); the two comparison points give the speed-ups.
CANDIDATE, TEXTBOOK, TORCH = "candidate", "textbook", "torch"

#: The same-size copy reference: both its role and its op (not one of
#: :data:`OPS`; users do not select it). A copy of ``x`` into a preallocated
#: buffer of the same size on the device of the ops, timed like them
#: (``CpuDevice.copy_implementation``, ``CudaDevice.copy_implementation``);
#: ``pct_of_copy`` is relative to it.
COPY = "copy"

#: Name of the CPU textbook baseline.
BASELINE = "textbook-numpy"

#: Allowed error of each output: ``max |out - ref| / max |ref|`` (ref float64).
TOLERANCE = {
    np.dtype(np.float16): 2e-2,
    np.dtype(np.float32): 1e-3,
    np.dtype(np.float64): 1e-9,
}

EPS = 1e-5

MiB = 1 << 20
GiB = 1 << 30


class Unsupported(Exception):
    """Raised by ``Implementation.prepare`` for an op/dtype it does not do."""


# --------------------------------------------------------------------------
# What is measured
# --------------------------------------------------------------------------

def layout_label(shape: Sequence[int], axis: int) -> str:
    """Short layout name: ``NCHW``/``NHWC`` for 4-D, ``2-D`` for (N, C),
    else ``<n>-D axis=<a>``."""
    nd = len(shape)
    ax = axis % nd
    if nd == 4 and ax == 1:
        return "NCHW"
    if nd == 4 and ax == 3:
        return "NHWC"
    if nd == 2 and ax == 1:
        return "2-D"
    return f"{nd}-D axis={ax}"


@dataclass(frozen=True)
class Case:
    """One shape to measure, its channel axis and (optionally) its name."""

    shape: tuple[int, ...]
    axis: int = 1
    name: str = ""

    @property
    def layout(self) -> str:
        return layout_label(self.shape, self.axis)

    @property
    def shape_str(self) -> str:
        return "x".join(str(s) for s in self.shape)

    @property
    def label(self) -> str:
        """The name when there is one, else the dimensions."""
        return self.name or self.shape_str

    def _batch_axis(self) -> int:
        return 1 if self.axis % len(self.shape) == 0 else 0

    def scaled(self, divisor: int) -> "Case":
        """The same case with the batch (first non-channel) dimension divided
        by ``divisor``; the name gets a ``/divisor`` suffix."""
        b = self._batch_axis()
        shape = list(self.shape)
        shape[b] = max(shape[b] // divisor, 2)
        return Case(tuple(shape), self.axis, f"{self.name}/{divisor}" if self.name else "")

    def tiny(self) -> "Case":
        """A few-KB version for smoke tests: every non-channel dimension cut
        to at most 4 (the batch of a 2-D case to 64), same axis and name."""
        nd, ax = len(self.shape), self.axis % len(self.shape)
        cap = 64 if nd == 2 else 4
        shape = tuple(d if i == ax else min(d, cap) for i, d in enumerate(self.shape))
        return Case(shape, self.axis, self.name)


#: The named shapes: what ``bnkernels bench`` and ``pytest bench`` measure by
#: default. ResNet-like activations (stage conv2_x at 56x56, batch 32; stage
#: conv4_x at 14x14, batch 256), the same data channels-last, a dense layer,
#: tall-skinny (many rows, few channels) and small-C (an RGB image batch).
NAMED_CASES: dict[str, Case] = {c.name: c for c in (
    Case((32, 64, 56, 56), 1, "resnet-56"),
    Case((32, 56, 56, 64), -1, "resnet-56-nhwc"),
    Case((256, 256, 14, 14), 1, "resnet-14"),
    Case((256, 14, 14, 256), -1, "resnet-14-nhwc"),
    Case((8192, 1024), 1, "dense"),
    Case((100000, 32), 1, "tall-skinny"),
    Case((64, 3, 224, 224), 1, "small-c"),
)}
DEFAULT_CASES = tuple(NAMED_CASES.values())
#: ``--quick`` runs every named case with the batch divided by this.
QUICK_DIVISOR = 4
QUICK_CASES = tuple(c.scaled(QUICK_DIVISOR) for c in DEFAULT_CASES)


def parse_case(text: str) -> Case:
    """A named shape (``resnet-56``, see :data:`NAMED_CASES`) or
    ``SHAPE[@AXIS]``: ``"8x32x28x28"``, ``"8x28x28x32@-1"`` (axis default 1).
    Raises ``ValueError`` with a readable message."""
    text = text.strip()
    if text in NAMED_CASES:
        return NAMED_CASES[text]
    dims, _, axis_text = text.partition("@")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
        axis = int(axis_text) if axis_text else 1
    except ValueError:
        raise ValueError(f"bad shape {text!r}: expected a name ({', '.join(NAMED_CASES)}) "
                         "or e.g. 8x32x28x28 or 8x28x28x32@-1") from None
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"bad shape {text!r}: dimensions must be positive integers")
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"bad shape {text!r}: axis {axis} out of range for {len(shape)} dimensions")
    if math.prod(shape) // shape[axis] < 2:
        raise ValueError(f"bad shape {text!r}: training needs at least 2 values per channel")
    return Case(shape, axis)


def parse_cases(text: str) -> list[Case]:
    """Comma list of :func:`parse_case` items; ``all`` is every named shape."""
    cases: list[Case] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        cases.extend(DEFAULT_CASES if item == "all" else [parse_case(item)])
    if not cases:
        raise ValueError("no shape given")
    return list(dict.fromkeys(cases))


@dataclass
class Inputs:
    """Host arrays of one case: ``x``, ``dy`` in the benchmark dtype;
    ``gamma``, ``beta``, ``running_mean``, ``running_var`` float32 (C,)."""

    x: np.ndarray
    dy: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    axis: int
    eps: float = EPS

    def copy(self) -> "Inputs":
        """New ``x`` and ``dy`` buffers with the same values (the per-channel
        vectors are shared: nothing benchmarked writes them)."""
        return replace(self, x=self.x.copy(), dy=self.dy.copy())


def make_inputs(case: Case, dtype, seed: int = 0) -> Inputs:
    """Deterministic data for a case: per-channel means in [1, 4] and standard
    deviations in [0.5, 2] (a non-zero mean, as real activations have).

    The values are drawn in channels-first order, so a channels-last case
    (channel axis last, ndim > 2) holds exactly the same data as the
    channels-first case of the transposed shape.
    """
    shape, nd = case.shape, len(case.shape)
    ax = case.axis % nd
    C = shape[ax]
    channels_last = nd > 2 and ax == nd - 1
    gen_shape = (shape[0], C, *shape[1:-1]) if channels_last else shape
    gen_axis = 1 if channels_last else ax
    rng = np.random.default_rng(seed)
    pshape = [1] * nd
    pshape[gen_axis] = C
    mean_c = rng.uniform(1.0, 4.0, C).astype(np.float32)
    std_c = rng.uniform(0.5, 2.0, C).astype(np.float32)
    x = rng.standard_normal(gen_shape, dtype=np.float32)
    x *= std_c.reshape(pshape)
    x += mean_c.reshape(pshape)
    dy = rng.standard_normal(gen_shape, dtype=np.float32)
    if channels_last:
        x = np.moveaxis(x, 1, -1)
        dy = np.moveaxis(dy, 1, -1)
    dtype = np.dtype(dtype)
    x = np.ascontiguousarray(x, dtype=dtype)
    dy = np.ascontiguousarray(dy, dtype=dtype)
    gamma = rng.uniform(0.5, 2.0, C).astype(np.float32)
    beta = rng.standard_normal(C).astype(np.float32)
    running_mean = (mean_c + 0.1 * rng.standard_normal(C)).astype(np.float32)
    running_var = (std_c**2 * rng.uniform(0.8, 1.25, C)).astype(np.float32)
    return Inputs(x, dy, gamma, beta, running_mean, running_var, case.axis)


def min_bytes(op: str, x_nbytes: int) -> int:
    """Minimum bytes ``op`` must move for an input of ``x_nbytes`` bytes
    (see :data:`BYTES_MODEL`)."""
    return BYTES_FACTOR[op] * int(x_nbytes)


# --------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------

Runner = Callable[[], Sequence[Any]]


def _host(a) -> np.ndarray:
    return np.asarray(a)


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
    from .api import bn_backward, bn_forward

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
    from .backends import probes

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
    from .backends import available_backends
    from .backends.probes import CUDA_EXTRA

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


# --------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------

def reference_outputs(op: str, inp: Inputs) -> tuple[np.ndarray, ...]:
    """Float64 outputs of ``op`` from :mod:`bnkernels.reference`, in the
    order implementations return them."""
    kw = dict(axis=inp.axis, eps=inp.eps)
    if op == "train":
        return (reference_forward(inp.x, inp.gamma, inp.beta, **kw)[0],)
    if op == "infer":
        return (reference_forward(inp.x, inp.gamma, inp.beta, inp.running_mean, inp.running_var,
                                  training=False, **kw)[0],)
    if op == "backward":
        _, mean, invstd, _, _ = reference_forward(inp.x, inp.gamma, inp.beta, **kw)
        return reference_backward(inp.dy, inp.x, mean, invstd, inp.gamma, axis=inp.axis)
    raise ValueError(f"unknown op {op!r}")


def check_outputs(outputs: Sequence[Any], expected: Sequence[np.ndarray],
                  to_host: Callable[[Any], np.ndarray] = _host) -> float:
    """Worst relative error over all outputs: ``max |out - ref| / max |ref|``
    per output. ``inf`` for a wrong count or shape, or any NaN/inf."""
    if len(outputs) != len(expected):
        return math.inf
    worst = 0.0
    for out, ref in zip(outputs, expected):
        a = np.asarray(to_host(out))
        if a.shape != ref.shape:
            return math.inf
        err = np.abs(a.astype(np.float64) - ref)
        if err.size == 0:
            continue
        e = float(err.max())
        if not math.isfinite(e):
            return math.inf
        scale = float(np.abs(ref).max()) or 1.0
        worst = max(worst, e / scale)
    return worst


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    """How a measurement is repeated: ``warmup`` untimed calls, then at least
    ``repeat`` timed calls, more until ``min_time`` seconds have passed (at
    most ``max_repeat``)."""

    repeat: int = 5
    warmup: int = 1
    min_time: float = 0.0
    max_repeat: int = 200


def time_calls(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1, min_time: float = 0.0,
               max_repeat: int = 200) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then time each call with
    :func:`time.perf_counter`: at least ``repeat`` calls, and more until
    ``min_time`` seconds have passed (at most ``max_repeat``). Returns the
    durations (s)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - start < min_time and len(times) < max_repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


class EventTimer:
    """Times calls on the GPU with CUDA events: for each call, record a start
    event, call, record a stop event and wait for it; the time is the
    events' elapsed time. Warm-up calls first, then a device synchronize.

    Written against three callables so that it is testable without a GPU:
    ``new_event()`` (e.g. ``cupy.cuda.Event``), ``elapsed_ms(start, stop)``
    (``cupy.cuda.get_elapsed_time``) and ``synchronize()``.
    """

    def __init__(self, new_event: Callable[[], Any], elapsed_ms: Callable[[Any, Any], float],
                 synchronize: Callable[[], None]):
        self.new_event, self.elapsed_ms, self.synchronize = new_event, elapsed_ms, synchronize

    def time(self, fn: Callable[[], Any], timing: Timing) -> list[float]:
        for _ in range(timing.warmup):
            fn()
        self.synchronize()
        times: list[float] = []
        start_wall = time.perf_counter()
        while len(times) < timing.repeat or (time.perf_counter() - start_wall < timing.min_time
                                             and len(times) < timing.max_repeat):
            start, stop = self.new_event(), self.new_event()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(self.elapsed_ms(start, stop) / 1e3)
        return times


# --------------------------------------------------------------------------
# The machine: caches, memory, and the bandwidth ceiling
# --------------------------------------------------------------------------

def last_level_cache_bytes() -> int | None:
    """Size of the largest data/unified CPU cache (Linux sysfs), or None."""
    best = None
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(d, "type")) as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(os.path.join(d, "size")) as f:
                text = f.read().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            size = int(text.rstrip("KMG")) * mult
        except ValueError:
            continue
        best = size if best is None else max(best, size)
    return best


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
MAX_COPIES = 512


def rotation_count(footprint: int, cache_bytes: int | None, budget_bytes: int) -> tuple[int, int]:
    """Copies of the inputs to rotate through for cache-cold timing.

    Between two uses of one copy, the others must move more than twice the
    cache (the whole rotation: ``ceil(2 * cache / footprint) + 1`` copies of
    ``footprint`` bytes; cache 64 MiB when unknown). Bounded by the memory
    budget (each copy is charged 3x its footprint: outputs and prepared
    state) and :data:`MAX_COPIES`. Returns ``(copies, wanted)``; ``copies <
    wanted`` means the timing is only partly cold.
    """
    cache = cache_bytes or 64 * MiB
    footprint = max(int(footprint), 1)
    wanted = math.ceil(2 * cache / footprint) + 1
    allowed = max(min(budget_bytes // (3 * footprint), MAX_COPIES), 1)
    return max(min(wanted, allowed), 1), wanted


# --------------------------------------------------------------------------
# Running everything
# --------------------------------------------------------------------------

@dataclass
class Result:
    """One (op, case, dtype, implementation) measurement.

    ``status``: ``"ok"`` (checked and timed), ``"wrong"`` (failed the check,
    not timed), ``"unsupported"``, or ``"error"`` (raised; ``message`` says
    what). Times are seconds. ``copies``: how many copies of the inputs were
    rotated through (1: hot caches). ``op`` and ``role`` :data:`COPY`: the
    same-size copy reference of the case. ``pct_of_ceiling``,
    ``pct_of_copy`` (GB/s over the GB/s of that copy, ``copy_gbps``) and the
    speed-ups (own median over the baseline's, same op, case, dtype and
    device; > 1 is faster) are filled by :func:`add_derived`.
    """

    op: str
    shape_name: str
    shape: tuple[int, ...]
    axis: int
    layout: str
    dtype: str
    implementation: str
    role: str
    device: str
    device_name: str
    bytes: int
    status: str
    max_err: float | None = None
    tolerance: float | None = None
    message: str = ""
    timer: str = ""
    copies: int = 1
    times_s: list[float] = field(default_factory=list)
    median_s: float | None = None
    min_s: float | None = None
    max_s: float | None = None
    q1_s: float | None = None
    q3_s: float | None = None
    gbps: float | None = None
    ceiling_gbps: float | None = None
    pct_of_ceiling: float | None = None
    copy_gbps: float | None = None
    pct_of_copy: float | None = None
    speedup_vs_textbook: float | None = None
    speedup_vs_torch: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        if d["max_err"] is not None and not math.isfinite(d["max_err"]):
            d["max_err"] = None if math.isnan(d["max_err"]) else "inf"
        return d


ProgressFn = Callable[[int, int, str], None]


def _footprint(op: str, inp: Inputs) -> int:
    return inp.x.nbytes * (2 if op == "backward" else 1)


def run_one(impl: Implementation, op: str, case: Case, inp: Inputs, expected, device=None,
            timing: Timing | None = None, cold: bool = False) -> Result:
    """Prepare, check against ``expected`` (float64), and only if correct,
    time one implementation on ``device`` (default: a :class:`CpuDevice`).
    An implementation with ``checked`` False (the same-size copy, ``op``
    :data:`COPY`, ``expected`` unused) is called once untimed instead.

    ``cold``: rotate through copies of the inputs (:func:`rotation_count`),
    each prepared like the first, so that no timed call finds its inputs in
    the cache.
    """
    device = CpuDevice() if device is None else device
    timing = device.default_timing if timing is None else timing
    dtype = np.dtype(inp.x.dtype)
    tol = TOLERANCE[dtype]
    res = Result(op, case.label, case.shape, case.axis, case.layout, dtype.name, impl.name, impl.role,
                 impl.device, device.name, min_bytes(op, inp.x.nbytes), "ok",
                 tolerance=tol if impl.checked else None, timer=device.timer)
    try:
        fn = impl.prepare(op, inp)
        outputs = fn()
        if impl.checked:
            err = check_outputs(outputs, expected, impl.to_host)
            res.max_err = err
            if not err <= tol:
                res.status = "wrong"
                return res
        del outputs
        timed = fn
        if cold:
            copies, _ = rotation_count(_footprint(op, inp), device.cache_bytes, device.memory_budget_bytes())
            # The checked inputs go last: they were read by every copy made.
            fns = [impl.prepare(op, inp.copy()) for _ in range(copies - 1)] + [fn]
            res.copies = len(fns)
            cycle = itertools.cycle(fns)
            timed = lambda: next(cycle)()  # noqa: E731
        res.times_s = device.time(timed, timing)
    except Unsupported as exc:
        res.status, res.message = "unsupported", str(exc) or "not supported"
        return res
    except Exception as exc:  # report and go on with the others
        res.status, res.message = "error", f"{type(exc).__name__}: {exc}"
        return res
    ts = sorted(res.times_s)
    res.median_s = statistics.median(ts)
    res.min_s, res.max_s = ts[0], ts[-1]
    if len(ts) >= 2:
        res.q1_s, _, res.q3_s = statistics.quantiles(ts, n=4, method="inclusive")
    else:
        res.q1_s = res.q3_s = ts[0]
    res.gbps = res.bytes / res.median_s / 1e9
    return res


def run_benchmarks(implementations: Sequence[Implementation], cases: Iterable[Case] = DEFAULT_CASES,
                   ops: Sequence[str] = OPS, dtypes: Sequence = ("float32",),
                   devices: Mapping[str, Any] | None = None,
                   timing: Timing | Mapping[str, Timing] | None = None, cold: bool = False,
                   progress: ProgressFn | None = None, seed: int = 0, repeat: int | None = None,
                   warmup: int | None = None, same_size_copy: bool = True) -> list[Result]:
    """Check and time every implementation on every (dtype, case, op).

    ``devices``: kind -> device object (made with :func:`make_device` when
    missing). ``timing``: one :class:`Timing` for all devices, or one per
    kind (default: each device's ``default_timing``); ``repeat``/``warmup``
    override it. The float64 reference is computed once per (dtype, case,
    op) and shared. ``progress(i, total, label)`` is called before each
    measurement.

    ``same_size_copy``: first in each (dtype, case), on each device the
    implementations use, time the device's ``copy_implementation()`` (op
    :data:`COPY`) with the same timing and ``cold``: the reference of
    ``pct_of_copy``.
    """
    cases = list(cases)
    for op in ops:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; valid: {', '.join(OPS)}")
    devices = dict(devices or {})
    for impl in implementations:
        if impl.device not in devices:
            devices[impl.device] = make_device(impl.device)

    def timing_for(kind):
        t = timing.get(kind) if isinstance(timing, Mapping) else timing
        t = devices[kind].default_timing if t is None else t
        if repeat is not None:
            t = replace(t, repeat=repeat)
        if warmup is not None:
            t = replace(t, warmup=warmup)
        return t

    kinds = dict.fromkeys(impl.device for impl in implementations)
    copy_impls = [devices[k].copy_implementation() for k in kinds] if same_size_copy else []
    total = len(dtypes) * len(cases) * (len(copy_impls) + len(ops) * len(implementations))
    results = []

    def measure(impls, op, case, inp, expected):
        for impl in impls:
            if progress is not None:
                progress(len(results) + 1, total, f"{op} {case.label} {inp.x.dtype} {impl.name}")
            results.append(run_one(impl, op, case, inp, expected, devices[impl.device],
                                   timing_for(impl.device), cold))

    for dtype in dtypes:
        dt = np.dtype(dtype)
        for case in cases:
            inp = make_inputs(case, dt, seed)
            measure(copy_impls, COPY, case, inp, None)
            for op in ops:
                measure(implementations, op, case, inp, reference_outputs(op, inp))
            del inp
    return results


def add_derived(results: Sequence[Result], ceilings: Mapping[str, Ceiling] | Ceiling | None) -> None:
    """Fill ``ceiling_gbps``, ``pct_of_ceiling`` (from the ceiling of the
    result's own device), ``copy_gbps``, ``pct_of_copy`` (from the
    same-size copy result, role :data:`COPY`, of the same shape, axis,
    dtype and device; None without one; 100 on the copy itself) and the
    speed-ups over the textbook and torch results of the same op, case,
    dtype and device, in place."""
    if isinstance(ceilings, Ceiling):
        ceilings = {r.device: ceilings for r in results}
    ceilings = ceilings or {}
    base: dict[tuple, float] = {}
    copy_gbps: dict[tuple, float] = {}
    for r in results:
        if r.role in (TEXTBOOK, TORCH) and r.median_s:
            base[(r.role, r.op, r.shape, r.axis, r.dtype, r.device)] = r.median_s
        if r.role == COPY and r.gbps:
            copy_gbps[(r.shape, r.axis, r.dtype, r.device)] = r.gbps
    for r in results:
        if r.median_s is None:
            continue
        c = ceilings.get(r.device)
        if c is not None:
            r.ceiling_gbps = c.gbps
            r.pct_of_ceiling = 100.0 * r.gbps / c.gbps
        r.copy_gbps = copy_gbps.get((r.shape, r.axis, r.dtype, r.device))
        r.pct_of_copy = 100.0 * r.gbps / r.copy_gbps if r.copy_gbps else None
        key = (r.op, r.shape, r.axis, r.dtype, r.device)
        t = base.get((TEXTBOOK, *key))
        r.speedup_vs_textbook = t / r.median_s if t else None
        t = base.get((TORCH, *key))
        r.speedup_vs_torch = t / r.median_s if t else None


# --------------------------------------------------------------------------
# The plot
# --------------------------------------------------------------------------

def plot_results(results: Sequence[Result], path: str, title: str = ""):
    """Bar chart of % of the same-size copy (``pct_of_copy``: GB/s over the
    operation's minimum bytes against a copy of x timed in the same run and
    cache state, the achievable reference; a large-copy DRAM ceiling is
    exceeded several times by inputs that fit the cache): one panel per
    operation with a title saying what it shows, one group of bars per
    (shape, dtype), one bar per implementation; a dashed line at 100 %.
    Results that were not timed (wrong, error) are marked in place of their
    bar. The same-size copy rows (:data:`COPY`) are left out.
    Needs matplotlib (``pip install "bnkernels[plot]"``); uses the Agg
    canvas directly, so no GUI and no global pyplot state. Returns the
    matplotlib Figure (also saved to ``path``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    results = [r for r in results if r.role != COPY]
    ops = [op for op in OPS if any(r.op == op for r in results)]
    groups = list(dict.fromkeys((r.shape_name, r.dtype) for r in results))
    impls = list(dict.fromkeys(r.implementation for r in results))
    by_key = {(r.op, r.shape_name, r.dtype, r.implementation): r for r in results}
    n_bars = max(len(impls), 1)
    width = 0.8 / n_bars
    fig = Figure(figsize=(max(8.0, 0.22 * len(groups) * n_bars + 2.0), 2.9 * len(ops) + 1.2),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(ops), 1, squeeze=False)[:, 0]
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    for ax, op in zip(axes, ops):
        top = 100.0
        for j, name in enumerate(impls):
            xs, hs = [], []
            for g, (shape_name, dtype) in enumerate(groups):
                r = by_key.get((op, shape_name, dtype, name))
                x = g - 0.4 + width * (j + 0.5)
                if r is None:
                    continue
                if r.pct_of_copy is not None:
                    xs.append(x)
                    hs.append(r.pct_of_copy)
                    top = max(top, r.pct_of_copy)
                elif r.status in ("wrong", "error"):
                    ax.text(x, 2, r.status, rotation=90, ha="center", va="bottom", fontsize=7,
                            color="#d62728")
            ax.bar(xs, hs, width, label=name, color=colors[j % len(colors)])
        ax.axhline(100, color="black", linestyle="--", linewidth=0.8)
        ax.set_ylim(0, top * 1.12)
        ax.set_ylabel("% of same-size copy")
        panel = (f"{OP_TITLES[op]}: GB/s over the minimum bytes ({BYTES_FACTOR[op]} x nbytes of x) as % of "
                 "a copy of x timed in the same run (100 % = copy speed; higher is faster)")
        ax.set_title(textwrap.fill(panel, int(fig.get_figwidth() * 12)), fontsize=9, loc="left")
        ax.set_xticks(range(len(groups)), [f"{s}\n{d}" for s, d in groups], fontsize=7)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(ncols=min(n_bars, 6), fontsize=8, loc="upper right")
    if title:  # wrapped to the figure's width (about 11 characters per inch at 10 pt)
        width_chars = int(fig.get_figwidth() * 11)
        fig.suptitle("\n".join(textwrap.fill(line, width_chars) for line in title.split("\n")), fontsize=10)
    fig.savefig(path, dpi=110)
    return fig


# --------------------------------------------------------------------------
# Where it ran
# --------------------------------------------------------------------------

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

    from . import __version__

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
        "memory_available_bytes": available_memory_bytes(),
    }
