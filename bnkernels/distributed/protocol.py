"""What a synchronized call sends, and the exchange the engine runs with.

Every synchronized call (``bn_forward(..., comm=c)``, ``bn_backward(...,
comm=c)``) makes one round on the communicator, in the steady state one
collective:

- forward, an all-gather of a frame ``[header | count, mean (C), M2 (C)]``
  per rank, merged on every rank in rank order with Chan's formula
  (``engine.merge``: exact for any counts, zero included), so every rank
  gets the same statistics and updates its running ones alike;
- backward, an all-reduce (sum) of ``[header, header**2 | sum(dy) (C),
  sum(dy*xhat) (C), count]``.

The header says what each rank is doing (``FIELDS``): the operation, the
channel count, the dtype, the training flag, the number of the call on this
communicator, and whether the rank failed its own checks. Every rank checks
every header (an all-gather shows each rank's; an all-reduce shows sums and
sums of squares, equal exactly when all ranks agree), so ranks that disagree
all raise :class:`SyncError` instead of hanging or normalizing with garbage;
a rank whose arguments were refused still takes part, with a failure frame,
and the others raise naming it.

All frames of a round must have one length, even when ranks disagree on C.
So the payload is padded to a *capacity* that every rank knows without
asking: it starts at ``INITIAL_CAPACITY`` values and grows, the same way on
every rank, to the largest payload any rank has announced (a rank whose
payload does not fit sends its header only, flagged, and every rank repeats
the round at the new capacity: two collectives, once per growth). Frames are
float64 NumPy arrays on the host: the statistics stages return their
reductions there (a GPU backend's device-to-host copy synchronizes its
stream before any collective starts).
"""
from __future__ import annotations

import numpy as np

from .. import engine
from ..backends.interface import GradSums, Moments
from ..errors import SyncError

FIELDS = ("magic", "version", "op", "status", "channels", "dtype", "training", "call", "need", "overflow")
H = len(FIELDS)
_F = {name: i for i, name in enumerate(FIELDS)}
MAGIC, VERSION = 0x626E6B, 1  # "bnk": a frame of this protocol (anything else: ranks in different collectives)
FORWARD, BACKWARD = 1, 2
OPS = {FORWARD: "forward", BACKWARD: "backward"}
OK, FAILED = 0, 1
#: payload values of a frame before any growth: 2C + 1 for C = 64 channels
INITIAL_CAPACITY = 129
DTYPES = {"float16": 1, "bfloat16": 2, "float32": 3, "float64": 4}
_DTYPE_NAMES = {code: name for name, code in DTYPES.items()}
#: the failed rank's message travels in its frame, truncated to the capacity (UTF-8 bytes as values)
_TEXT = "utf-8"


class Call:
    """One synchronized call on a communicator (``adapters.Communicator``):
    the engine's exchange (``moments``, ``grad_sums``).

    ``describe`` says what this rank computes; ``moments``/``grad_sums``
    make the round; ``finish`` takes part with the header alone where the
    call needed no reduction (inference, a frozen backward); ``abandon``
    takes part with a failure frame when this rank's own checks raised.
    Each call makes exactly one round, whatever happens.
    """

    def __init__(self, comm, op: int):
        self.comm, self.op = comm, op
        self.channels, self.dtype, self.training = -1, 0, -1
        self.done = False

    def describe(self, channels: int, dtype, training: bool) -> None:
        """What this rank computes: C channels of ``dtype``, training or not."""
        name = getattr(dtype, "name", str(dtype))
        self.channels, self.dtype, self.training = int(channels), DTYPES.get(name, 99), int(training)

    # --- the engine's exchange ------------------------------------------------

    def moments(self, mine: Moments) -> Moments:
        """Every rank's moments, merged (the same on every rank)."""
        C = self.channels
        rows = self._round(np.concatenate(([mine.count], mine.mean, mine.m2)))
        merged = engine.merge([Moments(int(r[0]), r[1:C + 1], r[C + 1:2 * C + 1]) for r in rows])
        if merged.count == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got 1 value per channel "
                             f"over all {self.comm.size} ranks")
        return merged

    def grad_sums(self, mine: GradSums, count: int) -> tuple[GradSums, int]:
        """The sums of every rank, and the total count."""
        C = self.channels
        total = self._round(np.concatenate((mine.sum_dy, mine.sum_dy_xhat, [count])))
        return GradSums(total[:C], total[C:2 * C]), int(round(total[2 * C]))

    def finish(self) -> None:
        """Take part with the header only, if the call has made no round."""
        if not self.done:
            self._round(np.empty(0))

    def abandon(self, exc: BaseException) -> None:
        """This rank's checks raised ``exc``: take part with a failure frame
        (the other ranks raise naming this one); the caller re-raises."""
        if not self.done:
            text = f"{type(exc).__name__}: {exc}".encode(_TEXT, "replace")
            try:
                self._round(np.frombuffer(text, np.uint8).astype(np.float64) if self.op == FORWARD
                            else np.empty(0), status=FAILED)
            except SyncError:
                pass  # the round reports this rank's failure to itself too: the caller raises exc instead

    # --- a round ------------------------------------------------------------------

    def _header(self, status: int, need: int, capacity: int) -> np.ndarray:
        values = {"magic": MAGIC, "version": VERSION, "op": self.op, "status": status, "channels": self.channels,
                  "dtype": self.dtype, "training": self.training, "call": self.comm.calls, "need": need,
                  "overflow": int(need > capacity and status == OK)}
        return np.array([values[f] for f in FIELDS], np.float64)

    def _round(self, payload: np.ndarray, status: int = OK) -> np.ndarray:
        """The collective(s) of this call; returns the payloads, (ranks,
        len) gathered in a forward, summed (len,) in a backward."""
        self.done = True
        comm, gather = self.comm, self.op == FORWARD
        try:
            while True:
                capacity = comm.capacity[self.op]
                if status == FAILED:
                    payload = payload[:capacity]
                header = self._header(status, payload.size, capacity)
                fits = not header[_F["overflow"]]
                head = header if gather else np.concatenate((header, header**2))
                frame = np.zeros(head.size + capacity)
                frame[:head.size] = head
                if fits:
                    frame[head.size:head.size + payload.size] = payload
                if gather:
                    rows = comm.allgather(frame)
                    need = _check_gathered(rows[:, :H], rows[:, H:], self)
                    data = rows[:, H:H + payload.size]
                else:
                    total = comm.allreduce(frame)
                    need = _check_reduced(total[:H], total[H:2 * H], self)
                    data = total[2 * H:2 * H + payload.size]
                if need is None:
                    return data
                comm.capacity[self.op] = need  # every rank saw the same headers: the same growth everywhere
        finally:
            comm.calls += 1


