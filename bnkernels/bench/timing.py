"""How calls are timed: :class:`Timing` (repeats, warm-up, minimum time),
:func:`time_calls` (``time.perf_counter``), :class:`EventTimer` (CUDA
events) and the cache-cold rotation count (:func:`rotation_count`)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

from .ops import MiB


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


__all__ = [
    'EventTimer', 'MAX_COPIES', 'Timing', 'rotation_count', 'time_calls',
]
