"""The norm family's members of the numba backend: layer, RMS, group and
instance norm as fused, parallel kernels over the rows of a view.

Same semantics as the reference ``numpy_norms`` (read its docstring): x is a
:class:`ChannelLayout` ``(1, G, F)``, G rows of F values, and value i of row
g uses weight ``(g % period) * span + i // divisor`` (``F == span *
divisor``). Each parallel task takes a chunk of rows and, per row, while the
row is in cache (a 16 KB float32 row of a (4096, 4096) layer norm stays in
L1/L2 between the passes, so x is read from memory once):

- forward: pass 1 the mean (float64 sums; RMS: the mean of squares), pass 2
  ``M2 = sum((x - mean)^2)`` (two-pass: exact where ``E[x^2] - E[x]^2``
  cancels, e.g. float32 ``1e4 + randn`` rows), pass 3 y;
- backward: pass 1 ``sum(g)``, ``sum(g * xhat)`` (``g = dy * w``, float64)
  and the task's partial ``dweight``/``dbias``, pass 2 dx.

Weights: layer and RMS norm (divisor 1) run one loop over the features
(``w[i]``, ``b[i]``: contiguous, LLVM vectorizes it); group and instance norm
(divisor > 1) an outer loop over the span with the weight's ``scale`` hoisted
and an inner contiguous loop over its ``divisor`` values: no integer
division per element.

Working types are the batch-norm kernels' (``numba_backend``, ``numba_half``):
float32 and float64 data are worked in float64, float16/bfloat16 (seen as
their uint16/int16 bits) in float32; sums are float64; y and dx are rounded
once. Weights are converted to the working type once on the host.

Determinism: the backward's per-weight sums are accumulated per chunk of
rows into partial arrays (no races), the chunks being a function of the
shape only (:func:`_grad_chunks`, not of the thread count), and the partials
are summed on the host in chunk order: dweight and dbias are bitwise the
same for any ``numba.set_num_threads``.

This module is part of ``numba_backend``, which imports it at its end and
exports its members (``numba_backend.norm_forward``, ``norm_backward``).
"""
from __future__ import annotations

import importlib
import sys

# Imported on its own, before numba_backend, this module would meet a
# circular import (numba_backend's last line wants names not defined here
# yet): it has numba_backend import it instead, and the import statement
# gives that copy (the one in sys.modules); the rest of this body then runs
# on the discarded one, whose kernels are never compiled.
_BACKEND = __package__ + ".numba_backend"
if _BACKEND not in sys.modules:
    del sys.modules[__name__]
    importlib.import_module(_BACKEND)

import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

from .cpu_common import ieee_semantics  # noqa: E402
from .interface import ChannelLayout  # noqa: E402
from .numba_backend import _JIT, _SERIAL, _bits, _tasks  # noqa: E402
from .numba_threads import thread_safe  # noqa: E402
from .numba_half import prefer_wide_vectors_for, store, to_work, work_value  # noqa: E402
from .outputs import deliver  # noqa: E402
from ..validation import compute_dtype  # noqa: E402

#: backward: a chunk of rows (one set of partial dweight/dbias) covers at
#: least this many values, so that small inputs are not split for nothing ...
GRAD_CHUNK_VALUES = 1 << 14
#: ... and at least this many rows per row of partials (layer norm has a
#: weight per feature: a partial row costs 16 bytes a feature, against 8 a
#: feature for each float32 row of x and dy, so partials add at most 1/8 to
#: the backward's reads, 1/4 for 16-bit data) ...
GRAD_ROWS_PER_WEIGHT_ROW = 16
#: ... and partials of at most this many bytes in all: fresh pages cost a
#: page fault each (128 partial rows of layer norm's 4096 weights, 8 MB,
#: made its (4096, 4096) float32 backward 42 -> 54 ms here) ...
GRAD_PARTIAL_BYTES = 2 << 20
#: ... and at most this many chunks: the parallel tasks of the backward, a
#: number from the shape only so that the sums do not depend on the thread
#: count (machines with more threads than chunks leave some idle)
MAX_GRAD_CHUNKS = 128