def _describe(field: str, value) -> str:
    value = int(value)
    if field == "dtype":
        return _DTYPE_NAMES.get(value, "none (its checks failed first)")
    if field == "op":
        return OPS.get(value, str(value))
    if field == "training":
        return {0: "False", 1: "True"}.get(value, "unknown")
    return str(value)


_AGREED = ("op", "call", "channels", "dtype", "training")
_MEANING = {"op": "the operation", "call": "the number of synchronized calls made so far",
            "channels": "the number of channels", "dtype": "the dtype", "training": "the training flag"}


def _check_gathered(headers: np.ndarray, payloads: np.ndarray, call: Call):
    """Raise :class:`SyncError` unless every rank's header agrees; returns
    None, or the capacity to repeat the round at."""
    ranks = range(len(headers))
    bad = [r for r in ranks if headers[r, _F["magic"]] != MAGIC or headers[r, _F["version"]] != VERSION]
    if bad:
        raise SyncError(f"rank(s) {bad} sent something other than a bnkernels {VERSION} frame: the ranks are in "
                        f"different collectives")
    failed = [r for r in ranks if headers[r, _F["status"]] == FAILED]
    if failed:
        told = "; ".join(f"rank {r}: {_text(payloads[r, :int(headers[r, _F['need']])])}" for r in failed)
        raise SyncError(f"the synchronized {OPS.get(call.op, call.op)} was abandoned on every rank: "
                        f"rank(s) {failed} refused their arguments ({told})")
    for field in _AGREED:
        values = headers[:, _F[field]]
        if (values != values[0]).any():
            each = ", ".join(f"rank {r}: {_describe(field, v)}" for r, v in enumerate(values))
            raise SyncError(f"ranks disagree on {_MEANING[field]} ({each}); every rank must make the same "
                            f"synchronized calls in the same order")
    if headers[:, _F["overflow"]].any():
        return int(headers[:, _F["need"]].max())
    return None


def _check_reduced(sums: np.ndarray, squares: np.ndarray, call: Call):
    """:func:`_check_gathered` from the sums and sums of squares of the
    headers (all ranks agree on a value exactly when ``sum**2 == n *
    sum(value**2)``; the values are small integers, exact in float64)."""
    n = call.comm.size
    if sums[_F["magic"]] != n * MAGIC or sums[_F["version"]] != n * VERSION:
        raise SyncError("a rank sent something other than a bnkernels frame: the ranks are in different "
                        "collectives")
    failed = int(round(sums[_F["status"]]))
    if failed:  # (a message summed with the other ranks' payloads is lost: that rank raises it itself)
        raise SyncError(f"the synchronized {OPS.get(call.op, call.op)} was abandoned on every rank: {failed} "
                        f"rank(s) refused their arguments (each raises its own error)")
    for field in _AGREED:
        i = _F[field]
        if sums[i] ** 2 != n * squares[i]:
            mine = _describe(field, call._header(OK, 0, 0)[i])
            raise SyncError(f"ranks disagree on {_MEANING[field]} (this rank: {mine}; the mean over {n} ranks: "
                            f"{sums[i] / n:g}); every rank must make the same synchronized calls in the same order")
    if sums[_F["overflow"]]:
        return int(round(sums[_F["need"]] / n))  # every rank's need: they agree on the channels
    return None


def _text(values: np.ndarray) -> str:
    """A failure frame's message."""
    return np.clip(np.round(values), 0, 255).astype(np.uint8).tobytes().decode(_TEXT, "replace")
