"""Measurement code behind ``bnkernels bench``: what is timed, and how.

Everything here uses only NumPy and the standard library; PyTorch is used as
an extra comparison when it imports (:func:`torch_implementation`).

Pieces, each usable on its own:

- :class:`Case` and :func:`make_inputs`: what one measurement runs on.
- :class:`Implementation`: a named candidate. Its ``prepare(op, inputs)``
  does all set-up outside the timed region and returns a zero-argument
  callable that runs the operation once and returns its outputs.
  :func:`bnkernels_implementation`, :data:`TEXTBOOK_NUMPY` and
  :func:`torch_implementation` build the standard ones; pass any list of
  implementations to :func:`run_benchmarks` (tests add a deliberately wrong
  one).
- :func:`reference_outputs` and :func:`check_outputs`: correctness against the
  float64 oracle in :mod:`bnkernels.reference`, done before any timing.
- :func:`time_calls`: warm-up, then ``repeat`` timed calls with
  :func:`time.perf_counter`.
- :func:`min_bytes` (the bytes model) and :func:`measure_copy_ceiling` (the
  memory-bandwidth ceiling the GB/s figures are compared with).
"""
from __future__ import annotations

import glob
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .reference import reference_backward, reference_forward

#: Operations, in the order they are reported.
OPS = ("train", "infer", "backward")

#: Minimum traffic of each operation in units of ``x.nbytes`` (see
#: :func:`min_bytes`).
BYTES_FACTOR = {"train": 3, "infer": 2, "backward": 5}

BYTES_MODEL = (
    "minimum bytes an operation must move, in sizes of x: training forward 3 "
    "(read x for the statistics, read x again and write y), inference 2 (read x, "
    "write y), backward 5 (read x and dy for the sums, read x and dy again and "
    "write dx); per-channel vectors are ignored. GB/s = bytes / median time / 1e9"
)

#: Name of the baseline every implementation's speed-up is relative to.
BASELINE = "textbook-numpy"
#: Implementations that are comparison points, not bnkernels code.
COMPARISONS = (BASELINE, "torch")

#: Allowed error of each output: ``max |out - ref| / max |ref|`` (ref float64).
TOLERANCE = {
    np.dtype(np.float16): 2e-2,
    np.dtype(np.float32): 1e-3,
    np.dtype(np.float64): 1e-9,
}

EPS = 1e-5

MiB = 1 << 20


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
    """One (shape, channel axis) to measure; the layout label is derived."""

    shape: tuple[int, ...]
    axis: int = 1

    @property
    def layout(self) -> str:
        return layout_label(self.shape, self.axis)

    @property
    def shape_str(self) -> str:
        return "x".join(str(s) for s in self.shape)


#: ``bnkernels bench`` defaults: NCHW, the same data channels-last, and 2-D.
DEFAULT_CASES = (
    Case((32, 64, 56, 56), 1),
    Case((32, 56, 56, 64), -1),
    Case((8192, 1024), 1),
)
#: ``bnkernels bench --quick``.
QUICK_CASES = (
    Case((8, 32, 28, 28), 1),
    Case((8, 28, 28, 32), -1),
    Case((2048, 256), 1),
)


def parse_case(text: str) -> Case:
    """Parse ``"8x32x28x28"`` or ``"8x28x28x32@-1"`` (``SHAPE[@AXIS]``, axis
    default 1). Raises ``ValueError`` with a readable message."""
    text = text.strip()
    dims, _, axis_text = text.partition("@")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
        axis = int(axis_text) if axis_text else 1
    except ValueError:
        raise ValueError(f"bad shape {text!r}: expected e.g. 8x32x28x28 or 8x28x28x32@-1") from None
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"bad shape {text!r}: dimensions must be positive integers")
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"bad shape {text!r}: axis {axis} out of range for {len(shape)} dimensions")
    if math.prod(shape) // shape[axis] < 2:
        raise ValueError(f"bad shape {text!r}: training needs at least 2 values per channel")
    return Case(shape, axis)


@dataclass
class Inputs:
    """Arrays of one case: ``x``, ``dy`` in the benchmark dtype; ``gamma``,
    ``beta``, ``running_mean``, ``running_var`` float32 of shape (C,)."""

    x: np.ndarray
    dy: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    axis: int
    eps: float = EPS


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


