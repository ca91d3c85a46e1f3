"""Repeated calls at a framework's level: ``bn_forward`` and
``bn_backward`` keep a prepared call (``prepared.py``) per description of
their arguments, so that a call described like an earlier one (the kind,
shape, strides and dtype of every array, and every option) skips
resolving the backend, validating and planning: it checks what can change
between such calls (the arrays' addresses for aliasing, the running
factor), allocates its outputs and launches (a GPU backend: the launches
recorded for its device, stream and thread) or runs the backend's fused
member (a CPU backend, whose validation is half a small call's cost).

Only calls whose every argument validation depends on nothing but that
description are kept: every argument an array or None, no ``out``, flags
given as bools, hashable options. Everything else takes the full path
every time, as does the first call of each description (whose checks make
the entry). The backend named by ``BNKERNELS_BACKEND`` is part of the key
of ``backend="auto"`` calls, so changing it takes effect at once.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

import numpy as np

from .backends import ENV_VAR, runs_on_gpu
from .validation import is_torch

#: Argument descriptions kept (least recently used dropped beyond this).
MAX_ENTRIES = 64

#: What :func:`lookup` answers for a call that has no description.
UNCACHED = object()

_entries: OrderedDict = OrderedDict()
_lock = threading.Lock()


#: Array types known not to be torch's (describe() asks once per type).
_PLAIN_KINDS: set = set()


def describe(a):
    """What a prepared call compares of an array (None for None): its type,
    shape, strides and dtype (and whether a NumPy array is writable, and
    whether a torch tensor is on the GPU and requires grad): everything
    validation reads of it."""
    if a is None:
        return None
    kind = type(a)
    if kind is np.ndarray:  # a read-only one is refused where bnkernels writes
        return kind, a.shape, a.strides, a.dtype, a.flags.writeable
    if kind in _PLAIN_KINDS:
        return kind, a.shape, getattr(a, "strides", None), a.dtype
    if is_torch(a):
        return kind, a.shape, a.stride(), a.dtype, a.is_cuda, a.requires_grad
    _PLAIN_KINDS.add(kind)
    return kind, a.shape, getattr(a, "strides", None), a.dtype


def _key(kind: str, backend, options: tuple, arrays: tuple):
    """The description of a call, or None when it has none (an argument
    that is not an array, an unhashable option)."""
    try:  # each option with its type: axis=True or 1.0 equals 1 and hashes alike, but validation refuses it
        return (kind, backend, os.environ.get(ENV_VAR) if backend == "auto" else None,
                tuple((type(o), o) for o in options), *map(describe, arrays))
    except AttributeError:  # not an array (a list: described by its values)
        return None


def forward_key(arrays: tuple, training, momentum, eps, axis, activation, backend, num_batches_tracked,
                return_saved, out):
    """The key of a ``bn_forward`` call (None: not cacheable)."""
    if out is not None or type(training) is not bool or type(return_saved) is not bool:
        return None
    return _key("forward", backend, (training, momentum, eps, axis, activation, num_batches_tracked is None),
                arrays)


def backward_key(arrays: tuple, axis, backend, out):
    """The key of a ``bn_backward`` call (None: not cacheable)."""
    if out is not None:
        return None
    return _key("backward", backend, (axis,), arrays)


def lookup(key):
    """The entry of ``key``: a prepared call, :data:`UNCACHED` (also for a
    key that cannot be one: None, or unhashable), or None when there is
    none yet. Takes no lock: each dict operation is atomic under the GIL,
    and an entry another thread drops meanwhile is simply not refreshed."""
    if key is None:
        return UNCACHED
    try:
        entry = _entries.get(key)
    except TypeError:  # an unhashable option
        return UNCACHED
    if entry is not None:
        try:
            _entries.move_to_end(key)
        except KeyError:
            pass
    return entry


def store(key, impl, make) -> None:
    """Keep ``make()`` (a prepared call) for ``key`` (None: nothing),
    which ran on the backend module ``impl``. A ``backend="cuda"`` call
    that fell back to a CPU backend is never replayed: its fallback warning
    belongs to every such call (Python's warning registry and filters
    decide what is shown)."""
    if key is None:
        return
    asked = key[2].strip() if key[1] == "auto" and key[2] else key[1]  # BNKERNELS_BACKEND overrides "auto"
    entry = UNCACHED if asked == "cuda" and not runs_on_gpu(impl) else make()
    with _lock:
        _entries[key] = entry
        while len(_entries) > MAX_ENTRIES:
            _entries.popitem(last=False)


def clear() -> None:
    """Drop every entry (tests; a program that wants its memory back)."""
    with _lock:
        _entries.clear()