# --- kernels: one row -----------------------------------------------------------
# x, y, dy, dx are (G, F) C-contiguous arrays (16-bit floats as their bits);
# w, b (channels,) in the working type; per-row statistics float64.

@njit(**_SERIAL)
def row_moments(x, r, rms):
    """float64 ``(mean, M2)`` of row r of x: ``M2 = sum((x - mean)^2)``, two
    passes; RMS (``rms``): ``(0, sum(x^2))``, one pass (no cancellation)."""
    prefer_wide_vectors_for(x)
    F = x.shape[1]
    if rms:
        q = 0.0
        for i in range(F):
            v = np.float64(to_work(x[r, i]))
            q += v * v
        return 0.0, q
    s = 0.0
    for i in range(F):
        s += np.float64(to_work(x[r, i]))
    mean = s / F
    q = 0.0
    for i in range(F):
        d = np.float64(to_work(x[r, i])) - mean
        q += d * d
    return mean, q


# (the divisor == 1 and divisor > 1 loops of y and dx are separate functions:
# two inlined 16-bit stores in one function broke Numba's IR inliner with
# NumbaIRAssumptionWarning "variable ... is not in scope")

@njit(**_SERIAL)
def write_row(x, y, r, m, inv, w, b, base, span, divisor):
    """Row r of y: ``(x - m) * inv * w[c] + b[c]``, c the value's weight
    (``base + i // divisor``); m, inv in the working type. Each element of
    x is read before y's is written: y may be x."""
    if divisor == 1:
        write_row_features(x, y, r, m, inv, w, b, base, span)
    else:
        write_row_runs(x, y, r, m, inv, w, b, base, span, divisor)


@njit(**_SERIAL)
def write_row_features(x, y, r, m, inv, w, b, base, span):
    """``write_row`` with a weight per value (layer, RMS norm): one loop,
    vectorized over x, w and b."""
    for i in range(span):
        store(y, (r, i), (to_work(x[r, i]) - m) * (inv * w[base + i]) + b[base + i])


@njit(**_SERIAL)
def write_row_runs(x, y, r, m, inv, w, b, base, span, divisor):
    """``write_row`` with a weight per run of ``divisor`` values (group,
    instance norm): its scale and shift hoisted out of the inner loop."""
    for a in range(span):
        scale = inv * w[base + a]
        shift = b[base + a]
        o = a * divisor
        for j in range(o, o + divisor):
            store(y, (r, j), (to_work(x[r, j]) - m) * scale + shift)


@njit(**_SERIAL)
def row_grad_sums(dy, x, r, m, inv, w, base, span, divisor, pw, pb):
    """float64 ``(sum(g), sum(g * xhat))`` of row r, ``g = dy * w[c]``,
    ``xhat = (x - m) * inv`` (m, inv in the working type), and the row's
    ``sum(dy * xhat)``, ``sum(dy)`` per weight added to the partials pw, pb
    (channels,) float64."""
    prefer_wide_vectors_for(x)
    sg = 0.0
    sgx = 0.0
    if divisor == 1:
        for i in range(span):
            d = to_work(dy[r, i])
            xh = (to_work(x[r, i]) - m) * inv
            g = d * w[base + i]
            sg += np.float64(g)
            sgx += np.float64(g) * np.float64(xh)
            pw[base + i] += np.float64(d) * np.float64(xh)
            pb[base + i] += np.float64(d)
    else:
        for a in range(span):
            sd = 0.0
            sdx = 0.0
            o = a * divisor
            for j in range(o, o + divisor):
                d = np.float64(to_work(dy[r, j]))
                sd += d
                sdx += d * np.float64((to_work(x[r, j]) - m) * inv)
            pw[base + a] += sdx
            pb[base + a] += sd
            wa = np.float64(w[base + a])  # sum(g) = w[a] * sum(dy) over the weight's values
            sg += wa * sd
            sgx += wa * sdx
    return sg, sgx


