"""Vectorized NumPy backend: the dependency-free CPU implementation, and the
reference implementation of ``interface.Backend`` (every member; finalize
comes from ``cpu_common``). The public functions validated every argument
before calling them, so they do no checking of their own.

Blocks (:class:`_Plan`): the input is walked in its own memory order (axes
sorted by decreasing stride: transposed, Fortran-ordered and strided inputs
are read in place, never copied) in blocks of at most :data:`BLOCK`
elements. A block goes through a few in-place ufuncs on a buffer that stays
in the CPU's cache, where a textbook implementation makes whole-array
temporaries that travel to and from memory each time. Outputs are allocated
in the input's memory order; ``out=`` is written block by block whatever
its strides, each block after all of its inputs were read (so ``out`` may
be an input: in place).

Statistics (:func:`_moments`, :func:`_sums_pass`) are float64 sums of
float64 differences ``x - k`` around a shift ``k`` near each channel's
mean, never ``E[x^2] - E[x]^2``. Every float16/32 value, its square, the
difference of two of them and products such as ``dy * (x - mean)`` are
exact or correctly rounded in float64 (no overflow at 3.4e38, no underflow
at 1e-45), so the statistics match the float64 reference on any finite
float16/32 data.

Elementwise passes (:func:`_affine_pass`: ``y = (x - k) * scale + shift``,
``dx = dy * a + (x - mean) * b + c``) take the shift's rounding into the
constant term, which for float64 data keeps ``x - k`` exact near the mean
(Sterbenz). Float32 data is worked in float32 when the per-channel
coefficients are normal float32 numbers, with the floating-point overflow
and invalid flags raising: a block whose float32 intermediates overflow
(``x - k`` of values of opposite signs near 3.4e38, say) is redone in
float64, as is everything when a coefficient is out of float32's range
(``1 / std`` of subnormal data is 1e41, ``a * invstd`` of data of 1e37 is
1e-75). Rounding to float32 on the way costs an ulp or two of the result,
or 1e-45 absolute. Float16 data is worked in float64 (NumPy converts
float16 to and from float64 faster than float32). Where every channel's
|mean| is within its std, the elementwise passes and the sums work on x
itself instead of ``x - k`` (no cancellation to avoid; a ufunc less).

IEEE semantics, silently, as on a GPU: NaN/Inf propagate, ``eps=0`` on a
constant channel gives NaN, a float16 output beyond 65504 becomes Inf;
NumPy's floating-point warnings are suppressed (``ieee_semantics``) so that
they do not surface in callers' code.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np

from ..validation import compute_dtype, host_array
from .coefficients import dx_coefficients, update_running
from . import cpu_common
from .cpu_common import ieee_semantics, per_channel
from .interface import ChannelLayout, GradSums, Moments, Normalization
from .outputs import deliver

name = "numpy"

#: The finalize stage, shared by both CPU backends (host float64 arithmetic).
finalize, finalize_running = cpu_common.finalize, cpu_common.finalize_running

#: Elements per block: buffers of 1 MiB (float32) or 2 MiB (float64), which
#: stay in the last-level cache. NumPy's cost per call (microseconds)
#: outweighs L2 misses below this: on the 2-core VM this was tuned on,
#: 32K-element blocks ran up to 1.7x slower, 128K ones 10-20 %.
BLOCK = 1 << 18

#: Largest accepted ``n * (mean - k)^2 / m2`` (see :func:`_moments`), per
#: compute dtype: the relative error of m2 is about (1 + 2 * this) times
#: that of the float64 sums.
_SHIFT_SLACK = {np.dtype(np.float32): 1e4, np.dtype(np.float64): 4.0}

#: Longest rows summed as BLAS dot products (OpenBLAS threads ddot beyond
#: 10000 elements).
_DOT_MAX = 8192

#: Row length channel-fastest column sums are widened to.
_WIDE = 1024


def asarray(x):
    """Host arrays in, host arrays out (a torch bfloat16 tensor as NumPy's
    bfloat16: ``validation.host_array``)."""
    return host_array(x)


def _tiles(shape):
    """Index tuples (one slice per axis) tiling an array of ``shape`` in C
    order, each of at most BLOCK elements: ranges of the leading axis with
    whole trailing axes where those fit, else one index at a time of the
    leading axis and tiles of the rest. Ranges are BLOCK-sized but for the
    last, so the first tile of any channel range is its largest."""
    rest = math.prod(shape[1:])
    if rest > BLOCK:
        for i in range(shape[0]):
            for sub in _tiles(shape[1:]):
                yield (slice(i, i + 1),) + sub
        return
    step = max(1, BLOCK // rest)
    for lo in range(0, shape[0], step):
        yield (slice(lo, min(lo + step, shape[0])),) + tuple(slice(0, n) for n in shape[1:])


class _Plan:
    """How the arrays of one call are walked.

    ``perm``: x's axes by decreasing |stride| (C order among equals);
    ``shape``: x's shape in that order; ``axis``: the channel axis's position
    there. Every array of the call (x, dy, y, out) is viewed through
    :meth:`view`, so one block index picks the same elements of each,
    whatever their own strides. ``blocks``: :func:`_tiles` of ``shape``,
    grouped by channel range (C order within a group).
    """

    def __init__(self, x, layout: ChannelLayout):
        self.perm = sorted(range(x.ndim), key=lambda i: -abs(x.strides[i]))
        self.shape = tuple(x.shape[i] for i in self.perm)
        self.axis = self.perm.index(layout.axis)
        self.channels = layout.channels
        tiles = list(_tiles(self.shape)) if 0 not in self.shape else []
        self.blocks = sorted(tiles, key=lambda idx: idx[self.axis].start)

    def view(self, a):
        """``a`` (shaped like x) with its axes in x's memory order."""
        return a.transpose(self.perm)

    def new(self, dtype):
        """An uninitialized array shaped like x, laid out in x's memory order."""
        return np.empty(self.shape, dtype).transpose(np.argsort(self.perm))

    def three(self, bshape):
        """A block's canonical ``(outer, c, inner)`` shape."""
        a = self.axis
        return math.prod(bshape[:a]), bshape[a], math.prod(bshape[a + 1:])

    def loads(self, arrays, vectors, dtype, start: int = 0):
        """For the blocks from number ``start`` on: ``(j, idx, cs, srcs,
        bufs, vecs)``: the block's number, index and channel slice, its views
        of ``arrays`` (memory-ordered), one uninitialized buffer of ``dtype``
        per array, shaped like the block, and ``vectors`` ((C,) arrays or
        None) in ``dtype``, cut to the block's channels and shaped to
        broadcast against it.

        Where a channel range has more than one block, a vector is expanded
        once per range to the block's whole inner extent (channel planes) or
        rows (channel fastest): NumPy runs an operand that is constant along
        the inner loop (stride 0) or short rows at half speed.
        """
        shapes = [tuple(s.stop - s.start for s in idx) for idx in self.blocks]
        size = max(map(math.prod, shapes), default=0)
        buffers = [np.empty(size, dtype) for _ in arrays]
        groups = Counter(idx[self.axis].start for idx in self.blocks)
        first = {}
        for idx, bshape in zip(self.blocks, shapes):
            first.setdefault(idx[self.axis].start, bshape)
        vectors = [None if v is None else np.asarray(v, dtype) for v in vectors]
        group = forms = None
        for j in range(start, len(self.blocks)):
            idx, bshape = self.blocks[j], shapes[j]
            cs = idx[self.axis]
            if cs.start != group:
                group = cs.start
                forms = [self._form(v, cs, first[group], groups[group] > 1) for v in vectors]
            o, c, i = self.three(bshape)
            vecs = [None if f is None else self._cut(f, o, i, bshape) for f in forms]
            bufs = [buf[: o * c * i].reshape(bshape) for buf in buffers]
            yield j, idx, cs, [a[idx] for a in arrays], bufs, vecs

    def _form(self, v, cs, bshape, expand: bool):
        """Vector v's channels cs as (1, c, 1), or, with ``expand``, as
        (1, c, inner) (channel planes) or (outer, c, 1) (channel fastest)
        for a block of shape bshape."""
        if v is None:
            return None
        v = v[cs].reshape(1, -1, 1)
        if not expand:
            return v
        o, c, i = self.three(bshape)
        form = np.empty((o if i == 1 else 1, c, i), v.dtype)
        np.copyto(form, v)
        return form

    def _cut(self, form, o: int, i: int, bshape):
        """A :meth:`_form` cut to an (o, c, i) block and shaped to broadcast
        against its N-D shape bshape."""
        a = self.axis
        f = form[:o, :, :i]
        lead = bshape[:a] if f.shape[0] > 1 else (1,) * a
        trail = bshape[a + 1:] if f.shape[2] > 1 else (1,) * (len(bshape) - a - 1)
        return f.reshape(lead + (f.shape[1],) + trail)


