"""The elementwise kernels of the ``numba-cuda`` backend: ``apply``
(``y = (x - k) * scale + shift`` [ReLU]), ``apply_residual`` (the same plus
a residual array read alongside x, before the ReLU), ``dx`` (``dy * a +
(x - k) * b + c``), one shared loop with a compile-time switch, and
``relu_backward`` (the gradient through a fused ReLU). ``kernels.py``
gathers them into its kernel sets (:func:`kernels.get_kernels`).

Each is one pass: with 16-byte aligned arrays, vectors of ``VEC = 8``
elements by 16-byte loads and stores (``vectors.load8``/``store8``, the
residual's too). ``_planes`` (``inner >= VEC``): a vector spans at most two
channels, whose coefficients are loaded once per vector and chosen by
selects; ``_rows``: each element's channel is tracked. The rest is a
grid-stride loop over single elements (``vectors.load1``/``store1``).
Channels are tracked without division. Storage is any float dtype or
bfloat16 bits (int16: ``vectors``' conversions); arithmetic in ``acc``.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import numba
from numba import cuda

from .vectors import VEC, aligned16, load1, load8, store1, store8


@functools.cache
def _tracking(idx):
    """Channel tracking in ``idx`` arithmetic (results and constants cast to
    ``idx``: Numba types uint64 with int64 as float64): ``(start, advance,
    next_element)``. ``start(p, T, C, inner)`` (int64): plane position
    ``i`` and channel ``c`` of flat index ``p``, and the parts ``(ti, tc)``
    of the stride ``T``; ``advance``: (i, c) of ``p + T``; ``next_element``:
    of ``p + 1``. No division."""
    one = idx(1)

    @cuda.jit(device=True, inline=True)
    def start(p, T, C, inner):
        q = p // inner
        tq = T // inner
        return idx(p - q * inner), idx(q % C), idx(T - tq * inner), idx(tq % C)

    @cuda.jit(device=True, inline=True)
    def advance(i, c, ti, tc, inner, C):
        i = idx(i + ti)
        c = idx(c + tc)
        if i >= inner:
            i = idx(i - inner)
            c = idx(c + one)
        if c >= C:
            c = idx(c - C)
        return i, c

    @cuda.jit(device=True, inline=True)
    def next_element(i, c, inner, C):
        i = idx(i + one)
        if i >= inner:
            i = idx(0)
            c = idx(c + one)
            if c >= C:
                c = idx(0)
        return i, c

    return start, advance, next_element


#: What the shared loop of :func:`make_elementwise_kernels` computes
#: (a compile-time switch): ``y = (x - k) * scale + shift`` [ReLU], the
#: same plus a residual read alongside x before the ReLU, or dx.
APPLY, RESIDUAL, DX = "apply", "residual", "dx"


@functools.cache
def make_elementwise_kernels(acc, idx, planes):
    """``apply``, ``apply_residual`` and ``dx`` for ``acc`` and index type
    ``idx``, one loop for the three (:data:`APPLY`...). ``planes``:
    ``inner >= VEC``, so that the ``VEC`` elements of one vector lie in at
    most two channels (coefficients loaded once per vector for each, chosen
    by selects); else each element's channel is tracked (``inner < VEC``,
    e.g. channels-last data, ``inner == 1``)."""
    track_start, advance, next_element = _tracking(idx)

    def make(mode):
        two_inputs = mode != APPLY  # a second array read alongside x: dy (dx) or the residual
        is_dx, add_residual = mode == DX, mode == RESIDUAL  # (booleans: constants Numba folds)

        @cuda.jit(device=True, inline=True)
        def op(g, v, kk, p1, p2, p3, flag):
            if is_dx:  # dx = dy * a + (x - k) * b + c
                return g * p1 + (v - kk) * p2 + p3
            v = (v - kk) * p1 + p2  # y = (x - k) * scale + shift
            if add_residual:
                v += g  # + the residual, in acc: one rounding, at the store
            if flag and v < acc(0):  # ReLU; NaN < 0 is False: NaN propagates
                v = acc(0)
            return v

        @cuda.jit(device=True, inline=True)
        def tracked(g, v, e, d, k, p1, p2, p3, flag, inner, C):
            """``op`` on the element at (e, d) and the position of the next."""
            y = op(g, v, k[d], p1[d], p2[d], p3[d], flag)
            e, d = next_element(e, d, inner, C)
            return y, e, d

        @cuda.jit(device=True, inline=True)
        def loop(dy, x, out, C, inner, k, p1, p2, p3, flag):
            total = idx(x.size)
            T = idx(cuda.gridDim.x * cuda.blockDim.x)
            tid = idx(cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x)
            C_i, inner_i = idx(C), idx(inner)
            zero = acc(0)
            done = idx(0)
            if aligned16(x, out) and (not two_inputs or aligned16(dy, dy)):
                # Vector v: elements VEC * v ... VEC * v + VEC - 1, in one or
                # more 16-byte accesses, coalesced across the warp.
                nvec = idx(total // idx(VEC))
                i, c, ti, tc = track_start(numba.int64(tid) * VEC, numba.int64(T) * VEC, C, inner)
                # element j of a vector from plane position i is in the
                # vector's first channel when i < inner - j
                lim1 = lim2 = lim3 = lim4 = lim5 = lim6 = lim7 = idx(0)
                if planes:
                    lim1, lim2, lim3, lim4 = idx(inner - 1), idx(inner - 2), idx(inner - 3), idx(inner - 4)
                    lim5, lim6, lim7 = idx(inner - 5), idx(inner - 6), idx(inner - 7)
                v = tid
                while v < nvec:
                    g0 = g1 = g2 = g3 = g4 = g5 = g6 = g7 = zero
                    if two_inputs:
                        g0, g1, g2, g3, g4, g5, g6, g7 = load8(dy, v)
                    x0, x1, x2, x3, x4, x5, x6, x7 = load8(x, v)
                    if planes:
                        c1 = idx(c + idx(1)) if c + idx(1) < C_i else idx(0)
                        ka, pa1, pa2, pa3 = k[c], p1[c], p2[c], p3[c]
                        kb, pb1, pb2, pb3 = k[c1], p1[c1], p2[c1], p3[c1]
                        y0 = op(g0, x0, ka, pa1, pa2, pa3, flag)
                        y1 = op(g1, x1, ka, pa1, pa2, pa3, flag) if i < lim1 else op(g1, x1, kb, pb1, pb2, pb3, flag)
                        y2 = op(g2, x2, ka, pa1, pa2, pa3, flag) if i < lim2 else op(g2, x2, kb, pb1, pb2, pb3, flag)
                        y3 = op(g3, x3, ka, pa1, pa2, pa3, flag) if i < lim3 else op(g3, x3, kb, pb1, pb2, pb3, flag)
                        y4 = op(g4, x4, ka, pa1, pa2, pa3, flag) if i < lim4 else op(g4, x4, kb, pb1, pb2, pb3, flag)
                        y5 = op(g5, x5, ka, pa1, pa2, pa3, flag) if i < lim5 else op(g5, x5, kb, pb1, pb2, pb3, flag)
                        y6 = op(g6, x6, ka, pa1, pa2, pa3, flag) if i < lim6 else op(g6, x6, kb, pb1, pb2, pb3, flag)
                        y7 = op(g7, x7, ka, pa1, pa2, pa3, flag) if i < lim7 else op(g7, x7, kb, pb1, pb2, pb3, flag)
                    else:
                        y0, e, d = tracked(g0, x0, i, c, k, p1, p2, p3, flag, inner_i, C_i)
                        y1, e, d = tracked(g1, x1, e, d, k, p1, p2, p3, flag, inner_i, C_i)
                        y2, e, d = tracked(g2, x2, e, d, k, p1, p2, p3, flag, inner_i, C_i)
                        y3, e, d = tracked(g3, x3, e, d, k, p1, p2, p3, flag, inner_i, C_i)
                        y4, e, d = tracked(g4, x4, e, d, k, p1, p2, p3, flag, inner_i, C_i)
                        y5, e, d = tracked(g5, x5, e, d, k, p1, p2, p3, flag, inner_i, C_i)
                        y6, e, d = tracked(g6, x6, e, d, k, p1, p2, p3, flag, inner_i, C_i)
                        y7, e, d = tracked(g7, x7, e, d, k, p1, p2, p3, flag, inner_i, C_i)
                    store8(out, v, y0, y1, y2, y3, y4, y5, y6, y7)
                    v = idx(v + T)
                    i, c = advance(i, c, ti, tc, inner_i, C_i)
                done = idx(nvec * idx(VEC))
            # The rest (all of it when a pointer is not 16-byte aligned): a
            # grid-stride loop over single elements.
            p = idx(done + tid)
            i, c, ti, tc = track_start(numba.int64(p), numba.int64(T), C, inner)
            while p < total:
                g = load1(dy, p) if two_inputs else zero
                store1(out, p, op(g, load1(x, p), k[c], p1[c], p2[c], p3[c], flag))
                p = idx(p + T)
                i, c = advance(i, c, ti, tc, inner_i, C_i)

        return loop

    apply_loop, residual_loop, dx_loop = make(APPLY), make(RESIDUAL), make(DX)

    @cuda.jit
    def apply(x, y,  # (outer * C * inner,) input and output, same dtype
              C, inner,  # int64
              k, scale, shift,  # (C,) acc
              relu):  # int flag
        apply_loop(x, x, y, C, inner, k, scale, shift, shift, relu)

    @cuda.jit
    def apply_residual(x, residual, y,  # (outer * C * inner,) same dtype
                       C, inner,  # int64
                       k, scale, shift,  # (C,) acc
                       relu):  # int flag: y = relu((x - k) * scale + shift + residual)
        residual_loop(residual, x, y, C, inner, k, scale, shift, shift, relu)

    @cuda.jit
    def dx(dy, x, out,  # (outer * C * inner,) same dtype
           C, inner,  # int64
           k, a, b, cc):  # (C,) acc: out = dy * a + (x - k) * b + cc
        dx_loop(dy, x, out, C, inner, k, a, b, cc, 0)

    return SimpleNamespace(apply=apply, apply_residual=apply_residual, dx=dx)


@cuda.jit(device=True, inline=True)
def _relu_pass(d, v, zero):
    """The gradient through a ReLU: ``d``, or 0 where ``v <= 0`` (NaN passes ``d``)."""
    return zero if v <= zero else d


@functools.cache
def make_relu_backward(acc, idx):
    """``g = dy`` where not ``y <= 0``, else 0 (torch's rule), for storage
    computing in ``acc`` and index type ``idx``: 16-byte vectors when the
    three arrays are aligned, the rest element by element. The value of dy
    goes through unchanged (a conversion to acc and back is exact)."""

    @cuda.jit
    def relu_backward(dy, y, g):  # (n,) same dtype
        total = idx(dy.size)
        T = idx(cuda.gridDim.x * cuda.blockDim.x)
        tid = idx(cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x)
        zero = acc(0)
        done = idx(0)
        if aligned16(dy, y) and aligned16(g, g):
            nvec = idx(total // idx(VEC))
            v = tid
            while v < nvec:
                d0, d1, d2, d3, d4, d5, d6, d7 = load8(dy, v)
                y0, y1, y2, y3, y4, y5, y6, y7 = load8(y, v)
                store8(g, v, _relu_pass(d0, y0, zero), _relu_pass(d1, y1, zero), _relu_pass(d2, y2, zero),
                       _relu_pass(d3, y3, zero), _relu_pass(d4, y4, zero), _relu_pass(d5, y5, zero),
                       _relu_pass(d6, y6, zero), _relu_pass(d7, y7, zero))
                v = idx(v + T)
            done = idx(nvec * idx(VEC))
        p = idx(done + tid)
        while p < total:
            store1(g, p, _relu_pass(load1(dy, p), load1(y, p), zero))
            p = idx(p + T)

    return relu_backward
