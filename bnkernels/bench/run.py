"""Running everything: :func:`run_one` (check, then time one
implementation on one op, case and dtype), :func:`run_benchmarks` (all of
them, each group after its same-size copy) and :func:`add_derived` (GB/s as
% of the ceiling and of the copy, speed-ups)."""
from __future__ import annotations

import functools
import itertools
import math
import statistics
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .ops import (
    ALL_OPS, COPY, Case, Inputs, OPS, TEXTBOOK, TOLERANCE, TORCH, Unsupported, bench_dtype, check_outputs,
    default_cases, make_inputs, min_bytes, ops_for, reference_outputs,
)
from .implementations import Implementation
from .timing import Timing, rotation_count
from .machine import Ceiling, CpuDevice, make_device


@dataclass
class Result:
    """One (op, case, dtype, implementation) measurement.

    ``status``: ``"ok"`` (checked and timed), ``"wrong"`` (failed the check,
    not timed), ``"unsupported"``, or ``"error"`` (raised; ``message`` says
    what). Times are seconds. ``copies``: how many copies of the inputs were
    rotated through (1: hot caches). ``op`` and ``role`` :data:`COPY`: the
    same-size copy reference of the case. ``pct_of_ceiling``,
    ``pct_of_copy`` (GB/s over the GB/s of that copy, ``copy_gbps``: the
    bytes model, which credits an op with every pass it needs),
    ``copy_time_ratio`` (median time over that copy's median time: 1 is the
    physical floor of an op that reads x once and writes y once) and the
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
    copy_time_ratio: float | None = None
    speedup_vs_textbook: float | None = None
    speedup_vs_torch: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["max_err"] = json_error(d["max_err"])
        return d


def json_error(err: float | None):
    """An error for JSON: the number, or ``"inf"`` for an infinite one and
    None for NaN (JSON has neither)."""
    if err is None or math.isfinite(err):
        return err
    return None if math.isnan(err) else "inf"


ProgressFn = Callable[[int, int, str], None]


def _footprint(op: str, inp: Inputs) -> int:
    return inp.x.nbytes * (2 if op.endswith("backward") else 1)


def run_one(impl: Implementation, op: str, case: Case, inp: Inputs, expected, device=None,
            timing: Timing | None = None, cold: bool = False) -> Result:
    """Prepare, check against ``expected`` (float64 outputs, or a callable
    that returns them, called only once the implementation has prepared:
    not for a case it refuses), and only if correct, time one
    implementation on ``device`` (default: a :class:`CpuDevice`).
    An implementation with ``checked`` False (the same-size copy, ``op``
    :data:`COPY`, ``expected`` unused) is called once untimed instead.

    ``cold``: rotate through copies of the inputs (:func:`rotation_count`),
    each prepared like the first, so that no timed call finds its inputs in
    the cache.
    """
    device = CpuDevice() if device is None else device
    timing = device.default_timing if timing is None else timing
    dtype = np.dtype(inp.x.dtype)
    tol = TOLERANCE[dtype.name]
    res = Result(op, case.label, case.shape, case.axis, case.layout, dtype.name, impl.name, impl.role,
                 impl.device, device.name, min_bytes(op, inp.x.nbytes), "ok",
                 tolerance=tol if impl.checked else None, timer=device.timer)
    try:
        fn = impl.prepare(op, inp)
        outputs = fn()
        if impl.checked:
            err = check_outputs(outputs, expected() if callable(expected) else expected, impl.to_host)
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


def run_benchmarks(implementations: Sequence[Implementation], cases: Iterable[Case] | None = None,
                   ops: Sequence[str] = OPS, dtypes: Sequence = ("float32",),
                   devices: Mapping[str, Any] | None = None,
                   timing: Timing | Mapping[str, Timing] | None = None, cold: bool = False,
                   progress: ProgressFn | None = None, seed: int = 0, repeat: int | None = None,
                   warmup: int | None = None, same_size_copy: bool = True) -> list[Result]:
    """Check and time every implementation on every (dtype, case, op), each
    case with the ``ops`` measured on it (:func:`ops_for`: a named shape
    with the ops it belongs to). ``cases`` None: :func:`default_cases`.

    ``devices``: kind -> device object (made with :func:`make_device` when
    missing). ``timing``: one :class:`Timing` for all devices, or one per
    kind (default: each device's ``default_timing``); ``repeat``/``warmup``
    override it. The float64 reference is computed once per (dtype, case,
    op), when first needed, and shared. ``progress(i, total, label)`` is called before each
    measurement.

    ``same_size_copy``: first in each (dtype, case), on each device the
    implementations use, time the device's ``copy_implementation()`` (op
    :data:`COPY`) with the same timing and ``cold``: the reference of
    ``pct_of_copy``.
    """
    for op in ops:
        if op not in ALL_OPS:
            raise ValueError(f"unknown op {op!r}; valid: {', '.join(ALL_OPS)}")
    plan = [(case, ops_for(case, ops)) for case in (default_cases(ops) if cases is None else cases)]
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
    total = len(dtypes) * sum(len(copy_impls) + len(case_ops) * len(implementations) for _, case_ops in plan)
    results = []

    def measure(impls, op, case, inp, expected):
        for impl in impls:
            if progress is not None:
                progress(len(results) + 1, total, f"{op} {case.label} {inp.x.dtype} {impl.name}")
            results.append(run_one(impl, op, case, inp, expected, devices[impl.device],
                                   timing_for(impl.device), cold))

    for dtype in dtypes:
        dt = bench_dtype(dtype)
        for case, case_ops in plan:
            inp = make_inputs(case, dt, seed)
            measure(copy_impls, COPY, case, inp, None)
            for op in case_ops:
                expected = functools.cache(functools.partial(reference_outputs, op, inp))  # when first needed
                measure(implementations, op, case, inp, expected)
            del inp
    return results


def add_derived(results: Sequence[Result], ceilings: Mapping[str, Ceiling] | Ceiling | None) -> None:
    """Fill ``ceiling_gbps``, ``pct_of_ceiling`` (from the ceiling of the
    result's own device), ``copy_gbps``, ``pct_of_copy`` and
    ``copy_time_ratio`` (from the same-size copy result, role :data:`COPY`,
    of the same shape, axis, dtype and device; None without one; 100 and 1
    on the copy itself) and the
    speed-ups over the textbook and torch results of the same op, case,
    dtype and device, in place."""
    if isinstance(ceilings, Ceiling):
        ceilings = {r.device: ceilings for r in results}
    ceilings = ceilings or {}
    base: dict[tuple, float] = {}
    copy_gbps: dict[tuple, float] = {}
    copy_s: dict[tuple, float] = {}
    for r in results:
        if r.role in (TEXTBOOK, TORCH) and r.median_s:
            base[(r.role, r.op, r.shape, r.axis, r.dtype, r.device)] = r.median_s
        if r.role == COPY and r.gbps:
            copy_gbps[(r.shape, r.axis, r.dtype, r.device)] = r.gbps
            copy_s[(r.shape, r.axis, r.dtype, r.device)] = r.median_s
    for r in results:
        if r.median_s is None:
            continue
        c = ceilings.get(r.device)
        if c is not None:
            r.ceiling_gbps = c.gbps
            r.pct_of_ceiling = 100.0 * r.gbps / c.gbps
        r.copy_gbps = copy_gbps.get((r.shape, r.axis, r.dtype, r.device))
        r.pct_of_copy = 100.0 * r.gbps / r.copy_gbps if r.copy_gbps else None
        t = copy_s.get((r.shape, r.axis, r.dtype, r.device))
        r.copy_time_ratio = r.median_s / t if t else None
        key = (r.op, r.shape, r.axis, r.dtype, r.device)
        t = base.get((TEXTBOOK, *key))
        r.speedup_vs_textbook = t / r.median_s if t else None
        t = base.get((TORCH, *key))
        r.speedup_vs_torch = t / r.median_s if t else None


__all__ = [
    'ProgressFn', 'Result', '_footprint', 'add_derived', 'json_error', 'run_benchmarks', 'run_one',
]
