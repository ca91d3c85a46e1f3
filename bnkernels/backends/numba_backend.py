"""The ``numba`` backend: fused, parallel CPU kernels compiled by Numba.

Kernels work on the canonical view ``(outer, C, inner)`` of a contiguous
input (other inputs are copied to that layout first):

- channel planes (``inner > 1``, NCHW-like): one parallel task per channel
  reduces the channel's slab and then normalizes it while the slab is still
  in cache, so training forward reads x from memory once and writes y once
  when a channel's slab fits the cache (2 effective passes); backward does
  the same with x and dy.
- channel fastest (``inner == 1``): parallel chunks of rows compute
  per-channel partial sums, a tiny merge, then a parallel apply pass
  (2 reads + 1 write of x).

Accuracy: sums are float64 around a shift ``k`` (the channel's first
value), elementwise work is float64, and outputs are rounded once. float16
is converted inside the kernels (``numba_half``: F16C instructions where
the CPU has them, else bit arithmetic; exact both ways).
Fast-math is limited to reassociation and contraction, which keeps NaN and
Inf semantics. Threads: Numba's (``NUMBA_NUM_THREADS``,
``numba.set_num_threads``).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from ..validation import ChannelLayout, compute_dtype
from .numba_half import store, to_work, work_value
from .numpy_backend import ieee_semantics, update_running

name = "numba"

_JIT = dict(parallel=True, fastmath={"reassoc", "contract"}, cache=True, nogil=True)
#: helpers called inside the parallel kernels (LLVM inlines them)
_SERIAL = dict(_JIT, parallel=False)
#: rows of a chunk of channel-fastest data handled by one task
ROWS_PER_CHUNK = 2048


def asarray(x):
    return np.asarray(x)


# --- kernels -----------------------------------------------------------------
# Elements load through to_work and meet per-channel values of the same
# working type (float32 for float16 data, float64 otherwise: see numba_half);
# differences such as x - k are then summed in float64.

def times_centered(d, v, kv, idx, c):
    """``d * (v[idx] - kv)`` in float64, or ``d * d`` when v is None (a stub:
    the statistics pass None so that x is loaded once)."""


@overload(times_centered, inline="always")
def _times_centered(d, v, kv, idx, c):
    if isinstance(v, types.NoneType):
        return lambda d, v, kv, idx, c: d * d
    if isinstance(kv, types.Array):  # one value per channel
        return lambda d, v, kv, idx, c: d * np.float64(to_work(v[idx]) - kv[c])
    return lambda d, v, kv, idx, c: d * np.float64(to_work(v[idx]) - kv)


@njit(**_SERIAL)
def plane_sums(u, ku, v, kv, c):
    """``sum(u - ku)`` and ``sum((u - ku) * (v - kv))`` over channel ``c``
    of (outer, C, inner) arrays; ku, kv in the working type. With u = x and
    v = None, ``sum((x - ku)^2)``: the shifted moments; with u = dy, v = x,
    the backward sums.
    (A helper: LLVM inlines it into the kernels below.)"""
    outer, _, inner = u.shape
    s = 0.0
    t = 0.0
    for o in range(outer):
        for i in range(inner):
            d = np.float64(to_work(u[o, c, i]) - ku)
            s += d
            t += times_centered(d, v, kv, (o, c, i), c)
    return s, t


@njit(**_JIT)
def plane_stats(x, mean_out, m2_out):
    """Per-channel mean and M2 of (outer, C, inner) data, one task per channel."""
    outer, C, inner = x.shape
    n = outer * inner
    for c in prange(C):
        kw = to_work(x[0, c, 0])
        s1, s2 = plane_sums(x, kw, None, None, c)
        k = np.float64(kw)
        dm = s1 / n
        mean_out[c] = k + dm
        m2_out[c] = max(s2 - s1 * dm, 0.0)


@njit(**_JIT)
def train_planes(x, y, gamma, beta, eps, relu, mean_out, m2_out, invstd_out):
    """Training forward of (outer, C, inner) data, one task per channel: the
    channel's sums, then y while its slab is still in cache."""
    outer, C, inner = x.shape
    n = outer * inner
    zero = work_value(x, 0.0)
    for c in prange(C):
        kw = to_work(x[0, c, 0])
        s1, s2 = plane_sums(x, kw, None, None, c)
        k = np.float64(kw)
        dm = s1 / n
        m2 = max(s2 - s1 * dm, 0.0)
        invstd = 1.0 / np.sqrt(m2 / n + eps)
        scale = gamma[c] * invstd
        sc, sh = work_value(x, scale), work_value(x, beta[c] - dm * scale)
        for o in range(outer):
            for i in range(inner):
                v = (to_work(x[o, c, i]) - kw) * sc + sh
                if relu and v < 0:
                    v = zero
                store(y, (o, c, i), v)
        mean_out[c] = k + dm
        m2_out[c] = m2
        invstd_out[c] = invstd