@dataclass(frozen=True)
class Implementation:
    """A named implementation to check and time.

    ``prepare(op, inputs)`` does the set-up (conversions, a forward pass for
    backward, ...) and returns a zero-argument callable that runs ``op`` once
    and returns its outputs: ``(y,)`` for ``"train"`` and ``"infer"``,
    ``(dx, dgamma, dbeta)`` for ``"backward"``. It raises
    :class:`Unsupported` for what it cannot do. ``to_host`` turns one output
    into a NumPy array (a future GPU implementation also synchronizes in its
    callable).
    """

    name: str
    prepare: Callable[[str, Inputs], Runner]
    description: str = ""
    to_host: Callable[[Any], np.ndarray] = np.asarray


def _bshape(x, axis):
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return tuple(shape)


def _axes(x, axis):
    return tuple(i for i in range(x.ndim) if i != axis % x.ndim)


def textbook_forward_train(x, gamma, beta, axis=1, eps=EPS):
    """Training forward as tutorials write it: ``x.mean``, ``x.var`` and
    broadcasting. Returns ``(y, mean, var)`` (statistics with kept dims)."""
    axes = _axes(x, axis)
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * gamma.reshape(_bshape(x, axis)) + beta.reshape(_bshape(x, axis))
    return y, mean, var


def textbook_forward_infer(x, running_mean, running_var, gamma, beta, axis=1, eps=EPS):
    """Inference forward as tutorials write it, from running statistics."""
    bs = _bshape(x, axis)
    return ((x - running_mean.reshape(bs)) / np.sqrt(running_var.reshape(bs) + eps)
            * gamma.reshape(bs) + beta.reshape(bs))


def textbook_backward(dy, x, mean, var, gamma, axis=1, eps=EPS):
    """Backward as tutorials write it out, step by step through mean and var
    (the staged computational-graph derivation). ``mean``, ``var``: the
    forward's statistics with kept dims. Returns ``(dx, dgamma, dbeta)``."""
    axes = _axes(x, axis)
    n = x.size // x.shape[axis]
    xmu = x - mean
    std_inv = 1.0 / np.sqrt(var + eps)
    xhat = xmu * std_inv
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * xhat).sum(axis=axes)
    dxhat = dy * gamma.reshape(_bshape(x, axis))
    dvar = np.sum(dxhat * xmu, axis=axes, keepdims=True) * -0.5 * std_inv**3
    dmean = np.sum(-dxhat * std_inv, axis=axes, keepdims=True) + dvar * np.mean(-2.0 * xmu, axis=axes,
                                                                                  keepdims=True)
    dx = dxhat * std_inv + dvar * 2.0 * xmu / n + dmean / n
    return dx, dgamma, dbeta


def _prepare_textbook(op: str, inp: Inputs) -> Runner:
    x, dy, axis, eps = inp.x, inp.dy, inp.axis, inp.eps
    # Parameters in the activations' dtype, as a tutorial model would hold them.
    gamma, beta = inp.gamma.astype(x.dtype), inp.beta.astype(x.dtype)
    if op == "train":
        return lambda: (textbook_forward_train(x, gamma, beta, axis, eps)[0],)
    if op == "infer":
        rm, rv = inp.running_mean.astype(x.dtype), inp.running_var.astype(x.dtype)
        return lambda: (textbook_forward_infer(x, rm, rv, gamma, beta, axis, eps),)
    if op == "backward":
        _, mean, var = textbook_forward_train(x, gamma, beta, axis, eps)
        return lambda: textbook_backward(dy, x, mean, var, gamma, axis, eps)
    raise Unsupported(op)


#: The tutorial-style NumPy implementation all speed-ups are relative to.
TEXTBOOK_NUMPY = Implementation(BASELINE, _prepare_textbook,
                                "x.mean/x.var and broadcasting, as tutorials write it")


def bnkernels_implementation(backend: str) -> Implementation:
    """The public API (``bn_forward``/``bn_backward``) on a named backend."""
    from .api import bn_backward, bn_forward

    def prepare(op: str, inp: Inputs) -> Runner:
        x, dy, g, b, axis, eps = inp.x, inp.dy, inp.gamma, inp.beta, inp.axis, inp.eps
        if op == "train":
            return lambda: (bn_forward(x, g, b, axis=axis, eps=eps, backend=backend),)
        if op == "infer":
            rm, rv = inp.running_mean, inp.running_var
            return lambda: (bn_forward(x, g, b, rm, rv, training=False, axis=axis, eps=eps,
                                       backend=backend),)
        if op == "backward":
            _, saved = bn_forward(x, g, b, axis=axis, eps=eps, backend=backend, return_saved=True)
            return lambda: bn_backward(dy, x, saved.mean, saved.invstd, g, axis=axis, backend=backend)
        raise Unsupported(op)

    return Implementation(backend, prepare, f"bnkernels backend {backend!r}")


