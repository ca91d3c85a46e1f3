"""Warp-level intrinsics for Numba's CUDA simulator (test-only patch).

Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) runs a ``@cuda.jit``
kernel as plain Python on the CPU, but it has no warp shuffles, votes or
``syncwarp`` (numba/numba#8433), so a kernel that calls
``cuda.shfl_down_sync`` dies there with ``AttributeError``. ``install()``
adds them to the simulator, so that the *unchanged* kernels run under it:

    cuda.shfl_sync(mask, value, src_lane)
    cuda.shfl_up_sync(mask, value, delta)
    cuda.shfl_down_sync(mask, value, delta)
    cuda.shfl_xor_sync(mask, value, lane_mask)
    cuda.syncwarp(mask=0xffffffff)
    cuda.activemask()
    cuda.lanemask_lt()
    cuda.all_sync / any_sync / eq_sync / ballot_sync(mask, predicate)
    cuda.match_any_sync(mask, value), cuda.match_all_sync(mask, value)

(``cuda.laneid`` and ``cuda.warpsize`` already exist in the simulator and
are kept.) Nothing here is used by the library; it is imported by
``tests/cudasim/conftest.py`` only.

How the simulator runs a kernel (numba-cuda 0.30, ``simulator/kernel.py``)
--------------------------------------------------------------------------
* Blocks run one after another: for each block a ``BlockManager`` starts one
  ``BlockThread`` (a real ``threading.Thread``) per CUDA thread, then busy-polls
  them until all have finished, and only then goes on to the next block.
  Only one kernel runs at a time (an assertion in ``_push_kernel_context``).
* Inside the kernel, the global name ``cuda`` is swapped for a
  ``FakeCUDAModule`` instance; ``cuda.threadIdx`` etc. are properties that
  read ``threading.current_thread()``, which is the ``BlockThread``. Each
  ``BlockThread`` knows its linear id ``thread_id = tx + bdx*(ty + bdy*tz)``
  and its ``_manager``.
* ``syncthreads()`` is not a ``threading.Barrier``: the thread raises a
  ``syncthreads_blocked`` flag and waits on its own Event; the manager sets
  all Events once every *live* thread has the flag up (threads that have
  exited do not count).
* An exception in a thread is caught in ``BlockThread.run`` (re-created as
  ``type(e)("tid=[..] ctaid=[..]: msg")``), and the manager, when it sees
  it, sets ``abort`` on every thread of the block, wakes those in
  ``syncthreads`` (they raise) and re-raises the first exception it happened
  to find in the launching thread, without joining the others.

Design of the patch
-------------------
* Hook: the new intrinsics are added as methods of the ``FakeCUDAModule``
  class (so every launch, and device functions called from a kernel, which
  share the launch's module object, see them), and ``BlockThread.run`` is
  wrapped to record when a thread finishes. Nothing else of the simulator is
  changed: ``syncthreads`` and shared memory work as before, and kernels can
  mix them freely with the warp operations.
* One simulator race is fixed: ``cuda.shared.array`` allocates a block's
  array on first use with a check-then-store that is not atomic, so two
  threads could get arrays of their own (a reduction then drops a
  partial). The lookup and allocation run under a lock
  (``_serialize_shared_allocation``).
* Warps are 32 consecutive linear thread ids of a block; lane = id % 32. The
  last warp of a block whose size is not a multiple of 32 is partial: its
  lanes ``>= n`` do not exist.
* State lives on the ``BlockManager`` (one per block per launch), so every
  block of every launch starts fresh; nothing leaks between launches.
* Per warp, per effective mask (``mask & lanes that exist``), a barrier: a
  generation counter under a ``threading.Condition`` plus two exchange
  buffers of 32 slots. A warp operation writes the caller's value into
  its slot of buffer ``generation % 2``, arrives, and when every lane of the
  mask has arrived the generation advances and all read what they need
  from that buffer. Double buffering replaces the "write, barrier, read,
  barrier" scheme with a single barrier per operation: a lane can next
  write to the same buffer only two operations later, which needs every
  lane to have arrived at the operation in between, i.e. to have finished
  reading. (Half the barriers: the simulator's cost is dominated by
  thread switches.)
* Values are returned as they were passed (the same Python or NumPy scalar
  object), so float32 stays float32 and ints stay ints.

Semantics (those of PTX ``shfl.sync``/``vote.sync``/``match.sync``; Numba
has no ``width`` argument, so the width is always 32)
-------------------------------------------------------------------------
* The lane offset / source lane is taken modulo 32 (PTX uses ``b[4:0]``).
* ``shfl_sync``: the value of lane ``src_lane % 32``.
  ``shfl_up_sync``: lane ``laneid - delta`` if that is ``>= 0``, else the
  caller's own value. ``shfl_down_sync``: lane ``laneid + delta`` if that is
  ``<= 31``, else own value. ``shfl_xor_sync``: lane ``laneid ^ lane_mask``.
  If the source lane does not exist (partial last warp) or is not in the
  mask, the caller's own value is returned (undefined on hardware).
* ``syncwarp(mask)``: a barrier of the lanes in mask.
* ``activemask()``: the lanes that exist in this warp (see Limits).
* Masks other than 0xffffffff work as long as every lane named in the mask
  (that exists) calls the operation with that same mask; lanes of one warp
  may use disjoint masks concurrently (each mask has its own barrier). The
  caller must be in its mask (undefined on hardware; here WarpSyncError).

Limits
------
* As on hardware, every non-exited lane named in the mask must reach the
  same warp operation, in the same order. The patch turns the ways this can
  go wrong into errors instead of hangs:
  - A lane that exits (e.g. an early ``return``) is dropped from later
    barriers, as PTX specifies for exited threads, so the others do not
    wait for it. But its value is undefined on hardware, so *reading* it
    (a shuffle whose source lane has exited) raises ``WarpSyncError``. The
    kernels of this project never return before their shuffles.
  - Lanes of one mask meeting in different operations (e.g. one in
    ``shfl_down_sync``, another in ``syncwarp``) raise ``WarpSyncError``.
  - Anything else that blocks a barrier (e.g. some lanes waiting in
    ``syncthreads`` while others wait in a warp operation: that deadlocks
    on hardware too) raises ``WarpSyncError`` after ``timeout`` seconds
    (``install(timeout_s=...)``, default 120 s) naming the missing lanes.
  - When another thread of the block fails, the simulator sets ``abort``
    on all threads; lanes waiting in a warp operation see it within 50 ms
    and leave, so no thread is left blocked forever.
* The simulator does not model divergence: ``activemask()`` returns every
  lane that exists, even lanes in another branch or already exited (on
  hardware those are inactive; the simulator's threads run unsynchronised,
  so "already exited" would depend on scheduling). Build masks from data
  (e.g. ``ballot_sync`` before the branch), not from ``activemask()``.
* As with the rest of the simulator, kernels must call these as
  ``cuda.<name>`` (``from numba.cuda import shfl_down_sync`` is not
  swapped).
* Slow: every warp operation is a barrier of Python threads; keep blocks
  small (tens of threads) in tests.
"""
import math
import sys
import threading
import time

