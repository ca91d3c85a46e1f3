"""The ``numba`` backend: fused, parallel CPU kernels compiled by Numba.

Kernels work on the canonical view ``(outer, C, inner)`` of a contiguous
input (other inputs are copied to that layout first):

- channel planes (``inner > 1``, NCHW-like) with channels enough for two
  tasks per thread: one parallel task per block of channels reduces the
  block's slab and then normalizes it while the slab is still in cache, so
  training forward reads x from memory once and writes y once when a
  block's slab fits the cache (2 effective passes); backward does the same
  with x and dy. A block holds enough channels for contiguous runs of
  :data:`RUN_BYTES` per outer index (short planes such as 14x14 would
  otherwise defeat the hardware prefetchers) within :data:`BLOCK_BYTES`.
- fewer channels than that (e.g. C = 3 on 2 threads), and channel-fastest
  data (``inner == 1``: NHWC, 2-D): parallel chunks of the outer dimension
  (rows) compute per-channel partial sums, a tiny merge, then a parallel
  elementwise pass (2 reads + 1 write of x).

A residual ``z`` (``y = relu(bn(x) + z)``) is read in the pass that writes
y, added in the working type before the ReLU; y is rounded once.

Accuracy: sums are float64 around a shift ``k`` (the channel's first
value). For float32 and float64 data the differences and the elementwise
work are float64 and outputs are rounded once; float16 and bfloat16 data
are converted inside the kernels (``numba_half``: float16 by F16C
instructions where the CPU has them, else bit arithmetic; bfloat16 by bit
arithmetic, ``numba_bf16``; exact both ways) and worked in float32.
Fast-math is limited to reassociation and contraction, which keeps NaN and
Inf semantics. Threads: Numba's (``NUMBA_NUM_THREADS``,
``numba.set_num_threads``). Calls from several Python threads at once are
safe on every threading layer: on one that is not thread-safe
(``workqueue``) they take turns, and a small input runs on the calling
thread alone (``numba_threads``).

Compiled kernels are cached on disk where Numba finds a writable place
(``NUMBA_CACHE_DIR``, the package's ``__pycache__``, the per-user cache
directory); a read-only install with no writable home compiles them in
memory instead (:func:`cache_directory`).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload
from numba.np.numpy_support import as_dtype

from ..validation import bfloat16_dtype, compute_dtype, host_array, is_bfloat16
from .coefficients import dx_coefficients, update_running
from . import cpu_caches, cpu_common
from .cpu_common import ieee_semantics, per_channel
from .interface import ChannelLayout, GradSums, Moments, Normalization
from .numba_half import NATIVE_HALF, prefer_wide_vectors_for, store, to_work, work_value
from .numba_threads import thread_safe, threads as _threads
from .outputs import deliver

name = "numba"

#: The finalize stage, shared by both CPU backends (host float64 arithmetic).
finalize, finalize_running = cpu_common.finalize, cpu_common.finalize_running


def cache_directory() -> str | None:
    """Where Numba will cache the kernels of this module, or None when it
    finds no writable place (then they are compiled in memory: with
    ``cache=True`` Numba would raise "cannot cache function ... no locator
    available" on every first call). Numba's own locators decide, in its
    order: ``NUMBA_CACHE_DIR``, the package's ``__pycache__``, the
    per-user cache directory; this asks them for a function of this file,
    as they will be asked for each kernel."""
    from numba.core.caching import FunctionCache

    try:
        return FunctionCache(cache_directory)._cache_path
    except RuntimeError:
        return None


CACHE_DIR = cache_directory()
# error_model="numpy": a division by zero gives Inf/NaN as everywhere else
# in bnkernels (eps=0 on a constant channel), never a ZeroDivisionError.
_JIT = dict(parallel=True, fastmath={"reassoc", "contract"}, cache=CACHE_DIR is not None, nogil=True,
            error_model="numpy")
#: helpers called inside the parallel kernels (LLVM inlines them)
_SERIAL = dict(_JIT, parallel=False)
#: rows of a chunk of channel-fastest data handled by one task
ROWS_PER_CHUNK = 2048
#: channel planes: a task takes enough channels for contiguous runs of this
#: many bytes per outer index (hardware prefetchers need long runs) ...
RUN_BYTES = 8 << 10
#: ... while the block's slabs of its input arrays stay within this: half a
#: CPU's share of the last-level cache as the machine reports it
#: (``cpu_caches``), at most 4 MiB (the second read then misses L2 but not
#: L3; on a 2-core VM, 14x14 planes ran best with the largest blocks tried,
#: 4 MiB)
BLOCK_BYTES = min(4 << 20, cpu_caches.last_level().per_cpu // 2)


def asarray(x):
    """Host arrays (a torch bfloat16 tensor as NumPy's bfloat16: ``validation.host_array``)."""
    return host_array(x)


def describe() -> str:
    """How the kernels run here: threads, the 16-bit conversions, the cache."""
    half = "F16C instructions" if NATIVE_HALF else "bit arithmetic (no F16C)"
    cache = (f"kernels cached in {CACHE_DIR}" if CACHE_DIR else
             "kernels compiled in memory on first use (no writable cache directory; set NUMBA_CACHE_DIR)")
    return (f"{numba.get_num_threads()} threads (NUMBA_NUM_THREADS, numba.set_num_threads); "
            f"float16 converted by {half}, bfloat16 by bit arithmetic; {cache}; channel blocks of at most "
            f"{BLOCK_BYTES >> 10} KiB ({cpu_caches.describe()})")


# --- kernels: helpers ----------------------------------------------------------
# Elements load through to_work and meet per-channel values of the same
# working type (float32 for 16-bit data, float64 otherwise: see numba_half);
# differences such as x - k are then summed in float64.

def times_centered(d, v, kv, idx, c):
    """``d * (v[idx] - kv[c])`` in float64, or ``d * d`` when v is None (a
    stub: the statistics pass None so that x is loaded once)."""


@overload(times_centered, inline="always")
def _times_centered(d, v, kv, idx, c):
    if isinstance(v, types.NoneType):
        return lambda d, v, kv, idx, c: d * d
    return lambda d, v, kv, idx, c: d * np.float64(to_work(v[idx]) - kv[c])


def plus(v, z, idx):
    """``v + z[idx]`` in v's working type, or v when z is None (stub: the
    residual, specialized away when there is none)."""


@overload(plus, inline="always")
def _plus(v, z, idx):
    if isinstance(z, types.NoneType):
        return lambda v, z, idx: v
    return lambda v, z, idx: v + to_work(z[idx])


@njit(**_SERIAL)
def block_sums(u, ku, v, kv, o0, o1, c0, c1):
    """``sum(u - ku)`` and ``sum((u - ku) * (v - kv))`` over u[o0:o1, c, :]
    for each channel c0 <= c < c1 of (outer, C, inner) arrays, as two
    float64 arrays of length c1 - c0; ku, kv (C,) in the working type.
    With u = x and v = None: ``sum((x - ku)^2)``, the shifted moments; with
    u = dy, v = x: the backward sums. Memory order: one contiguous run of
    (c1 - c0) * inner elements per outer index. (Helpers like this one are
    inlined by LLVM into the parallel kernels.)"""
    prefer_wide_vectors_for(u)
    inner = u.shape[2]
    s = np.zeros(c1 - c0)
    t = np.zeros(c1 - c0)
    for o in range(o0, o1):
        for c in range(c0, c1):
            kc = ku[c]
            a = 0.0
            b = 0.0
            for i in range(inner):
                d = np.float64(to_work(u[o, c, i]) - kc)
                a += d
                b += times_centered(d, v, kv, (o, c, i), c)
            s[c - c0] += a
            t[c - c0] += b
    return s, t


@njit(**_SERIAL)
def apply_block(x, z, y, k, scale, shift, relu, o0, o1, c0, c1):
    """y = (x - k) * scale + shift [+ z] [ReLU] on x[o0:o1, c0:c1, :]; z:
    None or a residual like x; k, scale, shift (C,) in the working type. An
    element of z is read before y's is written: y may be z itself."""
    inner = x.shape[2]
    zero = work_value(x, 0.0)
    for o in range(o0, o1):
        for c in range(c0, c1):
            kc, sc, sh = k[c], scale[c], shift[c]
            for i in range(inner):
                v = plus((to_work(x[o, c, i]) - kc) * sc + sh, z, (o, c, i))
                if relu and v < 0:
                    v = zero
                store(y, (o, c, i), v)


@njit(**_SERIAL)
def dx_block(dy, x, dx, mean, a, b, cc, o0, o1, c0, c1):
    """dx = dy * a + (x - mean) * b + cc on x[o0:o1, c0:c1, :]; the
    per-channel values (C,) in the working type."""
    inner = x.shape[2]
    for o in range(o0, o1):
        for c in range(c0, c1):
            mc, ac, bc, ccc = mean[c], a[c], b[c], cc[c]
            for i in range(inner):
                v = to_work(dy[o, c, i]) * ac + (to_work(x[o, c, i]) - mc) * bc + ccc
                store(dx, (o, c, i), v)


@njit(**_SERIAL)
def finish_stats(s1, s2, n, eps, k, gamma, beta, mean, m2, invstd, scale, shift):
    """Per channel, from s1 = sum(x - k) and s2 = sum((x - k)^2) over n
    values: ``mean``, ``m2`` and ``invstd`` (float64), and the apply
    coefficients ``scale = gamma * invstd`` and ``shift = beta - (mean - k)
    * scale``. Outputs are written in place; all arrays have one length
    (a block's slices inside a kernel, all channels on the host)."""
    for j in range(s1.size):
        dm = s1[j] / n
        m2[j] = max(s2[j] - s1[j] * dm, 0.0)
        invstd[j] = 1.0 / np.sqrt(m2[j] / n + eps)
        scale[j] = gamma[j] * invstd[j]
        shift[j] = beta[j] - dm * scale[j]
        mean[j] = np.float64(k[j]) + dm


@njit(**_SERIAL)
def backward_coeffs(s, t, n, invstd, gamma, dgamma, dbeta, a, b, cc):
    """Per channel, from s = sum(dy) and t = sum(dy * (x - mean)) over n
    values: ``dgamma = t * invstd``, ``dbeta = s`` and the dx coefficients
    of ``dx = dy * a + (x - mean) * b + cc``. Outputs are written in place;
    all arrays have one length."""
    for j in range(s.size):
        dgamma[j] = t[j] * invstd[j]
        dbeta[j] = s[j]
        a[j] = gamma[j] * invstd[j]
        b[j] = -a[j] * invstd[j] * dgamma[j] / n
        cc[j] = -a[j] * s[j] / n


# channel planes (outer, C, inner): fused per block of channels, or passes over outer

@njit(**_JIT)
def plane_sums(u, ku, v, kv, s, t):
    """Partial ``block_sums`` of (outer, C, inner) arrays over all channels,
    per chunk of the outer dimension, into s and t (chunks, C): one pass in
    memory order whatever C (the statistics-only pass, and layouts with too
    few channels to give every thread its own)."""
    outer, C, _ = u.shape
    chunks = s.shape[0]
    for j in prange(chunks):
        s[j], t[j] = block_sums(u, ku, v, kv, j * outer // chunks, (j + 1) * outer // chunks, 0, C)


@njit(**_JIT)
def train_planes(x, z, y, k, gamma, beta, eps, relu, block, mean_out, m2_out, invstd_out, scale_w, shift_w):
    """Training forward of (outer, C, inner) data, one task per block of
    ``block`` channels: the block's sums, then y (plus the residual z, None
    or like x) while the block's slab is still in cache. k: each channel's
    first value (the shift), working type; scale_w, shift_w (C,): scratch
    in the working type."""
    outer, C, inner = x.shape
    n = outer * inner
    for j in prange((C + block - 1) // block):
        c0 = j * block
        c1 = min(c0 + block, C)
        s1, s2 = block_sums(x, k, None, None, 0, outer, c0, c1)
        finish_stats(s1, s2, n, eps, k[c0:c1], gamma[c0:c1], beta[c0:c1], mean_out[c0:c1], m2_out[c0:c1],
                     invstd_out[c0:c1], scale_w[c0:c1], shift_w[c0:c1])
        apply_block(x, z, y, k, scale_w, shift_w, relu, 0, outer, c0, c1)


@njit(**_JIT)
def apply(x, z, y, k, scale, shift, relu, chunks):
    """y = (x - k) * scale + shift [+ z] [ReLU] on (outer, C, inner) data,
    in ``chunks`` parallel tasks over the outer dimension; k, scale, shift
    (C,) in the working type."""
    outer, C, _ = x.shape
    for t in prange(chunks):
        apply_block(x, z, y, k, scale, shift, relu, t * outer // chunks, (t + 1) * outer // chunks, 0, C)


@njit(**_JIT)
def bwd_planes(dy, x, dx, mean, zero, invstd, gamma, block, dgamma, dbeta, a_w, b_w, c_w):
    """Backward of (outer, C, inner) data, one task per block of ``block``
    channels: the sums, then dx while the block's slabs are in cache.
    mean, zero (C,) in the working type (zero: zeros); a_w, b_w, c_w (C,):
    scratch in the working type."""
    outer, C, inner = x.shape
    n = outer * inner
    for j in prange((C + block - 1) // block):
        c0 = j * block
        c1 = min(c0 + block, C)
        s, t = block_sums(dy, zero, x, mean, 0, outer, c0, c1)
        backward_coeffs(s, t, n, invstd[c0:c1], gamma[c0:c1], dgamma[c0:c1], dbeta[c0:c1], a_w[c0:c1],
                        b_w[c0:c1], c_w[c0:c1])
        dx_block(dy, x, dx, mean, a_w, b_w, c_w, 0, outer, c0, c1)


@njit(**_JIT)
def dx_planes(dy, x, dx, mean, a, b, cc, chunks):
    """``dx_block`` over all of (outer, C, inner) data in ``chunks``
    parallel tasks over the outer dimension."""
    outer, C, _ = x.shape
    for t in prange(chunks):
        dx_block(dy, x, dx, mean, a, b, cc, t * outer // chunks, (t + 1) * outer // chunks, 0, C)


# channel fastest (rows, C): NHWC and 2-D data

@njit(**_JIT)
def row_sums(u, ku, v, kv, s, t):
    """Partial ``sum(u - ku)`` and ``sum((u - ku) * (v - kv))`` per chunk of
    rows of channel-fastest (rows, C) arrays, into s and t (chunks, C); ku,
    kv (C,) in the working type; v = None for ``sum((u - ku)^2)`` (see
    ``block_sums``). Four rows at a time, so the partials are loaded and
    stored once per four elements."""
    rows, C = u.shape
    chunks = s.shape[0]
    for j in prange(chunks):
        prefer_wide_vectors_for(u)
        lo = j * rows // chunks
        hi = (j + 1) * rows // chunks
        r = lo
        while r + 4 <= hi:
            for c in range(C):
                d0 = np.float64(to_work(u[r, c]) - ku[c])
                d1 = np.float64(to_work(u[r + 1, c]) - ku[c])
                d2 = np.float64(to_work(u[r + 2, c]) - ku[c])
                d3 = np.float64(to_work(u[r + 3, c]) - ku[c])
                s[j, c] += (d0 + d1) + (d2 + d3)
                t[j, c] += ((times_centered(d0, v, kv, (r, c), c) + times_centered(d1, v, kv, (r + 1, c), c))
                            + (times_centered(d2, v, kv, (r + 2, c), c)
                               + times_centered(d3, v, kv, (r + 3, c), c)))
            r += 4
        for q in range(r, hi):
            for c in range(C):
                d = np.float64(to_work(u[q, c]) - ku[c])
                s[j, c] += d
                t[j, c] += times_centered(d, v, kv, (q, c), c)


@njit(**_JIT)
def apply_rows(x, z, y, k, scale, shift, relu, chunks):
    """``apply`` for channel-fastest (rows, C) data: the innermost loop runs
    over the channels (contiguous), so it vectorizes."""
    rows, C = x.shape
    zero = work_value(x, 0.0)
    for t in prange(chunks):
        lo = t * rows // chunks
        hi = (t + 1) * rows // chunks
        for r in range(lo, hi):
            for c in range(C):
                v = plus((to_work(x[r, c]) - k[c]) * scale[c] + shift[c], z, (r, c))
                if relu and v < 0:
                    v = zero
                store(y, (r, c), v)


@njit(**_JIT)
def dx_rows(dy, x, dx, mean, a, b, cc, chunks):
    """dx = dy * a + (x - mean) * b + c on channel-fastest (rows, C) data;
    per-channel values in the working type."""
    rows, C = x.shape
    for t in prange(chunks):
        lo = t * rows // chunks
        hi = (t + 1) * rows // chunks
        for r in range(lo, hi):
            for c in range(C):
                v = to_work(dy[r, c]) * a[c] + (to_work(x[r, c]) - mean[c]) * b[c] + cc[c]
                store(dx, (r, c), v)


def kept(d, keep):
    """``d`` where ``keep``, else +0 of d's type (stub). 16-bit data (their
    bits) by a product: a select of 16-bit values did not vectorize (6x
    slower); floats by a select (a product would turn Inf and NaN into NaN)."""


@overload(kept, inline="always")
def _kept(d, keep):
    if isinstance(d, types.Integer):
        return lambda d, keep: d * keep
    zero = as_dtype(d).type(0)
    return lambda d, keep: d if keep else zero


@njit(**_JIT)
def relu_grad(dy, y, g):
    """g = dy, and +0 where y <= 0 (a NaN y passes dy, as torch), on flat
    arrays of one dtype; 16-bit data as bits: dy's bits are copied as they
    are, y is loaded to be compared. A prange from 0 (an index range that
    might be negative kept the loop from vectorizing: about 6x slower)."""
    for i in prange(dy.size):
        g[i] = kept(dy[i], not to_work(y[i]) <= 0)


# --- host side ---------------------------------------------------------------

def _bits(a):
    """An array as the kernels take it: float16 as its uint16 bits,
    bfloat16 as its int16 bits (so that Numba compiles each apart), other
    dtypes as they are."""
    if a.dtype == np.float16:
        return a.view(np.uint16)
    return a.view(np.int16) if is_bfloat16(a.dtype) else a


def _view3(a, layout: ChannelLayout):
    """C-contiguous (outer, C, inner) view (a copy only when a is not
    C-contiguous), 16-bit floats as their bits (:func:`_bits`); None stays
    None (no residual)."""
    if a is None:
        return None
    return _bits(np.ascontiguousarray(a).reshape(layout.outer, layout.channels, layout.inner))


def _out3(layout: ChannelLayout, dtype, out=None):
    """The result array (``out`` itself when it is C-contiguous, else a new
    one) and its (outer, C, inner) view for the kernels' stores (16-bit
    floats as their bits)."""
    y = out if out is not None and out.flags.c_contiguous else np.empty(layout.shape, dtype)
    return y, _bits(y.reshape(layout.outer, layout.channels, layout.inner))


def _work(x3, *vectors):
    """Per-channel float64 vectors in the kernels' working type for x3's
    elements: float32 for 16-bit data (their bits), else float64."""
    dt = np.float32 if x3.itemsize == 2 else np.float64
    return tuple(np.asarray(v, dt) for v in vectors)


def _chunks(rows):
    """Parallel tasks for row-chunked reductions (each gets a row of partials)."""
    return max(1, min(rows // ROWS_PER_CHUNK, 8 * _threads())) if rows else 1


def _tasks(outer):
    """Parallel tasks for the elementwise passes over the outer dimension."""
    return max(1, min(outer, 4 * _threads()))


def _block(layout: ChannelLayout, itemsize: int, arrays: int = 1):
    """Channels per task of the channel-plane kernels: enough for runs of
    :data:`RUN_BYTES`, at most :data:`BLOCK_BYTES` of slabs over ``arrays``
    input arrays, and leaving at least two tasks per thread."""
    row = max(layout.inner * itemsize, 1)
    block = min(-(-RUN_BYTES // row), BLOCK_BYTES // (arrays * row * max(layout.outer, 1)))
    return max(1, min(block, layout.channels // (2 * _threads())))


def _shift(x3):
    """Each channel's first value, the shift k of the sums: float64 and in
    the working type."""
    first = x3[0, :, 0]
    if first.itemsize == 2:  # the bits back to their values
        first = first.view(np.float16 if first.dtype == np.uint16 else bfloat16_dtype())
    k = first.astype(np.float64)
    return k, _work(x3, k)[0]


def _fused(layout: ChannelLayout) -> bool:
    """Whether the one-task-per-channel-block kernels (statistics and the
    elementwise pass while the block is in cache) fit the layout: channel
    planes, and channels enough for two tasks per thread. Otherwise a
    parallel pass over the outer dimension sums, and another applies."""
    return layout.inner > 1 and layout.channels >= 2 * _threads()


def _sums(u3, ku, v3, kv, layout: ChannelLayout):
    """Per-channel float64 ``sum(u - ku)`` and ``sum((u - ku) * (v - kv))``
    (v3 None: the squares) by chunks of the outer dimension (rows for
    channel-fastest data), then merged here."""
    C = layout.channels
    if layout.inner == 1:
        chunks = _chunks(layout.outer)
        s, t = np.zeros((chunks, C)), np.zeros((chunks, C))
        row_sums(u3.reshape(-1, C), ku, None if v3 is None else v3.reshape(-1, C), kv, s, t)
    else:
        chunks = _tasks(layout.outer)
        s, t = np.zeros((chunks, C)), np.zeros((chunks, C))
        plane_sums(u3, ku, v3, kv, s, t)
    return s.sum(0), t.sum(0)


def _stats(x3, layout: ChannelLayout, gamma, beta, eps: float):
    """The statistics pass without a fused kernel: float64 ``k`` and the
    ``finish_stats`` outputs (mean, m2, invstd, scale, shift), from
    :func:`_sums`."""
    k, kw = _shift(x3)
    s1, s2 = _sums(x3, kw, None, None, layout)
    out = tuple(np.empty(layout.channels) for _ in range(5))
    finish_stats(s1, s2, layout.count, eps, k, gamma, beta, *out)
    return (k, *out)


def _apply(x3, z3, y3, layout: ChannelLayout, k, scale, shift, relu):
    """The apply pass with the kernel suited to the layout; z3: None or the
    residual's (outer, C, inner) view."""
    k, scale, shift = _work(x3, k, scale, shift)
    if layout.inner == 1:
        C = layout.channels
        apply_rows(x3.reshape(-1, C), None if z3 is None else z3.reshape(-1, C), y3.reshape(-1, C), k, scale,
                   shift, relu, _tasks(layout.outer))
    else:
        apply(x3, z3, y3, k, scale, shift, relu, _tasks(layout.outer))


@thread_safe
@ieee_semantics
def statistics(x, layout: ChannelLayout) -> Moments:
    """See ``numpy_backend.statistics``."""
    if layout.count == 0 or layout.channels == 0:
        return Moments(layout.count, np.zeros(layout.channels), np.zeros(layout.channels))
    C = layout.channels  # gamma, beta and eps do not matter: only mean and m2 are used
    _, mean, m2, _, _, _ = _stats(_view3(x, layout), layout, np.ones(C), np.zeros(C), 1.0)
    return Moments(layout.count, mean, m2)


@thread_safe
@ieee_semantics
def forward_train(x, layout: ChannelLayout, gamma, beta, eps: float, relu: bool, running, out=None,
                  residual=None):
    """See ``numpy_backend.forward_train``; y is written into a C-contiguous
    ``out`` directly (it may be the residual: read in the same pass)."""
    C, n = layout.channels, layout.count
    cdt = compute_dtype(x.dtype)
    x3, z3 = _view3(x, layout), _view3(residual, layout)
    y, y_store = _out3(layout, x.dtype, out)
    g, b = per_channel(gamma, C, 1.0), per_channel(beta, C, 0.0)
    if C == 0 or n == 0:  # nothing to normalize: zero statistics (as the numpy backend's)
        return deliver(y, out), np.zeros(C, cdt), np.zeros(C, cdt)
    if _fused(layout):
        mean, m2, invstd = np.empty(C), np.empty(C), np.empty(C)
        _, kw = _shift(x3)
        scale_w, shift_w = np.empty_like(kw), np.empty_like(kw)
        train_planes(x3, z3, y_store, kw, g, b, eps, relu, _block(layout, x3.itemsize), mean, m2, invstd,
                     scale_w, shift_w)
    else:
        k, mean, m2, invstd, scale, shift = _stats(x3, layout, g, b, eps)
        _apply(x3, z3, y_store, layout, k, scale, shift, relu)
    if running is not None:
        update_running(running[0], running[1], mean, m2 / (n - 1), running[2])
    return deliver(y, out), mean.astype(cdt), invstd.astype(cdt)


@thread_safe
@ieee_semantics
def normalize(x, layout: ChannelLayout, norm: Normalization, relu: bool, out=None, residual=None):
    """See ``numpy_backend.normalize``; y is written into a C-contiguous
    ``out`` directly (it may be the residual: read in the same pass)."""
    y, y_store = _out3(layout, x.dtype, out)
    if layout.channels and layout.count:
        _apply(_view3(x, layout), _view3(residual, layout), y_store, layout, norm.k, norm.scale, norm.shift, relu)
    return deliver(y, out)


def _dx(dy3, x3, out_store, layout: ChannelLayout, coeffs):
    """dx = dy * a + (x - mean) * b + c with the kernel suited to the layout;
    ``coeffs``: (mean, a, b, c) in the working type."""
    C = layout.channels
    if layout.inner == 1:
        dx_rows(dy3.reshape(-1, C), x3.reshape(-1, C), out_store.reshape(-1, C), *coeffs, _tasks(layout.outer))
    else:
        dx_planes(dy3, x3, out_store, *coeffs, _tasks(layout.outer))


@thread_safe
@ieee_semantics
def backward_reduce(dy, x, layout: ChannelLayout, mean, invstd) -> GradSums:
    """See ``numpy_backend.backward_reduce``."""
    C = layout.channels
    if C == 0 or layout.count == 0:
        return GradSums(np.zeros(C), np.zeros(C))
    x3 = _view3(x, layout)
    mw, zero = _work(x3, np.asarray(mean, np.float64), np.zeros(C))
    s, t = _sums(_view3(dy, layout), zero, x3, mw, layout)
    return GradSums(s, t * np.asarray(invstd, np.float64))


@thread_safe
@ieee_semantics
def backward_apply(dy, x, layout: ChannelLayout, mean, invstd, gamma, sums: GradSums, count: int, out=None,
                   frozen: bool = False, grads: GradSums | None = None):
    """See ``numpy_backend.backward_apply``; dx is written into a
    C-contiguous ``out`` directly."""
    C, cdt = layout.channels, compute_dtype(x.dtype)
    dx, out_store = _out3(layout, x.dtype, out)
    if C and layout.count:
        x3 = _view3(x, layout)
        a, b, c = dx_coefficients(sums.sum_dy, sums.sum_dy_xhat, count, invstd, gamma, frozen)
        _dx(_view3(dy, layout), x3, out_store, layout, _work(x3, np.asarray(mean, np.float64), a, b, c))
    grads = sums if grads is None else grads
    return deliver(dx, out), grads.sum_dy_xhat.astype(cdt), grads.sum_dy.astype(cdt)


@thread_safe
@ieee_semantics
def backward(dy, x, layout: ChannelLayout, mean, invstd, gamma, out=None):
    """See ``numpy_backend.backward``; dx is written into a C-contiguous
    ``out`` directly."""
    C, n = layout.channels, layout.count
    cdt = compute_dtype(x.dtype)
    dx, out_store = _out3(layout, x.dtype, out)
    if C == 0 or n == 0:
        return deliver(dx, out), np.zeros(C, cdt), np.zeros(C, cdt)
    x3, dy3 = _view3(x, layout), _view3(dy, layout)
    m, inv, g = np.asarray(mean, np.float64), np.asarray(invstd, np.float64), per_channel(gamma, C, 1.0)
    mw, zero = _work(x3, m, np.zeros(C))
    if _fused(layout):
        dgamma, dbeta = np.empty(C), np.empty(C)
        a_w, b_w, c_w = (np.empty_like(mw) for _ in range(3))
        bwd_planes(dy3, x3, out_store, mw, zero, inv, g, _block(layout, x3.itemsize, 2), dgamma, dbeta,
                   a_w, b_w, c_w)
    else:
        s, t = _sums(dy3, zero, x3, mw, layout)
        dgamma, dbeta, a, b, cc = (np.empty(C) for _ in range(5))
        backward_coeffs(s, t, n, inv, g, dgamma, dbeta, a, b, cc)
        _dx(dy3, x3, out_store, layout, (mw, *_work(x3, a, b, cc)))
    return deliver(dx, out), dgamma.astype(cdt), dbeta.astype(cdt)


@thread_safe
def relu_backward(dy, y):
    """See ``interface.Backend.relu_backward``: one parallel pass in the
    result's memory order, dy's (``empty_like``); dy and y are copied to it
    only when their strides differ."""
    g = np.empty_like(dy)
    order = np.argsort([-s for s in g.strides], kind="stable")  # g's axes, outermost first: C-contiguous
    dy1, y1 = (_bits(np.ascontiguousarray(a.transpose(order))).reshape(-1) for a in (dy, y))
    if g.size:
        relu_grad(dy1, y1, np.reshape(_bits(g.transpose(order)), -1, copy=False))
    return g


# the norm family (layer, RMS, group, instance norm): rows of a view
from .numba_norms import norm_backward, norm_forward  # noqa: E402,F401