@njit(**_JIT)
def row_sums(u, ku, v, kv, s, t):
    """Partial ``sum(u - ku)`` and ``sum((u - ku) * (v - kv))`` per chunk of
    rows of channel-fastest (rows, C) arrays, into s and t (chunks, C); ku,
    kv (C,) in the working type; v = None for ``sum((u - ku)^2)`` (see
    ``plane_sums``). Four rows at a time, so the partials are
    loaded and stored once per four elements."""
    rows, C = u.shape
    chunks = s.shape[0]
    for j in prange(chunks):
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
def apply(x, y, k, scale, shift, relu, chunks):
    """y = (x - k) * scale + shift [ReLU] on (outer, C, inner) data, in
    ``chunks`` parallel tasks over the outer dimension; k, scale, shift in
    the working type."""
    outer, C, inner = x.shape
    zero = work_value(x, 0.0)
    for t in prange(chunks):
        lo = t * outer // chunks
        hi = (t + 1) * outer // chunks
        for o in range(lo, hi):
            for c in range(C):
                kc, sc, sh = k[c], scale[c], shift[c]
                for i in range(inner):
                    v = (to_work(x[o, c, i]) - kc) * sc + sh
                    if relu and v < 0:
                        v = zero
                    store(y, (o, c, i), v)


@njit(**_JIT)
def apply_rows(x, y, k, scale, shift, relu, chunks):
    """``apply`` for channel-fastest (rows, C) data: the innermost loop runs
    over the channels (contiguous), so it vectorizes."""
    rows, C = x.shape
    zero = work_value(x, 0.0)
    for t in prange(chunks):
        lo = t * rows // chunks
        hi = (t + 1) * rows // chunks
        for r in range(lo, hi):
            for c in range(C):
                v = (to_work(x[r, c]) - k[c]) * scale[c] + shift[c]
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


@njit(**_JIT)
def bwd_planes(dy, x, dx, mean, invstd, gamma, dgamma, dbeta):
    """Backward of (outer, C, inner) data, one task per channel: sums, then
    dx while the slabs are in cache."""
    outer, C, inner = x.shape
    n = outer * inner
    for c in prange(C):
        mw = work_value(x, mean[c])
        s, t = plane_sums(dy, work_value(x, 0.0), x, mw, c)
        inv = invstd[c]
        sum_dy_xhat = t * inv
        a = gamma[c] * inv
        b = -a * inv * sum_dy_xhat / n
        aw, bw, cw = work_value(x, a), work_value(x, b), work_value(x, -a * s / n)
        for o in range(outer):
            for i in range(inner):
                v = to_work(dy[o, c, i]) * aw + (to_work(x[o, c, i]) - mw) * bw + cw
                store(dx, (o, c, i), v)
        dgamma[c] = sum_dy_xhat
        dbeta[c] = s


# --- host side ---------------------------------------------------------------

def _view3(a, layout: ChannelLayout):
    """C-contiguous (outer, C, inner) view; float16 as its uint16 bits."""
    a = np.ascontiguousarray(a).reshape(layout.outer, layout.channels, layout.inner)
    return a.view(np.uint16) if a.dtype == np.float16 else a


def _out3(layout: ChannelLayout, dtype):
    y = np.empty((layout.outer, layout.channels, layout.inner), dtype)
    return y, (y.view(np.uint16) if y.dtype == np.float16 else y)


def _vec(p, C, default):
    return np.full(C, default) if p is None else np.asarray(p, np.float64)


def _work(x3, *vectors):
    """Per-channel float64 vectors in the kernels' working type for x3's
    elements: float32 for float16 data (uint16 bits), else float64."""
    dt = np.float32 if x3.dtype == np.uint16 else np.float64
    return tuple(np.asarray(v, dt) for v in vectors)