def import_torch():
    """``torch`` if it imports, else None (never raises)."""
    try:
        import torch
    except (ImportError, OSError):  # OSError: installed but a shared library is missing
        return None
    return torch


def torch_implementation(threads: int | None = None) -> Implementation | None:
    """``torch.nn.functional.batch_norm`` on the CPU (backward through
    autograd), or None when torch does not import.

    The channel axis is moved to position 1 as a view (an NHWC array becomes
    a channels_last tensor, which torch handles without a copy). ``threads``:
    if given, ``torch.set_num_threads(threads)`` (process-wide).
    """
    torch = import_torch()
    if torch is None:
        return None
    if threads is not None:
        torch.set_num_threads(threads)
    import torch.nn.functional as F

    def prepare(op: str, inp: Inputs) -> Runner:
        x, axis, eps = inp.x, inp.axis, inp.eps
        # torch takes half input with float32 parameters (mixed precision);
        # otherwise parameters must match the input dtype.
        pdt = np.float32 if x.dtype == np.float16 else x.dtype
        w = torch.from_numpy(inp.gamma.astype(pdt))
        b = torch.from_numpy(inp.beta.astype(pdt))
        xt = torch.from_numpy(x)
        if op == "train":
            xv = xt.movedim(axis, 1)
            return lambda: (F.batch_norm(xv, None, None, w, b, training=True, eps=eps).movedim(1, axis),)
        if op == "infer":
            xv = xt.movedim(axis, 1)
            rm = torch.from_numpy(inp.running_mean.astype(pdt))
            rv = torch.from_numpy(inp.running_var.astype(pdt))
            return lambda: (F.batch_norm(xv, rm, rv, w, b, training=False, eps=eps).movedim(1, axis),)
        if op == "backward":
            xt.requires_grad_(True)
            w.requires_grad_(True)
            b.requires_grad_(True)
            y = F.batch_norm(xt.movedim(axis, 1), None, None, w, b, training=True, eps=eps)
            dyt = torch.from_numpy(inp.dy).movedim(axis, 1)
            return lambda: torch.autograd.grad(y, (xt, w, b), dyt, retain_graph=True)
        raise Unsupported(op)

    return Implementation("torch", prepare, f"torch {torch.__version__} F.batch_norm (CPU)",
                          to_host=lambda t: t.detach().numpy())


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
                  to_host: Callable[[Any], np.ndarray] = np.asarray) -> float:
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
# Timing and the bandwidth ceiling
# --------------------------------------------------------------------------