__all__ = ["install", "is_installed", "WarpSyncError", "WARP_SIZE"]

WARP_SIZE = 32
FULL_MASK = 0xFFFFFFFF

#: Seconds a lane waits at a warp barrier before raising WarpSyncError.
timeout = 120.0
#: How often a waiting lane checks the simulator's abort flag.
_POLL_S = 0.05

_install_lock = threading.Lock()
_state_lock = threading.Lock()
_MARKER = "_bnkernels_warp_intrinsics"


class WarpSyncError(RuntimeError):
    """A warp operation whose result would be undefined on hardware, or
    that would hang (a lane that never comes).

    Takes a single message argument, as the simulator re-creates exceptions
    raised in a kernel thread with ``type(e)(msg)``.
    """


# --------------------------------------------------------------------------
# Per-warp state


class _Group:
    """The barrier of the lanes of one warp that use one effective mask."""

    __slots__ = ("mask", "generation", "present", "op", "buffers", "deposited")

    def __init__(self, mask):
        self.mask = mask
        self.generation = 0
        self.present = 0          # lanes arrived in the current generation
        self.op = None            # operation of the current generation
        self.buffers = ([None] * WARP_SIZE, [None] * WARP_SIZE)
        self.deposited = [0, 0]   # lanes that wrote each buffer, at release