@njit(**_SERIAL)
def write_dx_row(dy, x, dx, r, m, inv, k1, k0, w, base, span, divisor):
    """Row r of ``dx = inv * (g - mean(g) - xhat * mean(g * xhat))`` written
    as ``dy * (inv * w[c]) - (x - m) * k1 + k0`` with ``k1 = inv^2 *
    mean(g * xhat)``, ``k0 = -inv * mean(g)`` (working type). dx may be x
    or dy (each element is read before it is written)."""
    if divisor == 1:
        write_dx_features(dy, x, dx, r, m, inv, k1, k0, w, base, span)
    else:
        write_dx_runs(dy, x, dx, r, m, inv, k1, k0, w, base, span, divisor)


@njit(**_SERIAL)
def write_dx_features(dy, x, dx, r, m, inv, k1, k0, w, base, span):
    """``write_dx_row`` with a weight per value."""
    for i in range(span):
        store(dx, (r, i), to_work(dy[r, i]) * (inv * w[base + i]) - (to_work(x[r, i]) - m) * k1 + k0)


@njit(**_SERIAL)
def write_dx_runs(dy, x, dx, r, m, inv, k1, k0, w, base, span, divisor):
    """``write_dx_row`` with a weight per run of ``divisor`` values."""
    for a in range(span):
        scale = inv * w[base + a]
        o = a * divisor
        for j in range(o, o + divisor):
            store(dx, (r, j), to_work(dy[r, j]) * scale - (to_work(x[r, j]) - m) * k1 + k0)


# --- kernels: parallel over chunks of rows ------------------------------------------

