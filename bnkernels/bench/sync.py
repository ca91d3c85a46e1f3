"""``bnkernels bench --sync``: synchronized batch norm measured across
processes (``mpiexec -n 2 python -m bnkernels bench --sync``).

For each case, dtype and backend, every rank takes its equal part of the
case's batch (the case is the whole batch, split along its batch axis) and
times, in the same run, a training step (``bn_forward`` with running
statistics, then ``bn_backward``) synchronized over the ranks (``comm=``,
:class:`TimedCommunicator` around the MPI adapter) and the same step on its
part alone (no ``comm``). The synchronized result is first checked against
the float64 :mod:`bnkernels.reference` of the whole batch, the local one
against the reference of the part (a wrong result is not timed).

Every rank makes the same collectives in the same order: the protocol's
(two per step in the steady state), and the harness' own few small
all-gathers (:func:`agree`) through the unwrapped communicator, which
stand where a rank could otherwise go on alone: after the set-up, after the
check, when the number of timed calls is chosen (:func:`agreed_times`;
``time_calls`` with a ``min_time`` would let ranks stop after different
counts) and with the figures at the end. Only NumPy and the standard
library are needed here; mpi4py is imported by :func:`world`.
"""
from __future__ import annotations

import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from ..distributed import Communicator, protocol
from ..distributed.adapters import MPI_INSTALL
from ..reference import reference_backward, reference_forward
from .ops import NAMED_CASES, QUICK_DIVISOR, TOLERANCE, Case, Inputs, bench_dtype, check_outputs, make_inputs, \
    min_bytes
from .run import json_error
from .timing import Timing, time_calls

#: The cases of a default ``--sync`` run (whole batches): the ``--quick``
#: versions of four named shapes, C from 32 to 1024, so that frames below
#: and above the protocol's initial capacity both show.
SYNC_CASES = tuple(NAMED_CASES[n].scaled(QUICK_DIVISOR) for n in ("resnet-56", "resnet-14", "dense", "tall-skinny"))

#: How to start the ranks (what to install where mpi4py is missing: ``MPI_INSTALL``).
MPIEXEC_LINE = "mpiexec -n 2 python -m bnkernels bench --sync"

_NEED = protocol.FIELDS.index("need")  # the header field that holds the payload's length
OPS = ("allgather", "allreduce")  # the forward's and the backward's collective
_HEAD = {"allgather": protocol.H, "allreduce": 2 * protocol.H}  # header values in front of the payload


def world() -> Communicator:
    """The MPI adapter over ``MPI.COMM_WORLD`` (world size 1 without
    mpiexec). Raises ``RuntimeError`` saying what to install and how to
    start the ranks when mpi4py or its MPI library cannot be loaded."""
    from ..distributed import MPI

    try:
        return MPI()
    except (ImportError, RuntimeError, OSError) as exc:
        text = str(exc) if "pip install" in str(exc) else f"{exc}; install: {MPI_INSTALL}"
        raise RuntimeError(f"--sync needs MPI: {text}; then run: {MPIEXEC_LINE}") from exc


@dataclass
class CollectiveStats:
    """What went through one kind of collective: ``calls``, ``seconds``
    inside it (waiting for the other ranks included), ``sent_bytes`` (the
    frames this rank sent), and the distinct frame lengths and payload
    lengths (header field ``need``) seen, in values."""

    calls: int = 0
    seconds: float = 0.0
    sent_bytes: int = 0
    frame_values: set = field(default_factory=set)
    payload_values: set = field(default_factory=set)


class TimedCommunicator(Communicator):
    """A :class:`Communicator` that passes each collective to ``inner`` and
    records it (:class:`CollectiveStats` per kind, in :attr:`stats`). The
    protocol state (``capacity``, ``calls``) is this object's own, as for
    any communicator passed as ``comm=``: make a fresh one to start from
    the initial capacity."""

    def __init__(self, inner: Communicator, clock: Callable[[], float] = time.perf_counter):
        super().__init__(inner.rank, inner.size)
        self.inner, self.clock = inner, clock
        self.reset()

    def reset(self) -> None:
        """Forget what was recorded (the protocol state stays)."""
        self.stats = {op: CollectiveStats() for op in OPS}

    def _record(self, op: str, run: Callable[[np.ndarray], np.ndarray], frame: np.ndarray) -> np.ndarray:
        s = self.stats[op]
        t0 = self.clock()
        result = run(frame)
        s.seconds += self.clock() - t0
        s.calls += 1
        s.sent_bytes += frame.nbytes
        s.frame_values.add(int(frame.size))
        s.payload_values.add(int(frame[_NEED]))
        return result

    def allgather(self, frame):
        return self._record("allgather", self.inner.allgather, frame)

    def allreduce(self, frame):
        return self._record("allreduce", self.inner.allreduce, frame)


