"""What the GPU backends keep between calls, per (device, stream, host
thread): the zeroed counters of the reductions' last-block merge, and the
workspace of each plan (coefficients and the reductions' staging buffers),
so that a call allocates only what it returns.

Reuse is safe because everything on one stream runs in order: a call's
kernels finish reading its workspace before the next call's kernels write
it. The host thread is part of the key because the per-thread default
stream has the same handle in every thread while being a different stream
in each. Only results that a call returns leave it; nothing that escapes a
call (``Normalization`` of the staged path) refers to a workspace.
"""
from __future__ import annotations

import itertools
import threading
from collections import OrderedDict

#: Workspaces and counter arrays kept per backend (least recently used
#: ones are dropped).
MAX_WORKSPACES = 64
MAX_COUNTERS = 256


_local = threading.local()
_numbers = itertools.count()


def thread_number() -> int:
    """A number of this host thread, never reused (``threading.get_ident``
    is reused once a thread ends, while its last kernels may still run)."""
    number = getattr(_local, "number", None)
    if number is None:
        number = _local.number = next(_numbers)
    return number


class CounterCache(OrderedDict):
    """``{key: counters}``; :meth:`zeroed` grows an entry when needed. At
    most :data:`MAX_COUNTERS` entries (least recently used dropped), so a
    program that keeps starting threads does not keep adding arrays."""

    def zeroed(self, key, n: int, make):
        """At least ``n`` zeroed counters for ``key`` (and this thread);
        ``make(size)`` allocates zeroed ones (at least 64, so small launches
        share one). The kernels leave them zero again after each launch."""
        key = (key, thread_number())
        cur = self.get(key)
        if cur is None or cur.size < n:
            cur = make(max(n, 64))
            self[key] = cur
            while len(self) > MAX_COUNTERS:
                self.popitem(last=False)
        else:
            self.move_to_end(key)
        return cur


class ScratchCache:
    """Workspaces ``{name: buffer}`` by (device/stream key, plan key, this
    thread), least recently used dropped beyond :data:`MAX_WORKSPACES`."""

    def __init__(self):
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, specs: dict, alloc) -> dict:
        """The workspace for ``specs`` ``{name: (shape, dtype)}``, made with
        ``alloc(shape, dtype)`` the first time."""
        key = (key, thread_number())
        with self._lock:
            work = self._entries.get(key)
            if work is not None:
                self._entries.move_to_end(key)
                return work
        work = {name: alloc(shape, dtype) for name, (shape, dtype) in specs.items()}
        with self._lock:
            self._entries[key] = work
            while len(self._entries) > MAX_WORKSPACES:
                self._entries.popitem(last=False)
        return work

    def clear(self):
        with self._lock:
            self._entries.clear()
