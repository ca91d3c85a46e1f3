"""How the numba backend's entry points use threads: calls from several
Python threads at once (they take turns where Numba's threading layer is
not thread-safe), and small calls on the calling thread alone.

Every entry point of ``numba_backend`` and ``numba_norms`` is wrapped by
:func:`thread_safe`; their launch plans ask :func:`threads` how many
threads to plan for.
"""
from __future__ import annotations

import functools
import threading

import numba

#: Numba threading layers that run parallel kernels from several threads at
#: once; ``workqueue`` aborts the process instead ("Concurrent access").
THREAD_SAFE_LAYERS = ("tbb", "omp")
_turns = threading.Lock()
_layer_safe = False  # set once the layer Numba chose is known to be thread-safe


def _thread_safe_layer() -> bool:
    """Whether Numba's threading layer is thread-safe (unknown until the
    first parallel kernel has run, and then fixed for the process)."""
    global _layer_safe
    if not _layer_safe:
        try:
            _layer_safe = numba.threading_layer() in THREAD_SAFE_LAYERS
        except ValueError:  # no layer chosen yet: the first kernel chooses it
            return False
    return _layer_safe


#: An entry point whose first array (x, or dy) has fewer bytes than this
#: runs its kernels on the calling thread alone: waking Numba's pool costs
#: more than such a call's work (a (8, 4, 2, 2) forward: 17 µs on one
#: thread, 21 µs on two on an idle 2-core VM, and up to milliseconds on two
#: when other processes hold the cores). The plans stay those of Numba's
#: thread count (:func:`threads`), so the kernels, their chunks and their
#: results are the same, bit for bit.
SERIAL_BYTES = 64 << 10
_planned = threading.local()  # .threads: the count plans are made for while a small call runs on one thread


def threads() -> int:
    """The thread count the plans are made for (Numba's, also while a small
    call runs on one thread)."""
    return getattr(_planned, "threads", None) or numba.get_num_threads()


def _on_one_thread(entry, args, kwargs):
    threads = numba.get_num_threads()
    if threads == 1 or getattr(_planned, "threads", None):
        return entry(*args, **kwargs)
    _planned.threads = threads
    numba.set_num_threads(1)  # (thread-local in Numba: other Python threads keep theirs)
    try:
        return entry(*args, **kwargs)
    finally:
        numba.set_num_threads(threads)
        _planned.threads = None


def thread_safe(entry):
    """An entry point that takes turns with other threads unless the
    threading layer is thread-safe (a lock costs nothing then), and runs on
    one thread for a small first array (:data:`SERIAL_BYTES`)."""
    @functools.wraps(entry)
    def call(*args, **kwargs):
        run = _on_one_thread if getattr(args[0], "nbytes", SERIAL_BYTES) < SERIAL_BYTES else _run
        if _thread_safe_layer():
            return run(entry, args, kwargs)
        with _turns:
            return run(entry, args, kwargs)
    return call


def _run(entry, args, kwargs):
    return entry(*args, **kwargs)