class RankFailed(Exception):
    """Raised on every rank by :func:`agree` when any rank's part failed."""


def agree(comm: Communicator, problem: BaseException | None, values: Sequence[float] = ()) -> np.ndarray:
    """One all-gather of ``[failed, *values]`` from every rank (the same
    number of values everywhere). Returns the ``(size, len(values))`` rows;
    raises :class:`RankFailed` on every rank when any rank passed a
    ``problem`` (its message on that rank; the failed ranks' numbers on the
    others)."""
    row = np.concatenate(([float(problem is not None)], np.asarray(values, np.float64).ravel()))
    rows = comm.allgather(row)
    failed = [r for r in range(comm.size) if rows[r, 0]]
    if failed:
        if problem is not None:
            raise RankFailed(f"{type(problem).__name__}: {problem}")
        raise RankFailed(f"failed on rank(s) {failed}")
    return rows[:, 1:]


def split_case(case: Case, size: int) -> Case:
    """The part of ``case`` (a whole batch) that each of ``size`` ranks
    takes: the batch axis (the first that is not the channel axis) divided
    by ``size``. Raises ``ValueError`` unless it divides evenly and each
    part has at least 2 values per channel (the local step trains on one
    part alone)."""
    b = case._batch_axis()
    n = case.shape[b]
    if n % size:
        raise ValueError(f"{case.label}: a batch of {n} does not split evenly over {size} ranks")
    shape = tuple(d // size if i == b else d for i, d in enumerate(case.shape))
    if math.prod(shape) // shape[case.axis] < 2:
        raise ValueError(f"{case.label}: {'x'.join(map(str, shape))} per rank has fewer than 2 values per channel")
    return Case(shape, case.axis, case.name)


def rank_slice(case: Case, rank: int, size: int) -> tuple:
    """The index of rank ``rank``'s part of ``case``'s arrays."""
    b = case._batch_axis()
    k = case.shape[b] // size
    index = [slice(None)] * len(case.shape)
    index[b] = slice(rank * k, (rank + 1) * k)
    return tuple(index)


def part_inputs(whole: Inputs, index: tuple = ()) -> Inputs:
    """``whole`` cut to one rank's part (``index``, :func:`rank_slice`;
    ``()``: all of it): contiguous ``x`` and ``dy`` (``whole``'s own where
    already so) and copies of the running statistics, which a step
    updates."""
    return replace(whole, x=np.ascontiguousarray(whole.x[index]), dy=np.ascontiguousarray(whole.dy[index]),
                   running_mean=whole.running_mean.copy(), running_var=whole.running_var.copy())


def training_step(inp: Inputs, backend: str, comm: Communicator | None = None) -> Callable[[], tuple]:
    """A callable that runs one training step on ``inp``: ``bn_forward``
    (updating ``inp.running_mean``/``running_var`` in place) then
    ``bn_backward``, both with ``comm`` (None: local). It returns ``(y,
    mean, invstd, running_mean, running_var, dx, dgamma, dbeta)``."""
    from ..batch_norm import bn_backward, bn_forward

    def step():
        y, saved = bn_forward(inp.x, inp.gamma, inp.beta, inp.running_mean, inp.running_var, training=True,
                              eps=inp.eps, axis=inp.axis, backend=backend, return_saved=True, comm=comm)
        dx, dgamma, dbeta = bn_backward(inp.dy, inp.x, saved.mean, saved.invstd, inp.gamma, axis=inp.axis,
                                        backend=backend, comm=comm)
        return y, saved.mean, saved.invstd, inp.running_mean, inp.running_var, dx, dgamma, dbeta

    return step


def reference_step(inp: Inputs) -> tuple:
    """The float64 outputs of :func:`training_step` on ``inp`` from
    :mod:`bnkernels.reference` (the running statistics as updated once)."""
    y, mean, invstd, rm, rv = reference_forward(inp.x, inp.gamma, inp.beta, inp.running_mean, inp.running_var,
                                                axis=inp.axis, eps=inp.eps)
    dx, dgamma, dbeta = reference_backward(inp.dy, inp.x, mean, invstd, inp.gamma, axis=inp.axis)
    return y, mean, invstd, rm, rv, dx, dgamma, dbeta


def agreed_times(fn: Callable[[], object], timing: Timing, comm: Communicator,
                 before: Callable[[], None] | None = None) -> list[float]:
    """Durations (s) of calls of ``fn``, the same number on every rank:
    ``timing.warmup`` untimed calls and one untimed pilot, then ``n`` timed
    calls (:func:`time_calls`), where ``n`` is at least ``timing.repeat``
    and enough for ``timing.min_time`` at the slowest rank's pilot, at most
    ``timing.max_repeat``. ``before()`` is called just before the timed
    calls. Raises :class:`RankFailed` on every rank if the pilot failed on
    any."""
    pilot, problem = math.inf, None
    try:
        pilot = time_calls(fn, 1, timing.warmup)[0]
    except Exception as exc:
        problem = exc
    slowest = float(agree(comm, problem, [pilot]).max())
    n = max(timing.repeat, min(timing.max_repeat, math.ceil(timing.min_time / slowest) if slowest > 0 else 0))
    if before is not None:
        before()
    return time_calls(fn, n, 0, 0.0, n)


@dataclass
class SyncResult:
    """One (case, dtype, backend) row of ``bnkernels bench --sync``.

    ``shape`` is the whole batch, ``part_shape`` each rank's. ``status``:
    ``"ok"``, ``"wrong"`` (max relative error over the step's outputs above
    ``tolerance``; not timed) or ``"error"`` (``message``). Times in
    seconds: ``sync_s``/``local_s`` the slowest rank's median of the
    synchronized and the local step (``*_min_s``/``*_max_s``: the extremes
    over every rank's calls; ``rank_*_s``: each rank's median), ``ratio``
    their quotient; ``collective_s``: time per step inside the collectives,
    ``collective_share`` its share of the synchronized steps' time (both
    over all ranks together). Bytes are what one rank sends per step:
    ``forward_frame_bytes`` (all-gather) and ``backward_frame_bytes``
    (all-reduce), with their payloads in values (``2C + 1`` each) and the
    capacity they are padded to; ``collectives_per_step`` (2 in the steady
    state). GB/s per rank from the bytes model of a training forward plus a
    backward (``bytes``).
    """

    shape_name: str
    shape: tuple[int, ...]
    part_shape: tuple[int, ...]
    axis: int
    layout: str
    channels: int
    dtype: str
    backend: str
    ranks: int
    bytes: int
    status: str
    tolerance: float
    max_err: float | None = None
    local_max_err: float | None = None
    message: str = ""
    calls: int = 0
    sync_s: float | None = None
    local_s: float | None = None
    sync_min_s: float | None = None
    sync_max_s: float | None = None
    local_min_s: float | None = None
    local_max_s: float | None = None
    rank_sync_s: list[float] = field(default_factory=list)
    rank_local_s: list[float] = field(default_factory=list)
    ratio: float | None = None
    collective_s: float | None = None
    collective_share: float | None = None
    collectives_per_step: float | None = None
    forward_frame_bytes: int | None = None
    backward_frame_bytes: int | None = None
    forward_payload_values: int | None = None
    backward_payload_values: int | None = None
    forward_capacity: int | None = None
    backward_capacity: int | None = None
    sync_gbps: float | None = None
    local_gbps: float | None = None

    def to_dict(self) -> dict:
        """The row as JSON-ready values (non-finite errors as ``"inf"``/None)."""
        d = asdict(self)
        d["shape"], d["part_shape"] = list(self.shape), list(self.part_shape)
        for k in ("max_err", "local_max_err"):
            d[k] = json_error(d[k])
        return d


def _worst(got: Sequence, expected: Sequence) -> float:
    """:func:`check_outputs` of host outputs ``got`` against the float64 ``expected``."""
    return check_outputs([np.asarray(g, np.float64) for g in got], expected, np.asarray)


def _check(comm: Communicator, refs: tuple, part: Inputs, backend: str, sync: TimedCommunicator,
           res: SyncResult) -> None:
    """Run the synchronized and the local step once each and fill
    ``res.max_err`` (synchronized, against the reference of the whole batch:
    ``y`` and ``dx`` on this rank's part, the statistics and the updated
    running statistics, and ``dgamma``/``dbeta`` summed over the ranks) and
    ``res.local_max_err`` (against the reference of the part alone), each
    the worst over the ranks; ``res.status`` becomes ``"wrong"`` above the
    tolerance. ``refs``: :func:`reference_step` of the whole batch (``y``
    and ``dx`` cut to this rank's part) and of the part alone. One :func:`agree` carries it all; raises
    :class:`RankFailed` (every rank) when a rank raised."""
    C = res.channels
    problem, own = None, np.full(2 + 2 * C, np.nan)
    try:
        ref, ref_part = refs
        got = training_step(part_inputs(part), backend, sync)()
        local = training_step(part_inputs(part), backend)()
        own[0] = _worst(local, ref_part)
        own[1] = _worst(got[:6], ref[:6])
        own[2:2 + C], own[2 + C:] = np.asarray(got[6], np.float64), np.asarray(got[7], np.float64)
    except Exception as exc:
        problem = exc
    rows = agree(comm, problem, own)
    sums = rows[:, 2:].sum(axis=0)  # this rank's dgamma and dbeta are its contributions (torch's convention)
    res.local_max_err = float(rows[:, 0].max())
    res.max_err = max(float(rows[:, 1].max()), _worst((sums[:C], sums[C:]), refs[0][6:]))
    if not (res.max_err <= res.tolerance and res.local_max_err <= res.tolerance):
        res.status = "wrong"


def _figures(times: list[float]) -> list[float]:
    """``[median, min, max, sum, count]`` of durations ``times``."""
    return [statistics.median(times), min(times), max(times), sum(times), len(times)]


def _time_row(comm: Communicator, part: Inputs, backend: str, sync: TimedCommunicator, timing: Timing,
              res: SyncResult) -> None:
    """Time the synchronized step and then the local one
    (:func:`agreed_times`, the warm-up after the check's call), gather every
    rank's figures and fill ``res``'s times, shares and frames."""
    problem, own = None, np.full(14, np.nan)
    try:
        sync_times = agreed_times(training_step(part_inputs(part), backend, sync), timing, comm, sync.reset)
        g, r = sync.stats["allgather"], sync.stats["allreduce"]
        local_times = agreed_times(training_step(part_inputs(part), backend), timing, comm)
        own[:] = _figures(sync_times) + _figures(local_times) + [g.seconds + r.seconds, g.calls + r.calls,
                                                                 g.sent_bytes, r.sent_bytes]
    except RankFailed:
        raise
    except Exception as exc:
        problem = exc
    rows = agree(comm, problem, own)
    (s_med, s_min, s_max, s_sum, n), (l_med, l_min, l_max) = rows[:, :5].T, rows[:, 5:8].T
    coll_s, colls = rows[:, 10], rows[:, 11]
    steps = float(n.sum())
    res.calls = int(n[0])
    res.rank_sync_s, res.rank_local_s = [float(v) for v in s_med], [float(v) for v in l_med]
    res.sync_s, res.local_s = float(s_med.max()), float(l_med.max())
    res.sync_min_s, res.sync_max_s = float(s_min.min()), float(s_max.max())
    res.local_min_s, res.local_max_s = float(l_min.min()), float(l_max.max())
    res.ratio = res.sync_s / res.local_s
    res.collective_s = float(coll_s.sum()) / steps
    res.collective_share = float(coll_s.sum() / s_sum.sum())
    res.collectives_per_step = float(colls.sum()) / steps
    for op, prefix in (("allgather", "forward"), ("allreduce", "backward")):
        s = sync.stats[op]
        if len(s.frame_values) == 1 and len(s.payload_values) == 1 and s.calls == res.calls:
            values = next(iter(s.frame_values))
            setattr(res, f"{prefix}_frame_bytes", values * 8)
            setattr(res, f"{prefix}_payload_values", next(iter(s.payload_values)))
            setattr(res, f"{prefix}_capacity", values - _HEAD[op])
        elif not res.message:  # not the steady state of one frame of one size per step: say so
            res.message = (f"{op}: {s.calls} calls in {res.calls} steps, frames of {sorted(s.frame_values)} "
                           f"values")
    res.sync_gbps = res.bytes / res.sync_s / 1e9
    res.local_gbps = res.bytes / res.local_s / 1e9


ProgressFn = Callable[[int, int, str], None]


def run_sync_benchmarks(comm: Communicator, cases: Sequence[Case], dtypes: Sequence[str],
                        backends: Sequence[str], timing: Timing, progress: ProgressFn | None = None,
                        seed: int = 0) -> list[SyncResult]:
    """Check, then time, the synchronized and the local training step of
    every (dtype, case, backend) on every rank of ``comm`` (each case a
    whole batch, :func:`split_case`; the same data on every rank,
    :func:`make_inputs` with ``seed``, each rank taking its part). Every
    rank must call it with the same arguments; every rank returns the same
    rows (:class:`SyncResult`). A fresh :class:`TimedCommunicator` over
    ``comm`` per row (so that its frames start at the protocol's initial
    capacity). ``progress(i, total, label)`` before each row."""
    results: list[SyncResult] = []
    total = len(dtypes) * len(cases) * len(backends)
    for dtype in dtypes:
        dt = bench_dtype(dtype)
        for case in cases:
            part_case = split_case(case, comm.size)
            index = rank_slice(case, comm.rank, comm.size)
            part = refs = None  # made at the first backend (every rank the same data: the whole batch)
            for backend in backends:
                if progress is not None:
                    progress(len(results) + 1, total, f"sync {case.label} {dt.name} {backend}")
                res = SyncResult(case.label, case.shape, part_case.shape, case.axis, case.layout,
                                 case.shape[case.axis], dt.name, backend, comm.size, 0, "ok",
                                 TOLERANCE[dt.name])
                results.append(res)
                try:
                    problem = None
                    try:
                        if part is None:
                            whole = make_inputs(case, dt, seed)
                            part = part_inputs(whole, index)
                            ref = reference_step(whole)  # y and dx: this rank's part of them
                            refs = (ref[0][index], *ref[1:5], ref[5][index], *ref[6:]), reference_step(part)
                            del whole, ref
                    except Exception as exc:
                        problem = exc
                    agree(comm, problem)
                    res.bytes = min_bytes("train", part.x.nbytes) + min_bytes("backward", part.x.nbytes)
                    sync = TimedCommunicator(comm)
                    _check(comm, refs, part, backend, sync, res)
                    if res.status == "ok":
                        _time_row(comm, part, backend, sync, timing, res)
                except RankFailed as exc:
                    res.status, res.message = "error", str(exc)
            del part, refs
    return results


def mpi_description(comm: Communicator) -> dict:
    """The MPI library and each rank's host: ``{"library", "mpi4py",
    "hosts"}`` (a collective on an :class:`~bnkernels.distributed.MPI`
    adapter's communicator: every rank calls it; another communicator is
    described by its class, on this host)."""
    raw = getattr(comm, "comm", None)
    if raw is None or not hasattr(raw, "allgather"):
        return {"library": f"{type(comm).__name__} (not MPI)", "mpi4py": None, "hosts": [platform.node()] * comm.size}
    import mpi4py
    from mpi4py import MPI

    return {"library": MPI.Get_library_version().strip().splitlines()[0].strip(), "mpi4py": mpi4py.__version__,
            "hosts": raw.allgather(MPI.Get_processor_name())}


__all__ = [
    "CollectiveStats", "MPIEXEC_LINE", "MPI_INSTALL", "RankFailed", "SYNC_CASES", "SyncResult", "TimedCommunicator",
    "agree", "agreed_times", "mpi_description", "part_inputs", "rank_slice", "reference_step", "run_sync_benchmarks", "split_case",
    "training_step", "world",
]