@njit(**_JIT)
def norm_rows(x, y, w, b, eps, rms, period, span, divisor, mean_out, inv_out, chunks):
    """Forward of every row of (G, F) x into y (may be x), ``chunks``
    parallel tasks of consecutive rows; mean_out, inv_out (G,) float64."""
    G, F = x.shape
    for t in prange(chunks):
        for r in range(t * G // chunks, (t + 1) * G // chunks):
            mean, m2 = row_moments(x, r, rms)
            inv = 1.0 / np.sqrt(m2 / F + eps)
            mean_out[r] = mean
            inv_out[r] = inv
            write_row(x, y, r, work_value(x, mean), work_value(x, inv), w, b, (r % period) * span, span, divisor)


@njit(**_JIT)
def norm_rows_backward(dy, x, dx, mean, invstd, w, rms, period, span, divisor, pw, pb):
    """Backward of every row of (G, F) arrays into dx (may be x or dy); one
    parallel task per row of the partials pw, pb (chunks, channels) float64
    (zeros on entry), each taking a fixed chunk of consecutive rows; mean,
    invstd (G,) float64 (mean: zeros for RMS)."""
    G, F = x.shape
    chunks = pw.shape[0]
    for t in prange(chunks):
        for r in range(t * G // chunks, (t + 1) * G // chunks):
            base = (r % period) * span
            inv = invstd[r]
            m, iv = work_value(x, mean[r]), work_value(x, inv)
            sg, sgx = row_grad_sums(dy, x, r, m, iv, w, base, span, divisor, pw[t], pb[t])
            k1 = inv * inv * (sgx / F)
            k0 = 0.0 if rms else -inv * (sg / F)
            write_dx_row(dy, x, dx, r, m, iv, work_value(x, k1), work_value(x, k0), w, base, span, divisor)


# --- host side -------------------------------------------------------------------

def _rows(a, layout: ChannelLayout):
    """(G, F) C-contiguous view of a (1, G, F) array (a copy only when it
    is not C-contiguous: strided inputs), 16-bit floats as their bits."""
    return _bits(np.ascontiguousarray(a).reshape(layout.shape[1], layout.shape[2]))


def _result(layout: ChannelLayout, dtype, out):
    """The result (``out`` itself when it is C-contiguous, else a new
    array) and its (G, F) view for the kernels' stores."""
    y = out if out is not None and out.flags.c_contiguous else np.empty(layout.shape, dtype)
    return y, _bits(y.reshape(layout.shape[1], layout.shape[2]))


def _params(x2, layout: ChannelLayout, *params):
    """Weights (channels,) or None in the kernels' working type for x2's
    elements (float32 for 16-bit data, else float64): None gives ones for
    the first (weight), zeros for the others (bias)."""
    dt = np.float32 if x2.itemsize == 2 else np.float64
    n = layout.affine.channels
    return tuple((np.full(n, 1.0 if j == 0 else 0.0, dt) if p is None else np.asarray(p, dt).reshape(n))
                 for j, p in enumerate(params))


def _empty(layout: ChannelLayout) -> bool:
    """No rows or empty rows: F == 0 has ``1/sqrt(0 + eps)`` statistics, as
    ``numpy_norms`` (``mean(x^2)`` of no values counted as 0)."""
    return layout.shape[1] == 0 or layout.shape[2] == 0


def _grad_chunks(G: int, F: int, channels: int) -> int:
    """Chunks of rows of the backward (each one partial dweight/dbias):
    from the shape only, so that the sums do not depend on the thread
    count (see the module docstring and the ``GRAD_*`` constants)."""
    by_values = G * F // GRAD_CHUNK_VALUES
    by_partials = G * F // (GRAD_ROWS_PER_WEIGHT_ROW * max(channels, 1))
    by_memory = GRAD_PARTIAL_BYTES // (16 * max(channels, 1))  # two float64 partials a weight
    return max(1, min(G, MAX_GRAD_CHUNKS, by_values, by_partials, by_memory))


@thread_safe
@ieee_semantics
def norm_forward(x, layout: ChannelLayout, weight, bias, eps: float, rms: bool, out=None):
    """See ``numpy_norms.norm_forward``: ``(y, mean, invstd)``, y like x
    (``(1, G, F)``; ``out`` when given, written directly when it is
    C-contiguous: it may be x itself), mean and invstd (G,) in the compute
    dtype (mean None for RMS norm)."""
    f = layout.affine
    G = layout.shape[1]
    cdt = compute_dtype(x.dtype)
    if _empty(layout):  # nothing to normalize: the reference's statistics of empty rows
        y, _ = _result(layout, x.dtype, out)
        inv = np.full(G, 1.0 / np.sqrt(np.float64(eps)), cdt)
        return deliver(y, out), None if rms else np.zeros(G, cdt), inv
    x2 = _rows(x, layout)
    y, y2 = _result(layout, x.dtype, out)
    w, b = _params(x2, layout, weight, bias)
    mean, inv = np.empty(G), np.empty(G)
    norm_rows(x2, y2, w, b, float(eps), bool(rms), f.period, f.span, f.divisor, mean, inv, _tasks(G))
    return deliver(y, out), None if rms else mean.astype(cdt), inv.astype(cdt)


@thread_safe
@ieee_semantics
def norm_backward(dy, x, layout: ChannelLayout, mean, invstd, weight, rms: bool, out=None):
    """See ``numpy_norms.norm_backward``: ``(dx, dweight, dbias)``, dx like
    x (``out`` when given), dweight and dbias (channels,) in the compute
    dtype, deterministic whatever the thread count."""
    f = layout.affine
    G, F = layout.shape[1], layout.shape[2]
    cdt = compute_dtype(x.dtype)
    if _empty(layout):  # no values: zero sums
        dx, _ = _result(layout, x.dtype, out)
        return deliver(dx, out), np.zeros(f.channels, cdt), np.zeros(f.channels, cdt)
    x2, dy2 = _rows(x, layout), _rows(dy, layout)
    dx, dx2 = _result(layout, x.dtype, out)
    (w,) = _params(x2, layout, weight)
    m = np.zeros(G) if mean is None else np.asarray(mean, np.float64).reshape(G)
    inv = np.asarray(invstd, np.float64).reshape(G)
    chunks = _grad_chunks(G, F, f.channels)
    pw, pb = np.zeros((chunks, f.channels)), np.zeros((chunks, f.channels))
    norm_rows_backward(dy2, x2, dx2, m, inv, w, mean is None, f.period, f.span, f.divisor, pw, pb)
    # the partials in chunk order (an axis-0 sum adds the rows one after another)
    return deliver(dx, out), pw.sum(axis=0).astype(cdt), pb.sum(axis=0).astype(cdt)