def time_calls(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeat`` times, each timed
    with :func:`time.perf_counter`. Returns the ``repeat`` durations (s)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


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


def default_ceiling_bytes() -> int:
    """Copy-buffer size: 4x the last-level cache capped at 256 MiB, and at
    least 64 MiB (256 MiB when the cache size is unknown)."""
    llc = last_level_cache_bytes()
    size = 256 * MiB if llc is None else min(4 * llc, 256 * MiB)
    return max(size, 64 * MiB)


@dataclass
class Ceiling:
    """Memory-bandwidth ceiling: ``np.copyto(dst, src)`` on ``buffer_bytes``,
    counting ``2 * buffer_bytes`` (read + write) per copy."""

    buffer_bytes: int
    bytes: int
    times_s: list[float]
    median_s: float
    gbps: float


def measure_copy_ceiling(buffer_bytes: int | None = None, repeat: int = 5,
                         warmup: int = 1) -> Ceiling:
    """Time ``np.copyto`` on a large buffer (default
    :func:`default_ceiling_bytes`); GB/s from the median."""
    nbytes = default_ceiling_bytes() if buffer_bytes is None else int(buffer_bytes)
    n = max(nbytes // 8, 1)
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    times = time_calls(lambda: np.copyto(dst, src), repeat, max(warmup, 1))  # warm-up faults dst in
    med = statistics.median(times)
    moved = 2 * src.nbytes
    return Ceiling(src.nbytes, moved, times, med, moved / med / 1e9)


# --------------------------------------------------------------------------
# Running everything
# --------------------------------------------------------------------------

@dataclass
class Result:
    """One (op, case, dtype, implementation) measurement.

    ``status``: ``"ok"`` (checked and timed), ``"wrong"`` (failed the check,
    not timed), ``"unsupported"``, or ``"error"`` (raised; ``message`` says
    what). Times are seconds; ``pct_of_ceiling`` and
    ``speedup_vs_textbook`` are filled by :func:`add_derived`.
    """

    op: str
    shape: tuple[int, ...]
    axis: int
    layout: str
    dtype: str
    implementation: str
    bytes: int
    status: str
    max_err: float | None = None
    tolerance: float | None = None
    message: str = ""
    times_s: list[float] = field(default_factory=list)
    median_s: float | None = None
    min_s: float | None = None
    max_s: float | None = None
    gbps: float | None = None
    pct_of_ceiling: float | None = None
    speedup_vs_textbook: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        if d["max_err"] is not None and not math.isfinite(d["max_err"]):
            d["max_err"] = None if math.isnan(d["max_err"]) else "inf"
        return d


ProgressFn = Callable[[int, int, str], None]


def run_one(impl: Implementation, op: str, case: Case, inp: Inputs, expected, repeat: int = 5,
            warmup: int = 1) -> Result:
    """Prepare, check against ``expected`` (float64), and only if correct,
    time one implementation."""
    dtype = np.dtype(inp.x.dtype)
    tol = TOLERANCE[dtype]
    res = Result(op, case.shape, case.axis, case.layout, dtype.name, impl.name,
                 min_bytes(op, inp.x.nbytes), "ok", tolerance=tol)
    try:
        fn = impl.prepare(op, inp)
        err = check_outputs(fn(), expected, impl.to_host)
    except Unsupported as exc:
        res.status, res.message = "unsupported", str(exc) or "not supported"
        return res
    except Exception as exc:  # report and go on with the others
        res.status, res.message = "error", f"{type(exc).__name__}: {exc}"
        return res
    res.max_err = err
    if not err <= tol:
        res.status = "wrong"
        return res
    res.times_s = time_calls(fn, repeat, warmup)
    res.median_s = statistics.median(res.times_s)
    res.min_s, res.max_s = min(res.times_s), max(res.times_s)
    res.gbps = res.bytes / res.median_s / 1e9
    return res


def run_benchmarks(implementations: Sequence[Implementation], cases: Iterable[Case] = DEFAULT_CASES,
                   ops: Sequence[str] = OPS, dtypes: Sequence = ("float32",), repeat: int = 5,
                   warmup: int = 1, progress: ProgressFn | None = None, seed: int = 0) -> list[Result]:
    """Check and time every implementation on every (dtype, case, op).

    The float64 reference is computed once per (dtype, case, op) and shared.
    ``progress(i, total, label)`` is called before each measurement.
    """
    cases = list(cases)
    for op in ops:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; valid: {', '.join(OPS)}")
    total = len(dtypes) * len(cases) * len(ops) * len(implementations)
    results, i = [], 0
    for dtype in dtypes:
        dt = np.dtype(dtype)
        for case in cases:
            inp = make_inputs(case, dt, seed)
            for op in ops:
                expected = reference_outputs(op, inp)
                for impl in implementations:
                    i += 1
                    if progress is not None:
                        progress(i, total, f"{op} {case.layout} {case.shape_str} {dt.name} {impl.name}")
                    results.append(run_one(impl, op, case, inp, expected, repeat, warmup))
            del inp
    return results


def add_derived(results: Sequence[Result], ceiling: Ceiling | None, baseline: str = BASELINE) -> None:
    """Fill ``pct_of_ceiling`` and ``speedup_vs_textbook`` (baseline median /
    own median, same op, shape, axis and dtype) in place."""
    base = {(r.op, r.shape, r.axis, r.dtype): r.median_s
            for r in results if r.implementation == baseline and r.median_s}
    for r in results:
        if r.median_s is None:
            continue
        if ceiling is not None:
            r.pct_of_ceiling = 100.0 * r.gbps / ceiling.gbps
        b = base.get((r.op, r.shape, r.axis, r.dtype))
        if b:
            r.speedup_vs_textbook = b / r.median_s


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
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
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
        "cpus_usable": usable,
        "last_level_cache_bytes": last_level_cache_bytes(),
    }