def _chunks(rows):
    """Parallel tasks for row-chunked reductions (each gets a row of partials)."""
    return max(1, min(rows // ROWS_PER_CHUNK, 8 * numba.get_num_threads())) if rows else 1


def _tasks(outer):
    """Parallel tasks for the elementwise passes over the outer dimension."""
    return max(1, min(outer, 4 * numba.get_num_threads()))


def _row_stats(x3, C):
    """Channel-fastest statistics: (mean, m2) float64 from chunked sums."""
    x2 = x3.reshape(-1, C)
    k = (x2[0].view(np.float16) if x2.dtype == np.uint16 else x2[0]).astype(np.float64)
    chunks = _chunks(x2.shape[0])
    s1, s2 = np.zeros((chunks, C)), np.zeros((chunks, C))
    kw = _work(x3, k)[0]
    row_sums(x2, kw, None, None, s1, s2)
    n = x2.shape[0]
    s1, s2 = s1.sum(0), s2.sum(0)
    dm = s1 / n
    return k, dm, np.maximum(s2 - s1 * dm, 0.0)


def _apply(x3, y3, layout: ChannelLayout, k, scale, shift, relu):
    """The apply pass with the kernel suited to the layout."""
    k, scale, shift = _work(x3, k, scale, shift)
    if layout.inner == 1:
        C = layout.channels
        apply_rows(x3.reshape(-1, C), y3.reshape(-1, C), k, scale, shift, relu, _tasks(layout.outer))
    else:
        apply(x3, y3, k, scale, shift, relu, _tasks(layout.outer))


@ieee_semantics
def channel_stats(x, layout: ChannelLayout):
    """Per-channel float64 mean and M2."""
    if layout.count == 0 or layout.channels == 0:
        z = np.zeros(layout.channels)
        return z, z.copy()
    x3 = _view3(x, layout)
    if layout.inner == 1:
        k, dm, m2 = _row_stats(x3, layout.channels)
        return k + dm, m2
    mean, m2 = np.empty(layout.channels), np.empty(layout.channels)
    plane_stats(x3, mean, m2)
    return mean, m2


@ieee_semantics
def forward_train(x, layout: ChannelLayout, gamma, beta, eps: float, relu: bool, running):
    """See ``numpy_backend.forward_train``."""
    C, n = layout.channels, layout.count
    cdt = compute_dtype(x.dtype)
    x3 = _view3(x, layout)
    y, y_store = _out3(layout, x.dtype)
    g, b = _vec(gamma, C, 1.0), _vec(beta, C, 0.0)
    if C == 0:
        return y.reshape(layout.shape), np.zeros(0, cdt), np.zeros(0, cdt)
    if layout.inner > 1:
        mean, m2, invstd = np.empty(C), np.empty(C), np.empty(C)
        train_planes(x3, y_store, g, b, eps, relu, mean, m2, invstd)
    else:
        k, dm, m2 = _row_stats(x3, C)
        invstd = 1.0 / np.sqrt(m2 / n + eps)
        scale = g * invstd
        _apply(x3, y_store, layout, k, scale, b - dm * scale, relu)
        mean = k + dm
    if running is not None:
        update_running(running[0], running[1], mean, m2 / (n - 1), running[2])
    return y.reshape(layout.shape), mean.astype(cdt), invstd.astype(cdt)


@ieee_semantics
def forward_infer(x, layout: ChannelLayout, running_mean, running_var, gamma, beta, eps: float, relu: bool):
    """See ``numpy_backend.forward_infer``."""
    C = layout.channels
    cdt = compute_dtype(x.dtype)
    mean = np.asarray(running_mean, np.float64)
    invstd = 1.0 / np.sqrt(np.asarray(running_var, np.float64) + eps)
    scale = _vec(gamma, C, 1.0) * invstd
    y, y_store = _out3(layout, x.dtype)
    if C and layout.count:
        _apply(_view3(x, layout), y_store, layout, mean, scale, _vec(beta, C, 0.0), relu)
    return y.reshape(layout.shape), mean.astype(cdt), invstd.astype(cdt)


@ieee_semantics
def backward(dy, x, layout: ChannelLayout, mean, invstd, gamma):
    """See ``numpy_backend.backward``."""
    C, n = layout.channels, layout.count
    cdt = compute_dtype(x.dtype)
    out, out_store = _out3(layout, x.dtype)
    if C == 0 or n == 0:
        return out.reshape(layout.shape), np.zeros(C, cdt), np.zeros(C, cdt)
    x3, dy3 = _view3(x, layout), _view3(dy, layout)
    m, inv, g = np.asarray(mean, np.float64), np.asarray(invstd, np.float64), _vec(gamma, C, 1.0)
    if layout.inner > 1:
        dgamma, dbeta = np.empty(C), np.empty(C)
        bwd_planes(dy3, x3, out_store, m, inv, g, dgamma, dbeta)
    else:
        chunks = _chunks(layout.outer)
        s, t = np.zeros((chunks, C)), np.zeros((chunks, C))
        mw, zero = _work(x3, m, np.zeros(C))
        row_sums(dy3.reshape(-1, C), zero, x3.reshape(-1, C), mw, s, t)
        dbeta = s.sum(0)
        dgamma = t.sum(0) * inv
        a = g * inv
        b = -a * inv * dgamma / n
        dx_rows(dy3.reshape(-1, C), x3.reshape(-1, C), out_store.reshape(-1, C),
                *_work(x3, m, a, b, -a * dbeta / n), _tasks(layout.outer))
    return out.reshape(layout.shape), dgamma.astype(cdt), dbeta.astype(cdt)