class _Warp:
    def __init__(self, block_index, warp_index, size):
        self.block_index = block_index
        self.index = warp_index
        self.size = size
        self.existing = (1 << size) - 1
        self.exited = 0
        self.threads = [None] * size
        self.cond = threading.Condition(threading.Lock())
        self.groups = {}
        self.error = None   # first WarpSyncError of this warp, if any

    def _fail(self, message):
        """Poison the warp (lock held): every lane that waits in, or later
        reaches, a warp operation raises the first error's message, so the
        simulator reports the cause whichever thread it polls first."""
        if self.error is None:
            self.error = message
        self.cond.notify_all()
        return WarpSyncError(self.error)

    def describe(self):
        return (f"warp {self.index} (of {self.size} lanes) of block "
                f"{list(self.block_index)}")

    def lane_exited(self, lane):
        with self.cond:
            self.exited |= 1 << lane
            # Barriers that only waited for this lane complete now.
            for group in self.groups.values():
                if group.present and self._complete(group):
                    self._release(group)
            self.cond.notify_all()

    def _complete(self, group):
        return (group.present | (self.exited & group.mask)) == group.mask

    def _release(self, group):
        parity = group.generation & 1
        group.deposited[parity] = group.present
        group.present = 0
        group.op = None
        group.generation += 1

    def exchange(self, thread, lane, mask, value, op):
        """Barrier of the lanes in ``mask``; each deposits ``value``.

        Returns (effective mask, lanes that deposited, buffer), the buffer
        holding every depositing lane's value at its lane index.
        """
        eff = int(mask) & FULL_MASK & self.existing
        bit = 1 << lane
        if not eff & bit:
            raise WarpSyncError(
                f"{op}: lane {lane} of {self.describe()} called it with "
                f"mask {int(mask):#010x}, which does not include the lane "
                "(undefined behaviour on hardware)")
        with self.cond:
            if self.error is not None:
                raise WarpSyncError(self.error)
            group = self.groups.get(eff)
            if group is None:
                group = self.groups[eff] = _Group(eff)
            if group.op is None:
                group.op = op
            elif group.op != op:
                raise self._fail(
                    f"lanes of {self.describe()} with mask {eff:#010x} met in "
                    f"different warp operations: lane {lane} in {op}, lanes "
                    f"{_lanes(group.present)} in {group.op} (undefined "
                    "behaviour on hardware: all lanes of the mask must "
                    "execute the same intrinsic)")
            generation = group.generation
            parity = generation & 1
            buf = group.buffers[parity]
            buf[lane] = value
            group.present |= bit
            if self._complete(group):
                self._release(group)
                self.cond.notify_all()
                return eff, group.deposited[parity], buf
            deadline = time.monotonic() + timeout
            while group.generation == generation:
                if self.error is not None:
                    raise WarpSyncError(self.error)
                if getattr(thread, "abort", False):
                    raise RuntimeError(f"abort flag set while waiting in {op}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._fail(self._timeout_message(group, op))
                self.cond.wait(min(_POLL_S, remaining))
            return eff, group.deposited[parity], buf

    def _timeout_message(self, group, op):
        missing = group.mask & ~group.present & ~self.exited
        in_sync = [i for i in _lanes(missing)
                   if self.threads[i] is not None
                   and getattr(self.threads[i], "syncthreads_blocked", False)]
        msg = (f"{op}: lanes {_lanes(missing)} of {self.describe()} did not "
               f"reach it within {timeout} s (mask {group.mask:#010x}, "
               f"arrived {_lanes(group.present)})")
        if in_sync:
            msg += (f"; lanes {in_sync} are waiting in syncthreads: warp and "
                    "block barriers reached in different orders deadlock")
        return msg + ". Every non-exited lane in the mask must reach the same " \
                     "warp operation."


def _lanes(bits):
    return [i for i in range(WARP_SIZE) if bits >> i & 1]


def _warps_of(manager, block_index):
    warps = getattr(manager, "_bnk_warps", None)
    if warps is None:
        with _state_lock:
            warps = getattr(manager, "_bnk_warps", None)
            if warps is None:
                n = math.prod(int(d) for d in manager._block_dim)
                warps = [_Warp(block_index, w, min(WARP_SIZE, n - WARP_SIZE * w))
                         for w in range(-(-n // WARP_SIZE))]
                manager._bnk_warps = warps
    return warps


def _linear_id(thread):
    tid = getattr(thread, "thread_id", None)
    if tid is None:  # older simulators
        bx, by, _ = (int(d) for d in thread._manager._block_dim)
        t = thread.threadIdx
        tid = t.x + bx * (t.y + by * t.z)
    return int(tid)


def _register(thread):
    """(warp, lane) of a simulator thread, cached on the thread."""
    slot = getattr(thread, "_bnk_warp_lane", None)
    if slot is None:
        tid = _linear_id(thread)
        warps = _warps_of(thread._manager, thread.blockIdx)
        warp = warps[tid // WARP_SIZE]
        lane = tid % WARP_SIZE
        warp.threads[lane] = thread
        slot = thread._bnk_warp_lane = (warp, lane)
    return slot


def _current():
    thread = threading.current_thread()
    if not hasattr(thread, "_manager"):
        raise WarpSyncError(
            "warp intrinsics can only be called inside a simulated kernel")
    warp, lane = _register(thread)
    return thread, warp, lane


# --------------------------------------------------------------------------
# The intrinsics (methods of FakeCUDAModule; ``self`` is unused)

_IDX, _UP, _DOWN, _BFLY = "shfl_sync", "shfl_up_sync", "shfl_down_sync", "shfl_xor_sync"


def _shuffle(op, mask, value, b):
    thread, warp, lane = _current()
    eff, deposited, buf = warp.exchange(thread, lane, mask, value, op)
    bval = int(b) & 0x1F
    if op == _IDX:
        src = bval
    elif op == _UP:
        src = lane - bval
        if src < 0:
            src = lane
    elif op == _DOWN:
        src = lane + bval
        if src > WARP_SIZE - 1:
            src = lane
    else:
        src = lane ^ bval
    if src == lane:
        return value
    if not (eff >> src) & 1:
        # Lane outside the mask or beyond a partial warp: own value.
        return value
    if not (deposited >> src) & 1:
        msg = (f"{op}: lane {lane} of {warp.describe()} reads lane {src}, "
               "which has exited before this shuffle; its value is undefined "
               "on hardware. All lanes must reach the shuffle (no early "
               "return).")
        exc = getattr(warp.threads[src], "exception", None)
        if exc:
            msg += f" Lane {src} raised {type(exc[0]).__name__}: {exc[0]}"
        raise WarpSyncError(msg)
    return buf[src]


def shfl_sync(self, mask, value, src_lane):
    return _shuffle(_IDX, mask, value, src_lane)


def shfl_up_sync(self, mask, value, delta):
    return _shuffle(_UP, mask, value, delta)


def shfl_down_sync(self, mask, value, delta):
    return _shuffle(_DOWN, mask, value, delta)


def shfl_xor_sync(self, mask, value, lane_mask):
    return _shuffle(_BFLY, mask, value, lane_mask)


def syncwarp(self, mask=FULL_MASK):
    thread, warp, lane = _current()
    warp.exchange(thread, lane, mask, None, "syncwarp")


def activemask(self):
    # The lanes that exist: the simulator cannot tell which lanes would be
    # converged here, and subtracting the lanes that happen to have exited
    # already would make the result depend on thread scheduling.
    _, warp, _ = _current()
    return warp.existing


def lanemask_lt(self):
    _, _, lane = _current()
    return (1 << lane) - 1


def _ballot(op, mask, predicate):
    thread, warp, lane = _current()
    _, deposited, buf = warp.exchange(thread, lane, mask, bool(predicate), op)
    bits = 0
    for i in _lanes(deposited):
        if buf[i]:
            bits |= 1 << i
    return bits, deposited


def ballot_sync(self, mask, predicate):
    return _ballot("ballot_sync", mask, predicate)[0]


def all_sync(self, mask, predicate):
    bits, deposited = _ballot("all_sync", mask, predicate)
    return bits == deposited


def any_sync(self, mask, predicate):
    return _ballot("any_sync", mask, predicate)[0] != 0


def eq_sync(self, mask, predicate):
    bits, deposited = _ballot("eq_sync", mask, predicate)
    return bits == 0 or bits == deposited


def _match(op, mask, value):
    thread, warp, lane = _current()
    _, deposited, buf = warp.exchange(thread, lane, mask, value, op)
    same = 0
    for i in _lanes(deposited):
        if buf[i] == value:
            same |= 1 << i
    return same, deposited


def match_any_sync(self, mask, value):
    return _match("match_any_sync", mask, value)[0]


def match_all_sync(self, mask, value):
    same, deposited = _match("match_all_sync", mask, value)
    ok = same == deposited
    return (deposited if ok else 0), ok


def threadfence(self):
    """Memory fences are no-ops here: the simulator's threads share one
    address space with sequentially consistent (GIL-ordered) accesses."""


_INTRINSICS = {
    "threadfence": threadfence,
    "threadfence_block": threadfence,
    "threadfence_system": threadfence,
    "shfl_sync": shfl_sync,
    "shfl_up_sync": shfl_up_sync,
    "shfl_down_sync": shfl_down_sync,
    "shfl_xor_sync": shfl_xor_sync,
    "syncwarp": syncwarp,
    "activemask": activemask,
    "lanemask_lt": lanemask_lt,
    "ballot_sync": ballot_sync,
    "all_sync": all_sync,
    "any_sync": any_sync,
    "eq_sync": eq_sync,
    "match_any_sync": match_any_sync,
    "match_all_sync": match_all_sync,
}


# --------------------------------------------------------------------------
# Installation


_shared_lock = threading.Lock()


def _serialize_shared_allocation(shared_cls):
    """Make ``cuda.shared.array`` one array per call site for every thread
    of a block.

    The simulator keys a block's static shared arrays by the caller's file
    and line, and allocates on first use with a check-then-store
    (``get``; ``np.empty``; store) that is not atomic: two threads that
    check before either stores each get an array of their own, and the
    values one writes never reach the others: a reduction through shared
    memory then silently drops a partial (seen once in CI as a wrong
    statistic, one run in many; ``test_shared_array_is_one_array_per_block``
    provokes it). Here the lookup and the allocation are one step under a
    lock. Dynamic shared memory (shape 0) has no such race and is left to
    the original."""
    import numpy as np
    from numba.cuda import types as numba_types
    from numba.cuda.np import numpy_support

    original = shared_cls.array

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:
            return original(self, shape, dtype, alignment)
        frame = sys._getframe(1)  # the caller, as the original's stack[-2]
        caller = (frame.f_code.co_filename, frame.f_lineno)
        with _shared_lock:
            res = self._allocations.get(caller)
            if res is None:
                if isinstance(dtype, numba_types.Type):
                    dtype = numpy_support.as_dtype(dtype)
                res = self._allocations[caller] = np.empty(shape, dtype)
        return res

    array.__wrapped__ = original
    shared_cls.array = array


def _simulator_modules():
    try:
        from numba import cuda
    except ImportError as e:  # pragma: no cover - numba is a test dependency
        raise RuntimeError(f"cudasim_shuffles needs numba-cuda: {e}") from e
    if not getattr(cuda.jit, "__module__", "").startswith("numba.cuda.simulator"):
        raise RuntimeError(
            "cudasim_shuffles.install(): Numba's CUDA simulator is not enabled. "
            "Set NUMBA_ENABLE_CUDASIM=1 in the environment before numba is "
            "first imported (e.g. NUMBA_ENABLE_CUDASIM=1 pytest tests/cudasim).")
    from numba.cuda.simulator import kernel, kernelapi
    return kernel, kernelapi


def is_installed():
    try:
        _, kernelapi = _simulator_modules()
    except RuntimeError:
        return False
    return getattr(kernelapi.FakeCUDAModule, _MARKER, False)


def install(timeout_s=None):
    """Add the warp intrinsics to the CUDA simulator. Idempotent.

    ``timeout_s`` (optional) sets how long a lane waits at a warp barrier
    before raising WarpSyncError. Raises RuntimeError if the simulator is
    not enabled (NUMBA_ENABLE_CUDASIM=1 must be set before numba is
    imported).
    """
    global timeout
    kernel, kernelapi = _simulator_modules()
    if timeout_s is not None:
        timeout = float(timeout_s)
    with _install_lock:
        module_cls = kernelapi.FakeCUDAModule
        if getattr(module_cls, _MARKER, False):
            return
        for name, fn in _INTRINSICS.items():
            # Keep anything a newer simulator implements itself.
            if name not in vars(module_cls):
                setattr(module_cls, name, fn)
        # laneid and warpsize exist in the simulator; add them if not.
        if not hasattr(module_cls, "warpsize"):
            module_cls.warpsize = property(lambda self: WARP_SIZE)
        if not hasattr(module_cls, "laneid"):
            module_cls.laneid = property(
                lambda self: _linear_id(threading.current_thread()) % WARP_SIZE)

        thread_cls = kernel.BlockThread
        original_run = thread_cls.run

        def run(self):
            try:
                # Known up front, so that a timeout can tell which missing
                # lanes are stuck in syncthreads. Must not fail the thread.
                _register(self)
            except Exception:
                pass
            try:
                original_run(self)   # catches the kernel's exceptions itself
            finally:
                # Exited lanes no longer hold up warp barriers.
                try:
                    warp, lane = _register(self)
                except Exception:
                    return
                warp.lane_exited(lane)

        run.__wrapped__ = original_run
        thread_cls.run = run
        _serialize_shared_allocation(kernelapi.FakeCUDAShared)
        setattr(module_cls, _MARKER, True)