def _diff(src, k, buf):
    """``buf = src - k`` (k None: a copy) in buf's dtype; one ufunc when
    the dtypes agree."""
    if k is not None and src.dtype == buf.dtype:
        np.subtract(src, k, out=buf)
        return
    np.copyto(buf, src)
    if k is not None:
        np.subtract(buf, k, out=buf)


def _block_sums(u, w, shape):
    """Per-channel float64 ``sum(u)`` and ``sum(u * w)`` of a block of
    canonical ``shape`` (outer, c, inner), (c,) each, one read each and no
    temporaries: sums of rows of (outer * c, inner), or of columns of
    (outer, c) when inner == 1. Row products are batched dot products
    (BLAS) while rows are short enough that OpenBLAS keeps them on one
    thread (its threads stall for milliseconds when another process holds
    a core), else einsum, as are the other sums (or add.reduce)."""
    o, c, i = shape
    if i == 1:
        # m rows side by side: column sums run ~1.3x faster on rows of 1024
        # than of 32 to 64 (and add.reduce 1.4x faster than einsum there)
        m = max(1, min(o, _WIDE // c))
        q = o - o % m
        u2, w2 = u.reshape(o, c), w.reshape(o, c)
        uw, ww = u2[:q].reshape(q // m, m * c), w2[:q].reshape(q // m, m * c)
        s = np.add.reduce(uw, axis=0).reshape(m, c).sum(0)
        t = np.einsum("ij,ij->j", uw, ww).reshape(m, c).sum(0)
        if q < o:
            s += np.add.reduce(u2[q:], axis=0)
            t += np.einsum("ij,ij->j", u2[q:], w2[q:])
        return s, t
    u2, w2 = u.reshape(o * c, i), w.reshape(o * c, i)
    s = np.einsum("ij->i", u2)
    if i <= _DOT_MAX:
        t = np.matmul(u2[:, None, :], w2[:, :, None]).reshape(-1)
    else:
        t = np.einsum("ij,ij->i", u2, w2)
    return (s, t) if o == 1 else (s.reshape(o, c).sum(0), t.reshape(o, c).sum(0))


def _sums_pass(plan: _Plan, u, ku, w=None, kw=None):
    """One pass: per-channel float64 ``sum(u - ku)`` and ``sum((u - ku) *
    (w - kw))`` (w None: ``sum((u - ku)^2)``) over memory-ordered arrays u,
    w; ku, kw: (C,) float64 or None for 0. Returns two (C,) arrays."""
    s, t = np.zeros(plan.channels), np.zeros(plan.channels)
    arrays, shifts = ((u,), (ku,)) if w is None else ((u, w), (ku, kw))
    for _, _, cs, srcs, bufs, vecs in plan.loads(arrays, shifts, np.float64):
        for src, k, b in zip(srcs, vecs, bufs):
            _diff(src, k, b)
        bs, bt = _block_sums(bufs[0], bufs[-1], plan.three(bufs[0].shape))
        s[cs] += bs
        t[cs] += bt
    return s, t


def _fits_float32(scales, shifts) -> bool:
    """Whether per-channel float64 coefficients (lists of (C,) arrays) are
    float32 numbers: finite there, and the scales 0 or normal (a scale
    that rounds to a subnormal or to 0 would keep a few bits, or none).
    Overflow of the products with the data is left to the float32 pass's
    overflow flag."""
    info = np.finfo(np.float32)
    return (all((np.abs(v) <= info.max).all() for v in scales + shifts)
            and all(((v == 0) | (np.abs(v) >= info.tiny)).all() for v in scales))


def _affine_pass(plan: _Plan, terms, shift, relu: bool, out, data_dtype):
    """One pass: ``out = sum((a - k) * scale for a, k, scale in terms) +
    shift`` [ReLU], per channel, rounded to out's dtype. ``terms``:
    (memory-ordered array, k (C,) float64 or None for 0, scale (C,)
    float64); shift (C,) float64; out: memory-ordered view.

    In float32 for float32 data whose coefficients fit
    (:func:`_fits_float32`), with k rounded to float32 and the rounding
    taken into the shift; from the first block whose float32 arithmetic
    overflows (or meets Inf), in float64. Float16 data is worked in float64:
    NumPy converts float16 to and from float64 faster than float32.
    """
    start = 0
    if data_dtype == np.float32:
        f32 = np.float32
        k32 = [None if k is None else k.astype(f32) for _, k, _ in terms]
        shift32 = shift + sum(((k2 - k) * s for (_, k, s), k2 in zip(terms, k32) if k is not None), 0.0)
        terms32 = [(a, k2, s) for (a, _, s), k2 in zip(terms, k32)]
        if _fits_float32([s for _, _, s in terms], [k for k in k32 if k is not None] + [shift32]):
            with np.errstate(over="raise", invalid="raise"):
                start = _affine_blocks(plan, terms32, shift32, relu, out, f32, 0)
    if start < len(plan.blocks):
        _affine_blocks(plan, terms, shift, relu, out, np.float64, start)


def _affine_blocks(plan: _Plan, terms, shift, relu: bool, out, dtype, start: int) -> int:
    """:func:`_affine_pass` in ``dtype`` from block ``start`` on. Returns
    the number of the first block whose arithmetic raised
    FloatingPointError, else the block count. The result is computed in
    ``out`` itself where it has the working dtype and shares no memory with
    the inputs (then a block that raised is simply computed again), else in
    a buffer, copied to ``out`` once complete."""
    arrays = [a for a, _, _ in terms]
    direct = out.dtype == dtype and not any(np.may_share_memory(out, a) for a in arrays)
    vectors = [v for _, k, s in terms for v in (k, s)] + [shift]
    for j, idx, _, srcs, bufs, vecs in plan.loads(arrays, vectors, dtype, start):
        acc = out[idx] if direct else bufs[0]
        try:
            for n, (src, b) in enumerate(zip(srcs, [acc] + bufs[1:])):
                if vecs[2 * n] is None:
                    np.multiply(src, vecs[2 * n + 1], out=b)
                else:
                    _diff(src, vecs[2 * n], b)
                    np.multiply(b, vecs[2 * n + 1], out=b)
                if n:
                    np.add(acc, b, out=acc)
            np.add(acc, vecs[-1], out=acc)
        except FloatingPointError:
            return j
        with np.errstate(over="ignore", invalid="ignore"):  # a float16 result beyond 65504 is Inf
            if relu:
                np.maximum(acc, 0, out=acc)  # keeps NaN, as torch.relu does
            if not direct:
                np.copyto(out[idx], acc, casting="same_kind")
    return len(plan.blocks)


def _sample_shift(plan: _Plan, xp):
    """The shift's first estimate, float64 (C,): per channel, the mean of a
    small sample of x (about BLOCK / 8 values in all, a prefix of each other
    axis from the fastest one on, so read in contiguous runs), or 0 where
    that mean is within the sample's std of 0 (no cancellation to avoid,
    and 0 for every channel saves a ufunc per element)."""
    idx = [slice(None)] * xp.ndim
    room = max(1, BLOCK // 8 // max(plan.channels, 1))
    for i in reversed(range(xp.ndim)):
        if i != plan.axis:
            take = min(xp.shape[i], room)
            idx[i] = slice(0, take)
            room = max(1, room // take)
    others = tuple(i for i in range(xp.ndim) if i != plan.axis)
    sample = xp[tuple(idx)]
    mean = np.mean(sample, axis=others, dtype=np.float64).reshape(-1)
    var = np.var(sample, axis=others, dtype=np.float64).reshape(-1)
    return np.where(mean * mean <= var, 0.0, mean)


def _centered(center, ratio):
    """``center`` (C,), or None (0) where ``ratio = |mean| / std`` is at
    most 1 in every channel: then an elementwise pass on x itself rounds at
    most twice as much as on ``x - center``, and saves a ufunc per element."""
    return None if (ratio <= 1.0).all() else center


def _moments(plan: _Plan, xp, dtype):
    """Shifted moments of memory-ordered x: ``(k, dm, m2)``, float64 (C,):
    the shift k, ``dm = mean - k`` and ``m2`` (sum of squared deviations
    from the mean), from ``s1 = sum(x - k)`` and ``s2 = sum((x - k)^2)``.

    ``m2 = s2 - s1 * dm`` cancels: s2 = m2 + n * dm^2, so float64 sums of
    relative error e give m2 to about ``e * (1 + 2 * T)``, ``T = n * dm^2 /
    m2 = (dm / std)^2``. The differences are exact or correctly rounded
    float64, so e is a few float64 ulps times the summation depth whatever
    the data's magnitude or |mean| / std. k is the mean of a small sample
    (:func:`_sample_shift`), normally a fraction of a std from the mean; where
    T exceeds ``_SHIFT_SLACK`` (an unrepresentative sample), the pass is
    redone around the mean just found. One redo is enough: the sample mean
    lies within the channel's values, so ``|dm| <= 2 sqrt(n) std`` and the
    first mean is within ``e * (2 sqrt(n) std + |mean|)`` of the true one,
    giving ``T <= 4 n e^2 + (e |mean| / std)^2``, negligible for n < 1e20
    and |mean| / std < 1e13. NaN/Inf give NaN (no redo).
    """
    n = math.prod(plan.shape) // plan.channels
    k = _sample_shift(plan, xp)
    slack = _SHIFT_SLACK[compute_dtype(dtype)]
    for redo in (False, True):
        s1, s2 = _sums_pass(plan, xp, k if k.any() else None)
        dm = s1 / n
        m2 = np.maximum(s2 - s1 * dm, 0.0)
        bad = s1 * dm > slack * m2
        if redo or not bad.any():
            return k, dm, m2
        k = np.where(bad, k + dm, k)


def _result(plan: _Plan, x, out):
    """The array to write the result into: ``out``, else a new array like x
    in x's memory order."""
    return out if out is not None else plan.new(x.dtype)


@ieee_semantics
def statistics(x, layout: ChannelLayout) -> Moments:
    """Per-group count, mean and M2 (sum of squared deviations) of x.

    x: any shape, float16/32/64; mean and m2: float64 (C,) (zeros for an
    empty batch).
    """
    if x.size == 0:
        return Moments(layout.count, np.zeros(layout.channels), np.zeros(layout.channels))
    plan = _Plan(x, layout)
    k, dm, m2 = _moments(plan, plan.view(x), x.dtype)
    return Moments(layout.count, k + dm, m2)


@ieee_semantics
def forward_train(x, layout: ChannelLayout, gamma, beta, eps: float, relu: bool, running, out=None,
                  residual=None):
    """Training forward.

    x: input, any shape, float16/32/64; gamma, beta: (C,) or None;
    running: ``(running_mean, running_var, factor)`` or None, updated in place;
    out: None or a checked buffer for y (``validation.check_out``), written
    directly (x itself for an in-place result); residual: None or an array
    like x (any strides) added before the ReLU, in the same pass.
    Returns ``y`` (shape and dtype of x, in x's memory order; ``out`` when
    given), ``mean`` and ``invstd`` (C,) in the compute dtype (float32 for
    float16/32 input; an invstd beyond float32's range is Inf there).
    """
    C, n, cdt = layout.channels, layout.count, compute_dtype(x.dtype)
    plan = _Plan(x, layout)
    y = _result(plan, x, out)
    if x.size == 0:  # no channels (training has n >= 2)
        return deliver(y, out), np.zeros(C, cdt), np.zeros(C, cdt)
    xp = plan.view(x)
    k, dm, m2 = _moments(plan, xp, x.dtype)
    invstd = 1.0 / np.sqrt(m2 / n + eps)
    scale = per_channel(gamma, C, 1.0) * invstd
    # center x on k, or on the mean itself where k is 0 (then exactly dm)
    center = _centered(np.where(k == 0, dm, k), np.abs(k + dm) * np.sqrt(n / m2))
    offset = k + dm if center is None else np.where(k == 0, 0.0, dm)  # mean - center
    shift = per_channel(beta, C, 0.0) - offset * scale
    _affine_pass(plan, [(xp, center, scale), *_residual_term(plan, residual)], shift, relu, plan.view(y), x.dtype)
    mean = k + dm
    if running is not None:
        running_mean, running_var, factor = running
        update_running(running_mean, running_var, mean, m2 / (n - 1), factor)
    return deliver(y, out), mean.astype(cdt), invstd.astype(cdt)


@ieee_semantics
def normalize(x, layout: ChannelLayout, norm: Normalization, relu: bool, out=None, residual=None):
    """``y = (x - k) * scale + shift [+ residual]`` [ReLU] with ``norm`` from
    :func:`finalize` or :func:`finalize_running`. Returns ``y`` (like x,
    in x's memory order; ``out`` when given)."""
    plan = _Plan(x, layout)
    y = _result(plan, x, out)
    k = np.asarray(norm.k, np.float64)
    center = _centered(k, np.abs(k) * np.asarray(norm.invstd, np.float64))
    shift = norm.shift - (0.0 if center is not None else k * norm.scale)
    _affine_pass(plan, [(plan.view(x), center, norm.scale), *_residual_term(plan, residual)], shift, relu,
                 plan.view(y), x.dtype)
    return deliver(y, out)


def _residual_term(plan: _Plan, residual) -> list:
    """The residual as a term of :func:`_affine_pass` (scale 1, no center)."""
    return [] if residual is None else [(plan.view(residual), None, np.ones(plan.channels))]


def relu_backward(dy, y):
    """The gradient through a fused ReLU: ``dy``, and 0 where ``y <= 0``
    (torch's rule: a NaN output passes its gradient). dy, y: same shape
    and dtype, any strides; the result has dy's dtype and memory order."""
    g = np.empty_like(dy)
    np.copyto(g, dy)
    g[np.asarray(y) <= 0] = 0
    return g


def _backward_center(mean, invstd):
    """The shift of the backward passes (see :func:`_centered`)."""
    return _centered(mean, np.abs(mean) * invstd)


@ieee_semantics
def backward_reduce(dy, x, layout: ChannelLayout, mean, invstd) -> GradSums:
    """Per-group float64 ``sum(dy)`` and ``sum(dy * xhat)``, one pass over
    dy and x (any strides, each its own); mean, invstd: (C,) saved
    statistics, used at their own precision. The products are float64
    (``dy * (x - mean)`` of float32 data overflows float32)."""
    C = layout.channels
    if x.size == 0:
        return GradSums(np.zeros(C), np.zeros(C))
    plan = _Plan(x, layout)
    mean64 = np.asarray(mean, dtype=np.float64)
    invstd64 = np.asarray(invstd, dtype=np.float64)
    center = _backward_center(mean64, invstd64)
    sum_dy, sum_dy_xc = _sums_pass(plan, plan.view(dy), None, plan.view(x), center)
    # sum(dy * (x - mean)), from x - center
    sum_dy_xmu = sum_dy_xc if center is not None else sum_dy_xc - mean64 * sum_dy
    return GradSums(sum_dy, sum_dy_xmu * invstd64)


@ieee_semantics
def backward_apply(dy, x, layout: ChannelLayout, mean, invstd, gamma, sums: GradSums, count: int, out=None,
                   frozen: bool = False, grads: GradSums | None = None):
    """``dx`` from :func:`backward_reduce`'s sums (over ``count`` values
    per group), applied as one fused ``dy * a + (x - mean) * b + c`` per
    channel (``coefficients.dx_coefficients``). Returns ``(dx, dgamma,
    dbeta)``: dx like x, in x's memory order (``out`` when given);
    dgamma, dbeta (C,) in the compute dtype."""
    cdt = compute_dtype(x.dtype)
    plan = _Plan(x, layout)
    dx = _result(plan, x, out)
    dgamma, sum_dy = sums.sum_dy_xhat, sums.sum_dy
    if x.size == 0:
        return deliver(dx, out), np.zeros(layout.channels, cdt), np.zeros(layout.channels, cdt)
    mean64 = np.asarray(mean, dtype=np.float64)
    invstd64 = np.asarray(invstd, dtype=np.float64)
    center = _backward_center(mean64, invstd64)
    a, b, c = dx_coefficients(sum_dy, dgamma, count, invstd64, gamma, frozen)
    if center is None:
        c = c - mean64 * b
    _affine_pass(plan, [(plan.view(dy), None, a), (plan.view(x), center, b)], c, False, plan.view(dx), x.dtype)
    grads = sums if grads is None else grads
    return deliver(dx, out), grads.sum_dy_xhat.astype(cdt), grads.sum_dy.astype(cdt)


def backward(dy, x, layout: ChannelLayout, mean, invstd, gamma, out=None):
    """Backward of the training forward (before any activation):
    :func:`backward_reduce` then :func:`backward_apply` over this input's
    count (NumPy gains nothing from fusing them).

    dy, x: same shape and dtype (any strides, each its own); mean, invstd:
    (C,) saved statistics; gamma: (C,) or None; out: None or a checked
    buffer for dx (dy or x itself for an in-place result). Returns ``(dx,
    dgamma, dbeta)`` as :func:`backward_apply`.
    """
    sums = backward_reduce(dy, x, layout, mean, invstd)
    return backward_apply(dy, x, layout, mean, invstd, gamma, sums, layout.count, out)


# the norm family (layer, RMS, group, instance norm): rows of a view
from .numpy_norms import norm_backward, norm_forward  # noqa: E402,F401
