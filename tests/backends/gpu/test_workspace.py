"""``backends/gpu/workspace.py``: what the GPU backends keep between calls
is keyed by host thread as well as by device and stream (the per-thread
default stream has one handle in every thread), and is bounded."""
import threading

import numpy as np

from bnkernels.backends.gpu import workspace
from bnkernels.backends.gpu.workspace import CounterCache, ScratchCache

SPECS = {"k": ((3,), np.float32), "stage0": ((3, 4), np.float32)}


def _alloc(shape, dtype):
    return np.full(shape, np.nan, dtype)


def test_same_key_same_thread_reuses_the_workspace():
    cache = ScratchCache()
    a = cache.get(("dev0", 0), SPECS, _alloc)
    assert a is cache.get(("dev0", 0), SPECS, _alloc)
    assert a["stage0"].shape == (3, 4) and a["k"].dtype == np.float32
    assert cache.get(("dev0", 7), SPECS, _alloc) is not a  # another stream


def test_each_host_thread_gets_its_own_workspace_and_counters():
    scratch, counters = ScratchCache(), CounterCache()
    got = {}
    both = threading.Barrier(2)

    def work(name):
        got[name] = (scratch.get(("dev0", 0), SPECS, _alloc),
                     counters.zeroed(("dev0", 0), 10, lambda n: np.zeros(n, np.uint32)))
        both.wait()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[0][0] is not got[1][0]
    assert got[0][1] is not got[1][1]
    assert len(got[0][1]) >= 64 and not got[0][1].any()


def test_a_later_thread_does_not_inherit_an_ended_threads_workspace():
    """Thread idents are reused once a thread ends, while its last kernels
    may still be running: the workspace key is a number never reused."""
    scratch = ScratchCache()
    got = []
    for _ in range(2):
        t = threading.Thread(target=lambda: got.append(scratch.get("k", SPECS, _alloc)))
        t.start()
        t.join()
    assert got[0] is not got[1]


def test_counters_grow_when_more_are_needed():
    counters = CounterCache()
    small = counters.zeroed("k", 10, lambda n: np.zeros(n, np.uint32))
    assert counters.zeroed("k", 64, lambda n: np.zeros(n, np.uint32)) is small
    big = counters.zeroed("k", 1000, lambda n: np.zeros(n, np.uint32))
    assert big.size == 1000 and big is not small


def test_least_recently_used_workspaces_are_dropped(monkeypatch):
    monkeypatch.setattr(workspace, "MAX_WORKSPACES", 3)
    cache = ScratchCache()
    first = cache.get(0, SPECS, _alloc)
    for key in (1, 2):
        cache.get(key, SPECS, _alloc)
    assert cache.get(0, SPECS, _alloc) is first  # used again: now the most recent
    cache.get(3, SPECS, _alloc)  # evicts 1
    assert cache.get(0, SPECS, _alloc) is first
    assert len(cache._entries) == 3


def test_counters_are_bounded(monkeypatch):
    monkeypatch.setattr(workspace, "MAX_COUNTERS", 2)
    counters = CounterCache()
    first = counters.zeroed("a", 1, lambda n: np.zeros(n, np.uint32))
    counters.zeroed("b", 1, lambda n: np.zeros(n, np.uint32))
    assert counters.zeroed("a", 1, lambda n: np.zeros(n, np.uint32)) is first  # now the most recent
    counters.zeroed("c", 1, lambda n: np.zeros(n, np.uint32))  # drops "b"
    assert len(counters) == 2 and counters.zeroed("a", 1, lambda n: np.zeros(n, np.uint32)) is first
