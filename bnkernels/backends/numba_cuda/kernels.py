"""Numba CUDA kernels of the ``numba-cuda`` backend.

Every kernel takes flat contiguous 1-D arrays holding the canonical view
``(outer, C, inner)`` (``gpu/plans.py``); ``acc``, the accumulation type,
is float32 for float16/bfloat16/float32 storage, float64 for float64
(bfloat16: int16 arrays of its bits; every storage access converts through
``vectors.load1``/``load8``/``store1``/``store8``). The streaming
kernels exist per index type (:func:`get_kernels`): uint32 in the hot loops
when the tensor and the steps past its end stay below 2^31
(``bind.index_type``), else uint64. Unsigned indices need no negative-index
wrap; every index expression is cast back to the index type, since Numba
widens integer arithmetic to 64 bits (the cast lets NVVM narrow it).

- ``stats_planes`` / ``stats_rows`` (``inner > 1`` / ``== 1``): per-channel
  Welford statistics on a 2-D grid (channel groups on y, splits on x). A
  thread walks its channel's values by flat address (an add per step, a
  wrap to the next plane), 4 loads in flight, into 4 Welford accumulators
  around the shift ``k0`` (the channel's first value) that share one
  reciprocal of the count per step. Planes of whole 16-byte aligned
  vectors (``inner % 8 == 0``, ``x`` aligned: checked in the kernel) are
  walked vector by vector instead, 8 values per vector (``vectors.load8``:
  1, 2, 4 16-byte loads for float16/32/64), 4 vectors in flight (float64:
  1), each merged as a chunk of statistics around its first value
  (``vectors.chan8``), one division per step, the last vectors after the
  loop. Chan's merge across the thread, the
  warp (shuffles), the block (shared memory) and the grid: the last block
  of a group to arrive (atomic counter after a fence) merges the staged
  partials, finalizes (saved statistics, apply coefficients, running
  statistics) and resets the counter.
- ``bwd_planes`` / ``bwd_rows``: ``sum(dy)``, ``sum(dy * (x - k))`` with
  the same walk (8 loads in flight; whole vectors: 2 of each array), grid
  and merge; the last block writes dgamma, dbeta and the dx coefficients.
- ``apply_*``, ``apply_residual_*``, ``dx_*`` and ``relu_backward``: the
  elementwise kernels (``elementwise.py``), gathered here per ``acc`` and
  index type.
- ``infer_coeffs``: per-channel ``k, scale, shift`` from running statistics.

16-byte accesses (``vectors.py``): ``load8`` / ``store8``, Numba
intrinsics (Python element by element under the simulator). The
reductions' other layouts read single values: a thread's values of one
channel lie a stride apart.

``(x - k) * scale + shift'``, with ``k`` a value of the data type and
``shift'`` absorbing ``mean - k``, keeps float32 exact near the mean
however large it is (``x - k`` is exact by Sterbenz' lemma).
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import numba
from numba import cuda, types

from .elementwise import make_elementwise_kernels, make_relu_backward
from .vectors import VEC, aligned16, chan8, divide64, dot8, fast_divide32, load1, load8, merge8

WARP = 32
MAX_WARPS = 32  # 1024 threads per block at most
FULL_MASK = 0xFFFFFFFF


@cuda.jit(device=True, inline=True)
def welford_combine(n_a, m_a, q_a, n_b, m_b, q_b):
    """Chan's merge of two (count, mean, M2) triples."""
    n = n_a + n_b
    if n == 0:
        return n_a, m_a, q_a
    delta = m_b - m_a
    r = n_b / n
    return n, m_a + delta * r, q_a + q_b + delta * delta * n_a * r


@cuda.jit(device=True, inline=True)
def welford_add(n, m, q, v, one, inv_count):
    """One value into a Welford accumulator (``one``: 1 in the accumulator
    type, so that float32 stays float32), given the reciprocal of the new
    count: the unrolled accumulators of a thread count alike and share one
    division per step."""
    n += one
    d = v - m
    m += d * inv_count
    q += d * (v - m)
    return n, m, q


@cuda.jit(device=True, inline=True)
def sum_combine(a1, b1, c1, a2, b2, c2):
    return a1 + a2, b1 + b2, c1 + c2


@cuda.jit(device=True, inline=True)
def last_to_arrive(counters, g, flag):
    """Count this block's arrival at group ``g`` (after its partials were
    written) and tell every thread whether it was the last block of the
    grid row: then all partials of the group are visible to it.
    ``flag``: a 1-element int32 shared array."""
    cuda.threadfence()  # this block's partials are visible device-wide first
    cuda.syncthreads()
    if cuda.threadIdx.x == 0 and cuda.threadIdx.y == 0:
        flag[0] = cuda.atomic.add(counters, g, 1) == cuda.gridDim.x - 1
    cuda.syncthreads()
    last = flag[0] != 0
    if last:
        cuda.threadfence()
    return last


def _make_block_reduce(combine):
    """Reduce a triple over the ``ty`` lanes of each ``tx`` column of a 2-D
    block: warp shuffles, then shared memory across warps. The result is
    valid in the threads with ``threadIdx.y == 0``. All threads must call it
    (it has barriers); blockDim.x is a power of two <= 32 and the block size
    a multiple of 32."""

    # inline=True: inlined at the Numba IR level, so compiling for a target
    # architecture needs no GPU (a separately compiled device function asks
    # the driver for the current device's compute capability).
    @cuda.jit(device=True, inline=True)
    def block_reduce(a, b, c, sh_a, sh_b, sh_c):
        tx = cuda.threadIdx.x
        width = cuda.blockDim.x
        lin = tx + cuda.threadIdx.y * width
        lane = lin % WARP
        warp = lin // WARP
        nwarps = (width * cuda.blockDim.y) // WARP
        offset = WARP // 2
        while offset >= width:  # lanes lane and lane + offset hold the same channel
            a2 = cuda.shfl_down_sync(FULL_MASK, a, offset)
            b2 = cuda.shfl_down_sync(FULL_MASK, b, offset)
            c2 = cuda.shfl_down_sync(FULL_MASK, c, offset)
            a, b, c = combine(a, b, c, a2, b2, c2)
            offset //= 2
        if lane < width:
            sh_a[warp, lane] = a
            sh_b[warp, lane] = b
            sh_c[warp, lane] = c
        cuda.syncthreads()
        if warp == 0 and lane < width:
            a = sh_a[0, lane]
            b = sh_b[0, lane]
            c = sh_c[0, lane]
            for w in range(1, nwarps):
                a, b, c = combine(a, b, c, sh_a[w, lane], sh_b[w, lane], sh_c[w, lane])
        cuda.syncthreads()  # the shared slots may be reused after this
        return a, b, c

    return block_reduce


welford_block_reduce = _make_block_reduce(welford_combine)
sum_block_reduce = _make_block_reduce(sum_combine)


@functools.cache
def _plane_step(idx, rows):
    """The step of a channel walk in ``idx`` arithmetic (cast as in
    :func:`_tracking`): address ``a`` and plane position ``i`` move on by
    ``da`` and ``si``; past the plane's end they wrap to the next plane of
    the same channel (``wrap = C * inner - inner`` further). ``rows``
    (``inner == 1``): never."""

    @cuda.jit(device=True, inline=True)
    def plane_step(a, i, da, si, inner, wrap):
        a = idx(a + da)
        if not rows:
            i = idx(i + si)
            if i >= inner:
                i = idx(i - inner)
                a = idx(a + wrap)
        return a, i

    return plane_step


@cuda.jit(device=True, inline=True)
def walk_start(outer, C, inner, c):
    """Where this thread starts walking the values of channel ``c``, and its
    step: values j0, j0 + S, ... of the channel's (outer, inner) plane with
    S = gridDim.x * blockDim.y, as flat address ``a`` and plane position
    ``i``, stepping by ``da`` and ``si`` (and a wrap, see :func:`_plane_step`).
    ``a`` is at most the size (then the walk is empty), so that it fits a
    32-bit index whenever the tensor does. int64 results."""
    height = cuda.blockDim.y
    S = numba.int64(cuda.gridDim.x) * height
    j0 = numba.int64(cuda.blockIdx.x) * height + cuda.threadIdx.y
    o, so = j0 // inner, S // inner
    i, si = j0 - o * inner, S - so * inner
    CI = C * inner
    return min((o * C + c) * inner + i, outer * CI), i, so * CI + si, si


@functools.cache
def get_kernels(acc, idx=numba.uint64):
    """The kernel set for accumulation type ``acc`` (numba.float32/float64)
    and index type ``idx``: numba.uint32 when every flat index, plus a grid
    stride, is below 2^32 (``bind.py`` decides), else numba.uint64."""
    stats_planes = _make_stats_kernel(acc, idx, channels_last=False)
    stats_rows = _make_stats_kernel(acc, idx, channels_last=True)
    bwd_planes = _make_backward_kernel(acc, idx, channels_last=False)
    bwd_rows = _make_backward_kernel(acc, idx, channels_last=True)
    planes = make_elementwise_kernels(acc, idx, planes=True)
    rows = make_elementwise_kernels(acc, idx, planes=False)
    return SimpleNamespace(stats_planes=stats_planes, stats_rows=stats_rows, apply_planes=planes.apply,
                           apply_rows=rows.apply, apply_residual_planes=planes.apply_residual,
                           apply_residual_rows=rows.apply_residual, infer_coeffs=_make_infer_coeffs_kernel(acc),
                           bwd_planes=bwd_planes, bwd_rows=bwd_rows, dx_planes=planes.dx, dx_rows=rows.dx,
                           relu_backward=make_relu_backward(acc, idx))


def _make_stats_kernel(acc, idx, channels_last):
    plane_step = _plane_step(idx, channels_last)
    four = acc != numba.float64  # vectors in flight per step: 4 (float64: 1, four 16-byte loads)
    divide = fast_divide32 if acc == numba.float32 else divide64

    @cuda.jit
    def stats(x,  # (outer * C * inner,) input, any float dtype
              outer, C, inner,  # int64: the canonical view
              inv_n, unbias, eps, factor,  # float64: 1/n, n/(n-1), eps, momentum factor
              has_gamma, has_beta, update_running,  # int32 flags
              gamma, beta,  # (C,) or (1,) dummies when absent
              running_mean, running_var,  # (C,) updated in place if update_running, else (1,)
              k_out, scale_out, shift_out,  # (C,) acc: apply coefficients
              mean_out, invstd_out,  # (C,) acc: saved statistics
              dmean_out, m2_out,  # (C,) acc: mean - k and M2 (for channel_stats)
              stage_n, stage_m, stage_q,  # (C, gridDim.x) acc: per-block partials
              counters):  # (groups,) int32, zero between launches
        sh_a = cuda.shared.array((MAX_WARPS, WARP), acc)
        sh_b = cuda.shared.array((MAX_WARPS, WARP), acc)
        sh_c = cuda.shared.array((MAX_WARPS, WARP), acc)
        sh_last = cuda.shared.array(1, numba.int32)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        width = cuda.blockDim.x
        bx = cuda.blockIdx.x
        zero = acc(0)
        one = acc(1)
        eight = acc(VEC)
        eighth = acc(1 / VEC)
        groups = (C + width - 1) // width
        # The hot loop walks flat addresses in idx arithmetic: a value is
        # in the tensor exactly when its address is below the size.
        total = idx(outer * C * inner)
        inner_i = idx(inner)
        wrap = idx(C * inner - inner)
        for g in range(cuda.blockIdx.y, groups, cuda.gridDim.y):
            c = numba.int64(g) * width + tx
            active = c < C
            n0 = m0 = q0 = zero
            n1 = m1 = q1 = zero
            n2 = m2 = q2 = zero
            n3 = m3 = q3 = zero
            k0 = zero
            if active:
                k0 = load1(x, idx(c * inner))  # shift: the channel's first value
                if not channels_last and inner % VEC == 0 and aligned16(x, x):
                    # whole 16-byte aligned vectors of VEC values per plane:
                    # the same walk over vectors, each merged as a chunk;
                    # 4 in flight (float64: 1, four 16-byte loads), all valid
                    # in the loop (no branches), the fewer after it
                    # straight-line
                    a_start, i_start, da_, si_ = walk_start(outer, C, inner // VEC, c)
                    a, i, da, si = idx(a_start), idx(i_start), idx(da_), idx(si_)
                    total_v = idx(total // idx(VEC))
                    inner_v = idx(inner // VEC)
                    wrap_v = idx(wrap // idx(VEC))
                    while True:
                        a1, i1 = plane_step(a, i, da, si, inner_v, wrap_v)
                        a2, i2 = plane_step(a1, i1, da, si, inner_v, wrap_v)
                        a3, i3 = plane_step(a2, i2, da, si, inner_v, wrap_v)
                        last, i_last = (a3, i3) if four else (a, i)
                        if last >= total_v:
                            break
                        u0 = load8(x, a)
                        if four:
                            u1, u2, u3 = load8(x, a1), load8(x, a2), load8(x, a3)
                        nn = n0 + eight
                        w = divide(eight, nn)  # the one division of the step
                        t = n0 * w
                        m0, q0 = chan8(m0, q0, u0, k0, w, t, eighth, zero)
                        if four:
                            m1, q1 = chan8(m1, q1, u1, k0, w, t, eighth, zero)
                            m2, q2 = chan8(m2, q2, u2, k0, w, t, eighth, zero)
                            m3, q3 = chan8(m3, q3, u3, k0, w, t, eighth, zero)
                        n0 = nn
                        if four:
                            n1 = n2 = n3 = nn
                        a, i = plane_step(last, i_last, da, si, inner_v, wrap_v)
                    if four:
                        if a < total_v:
                            n0, m0, q0 = merge8(n0, m0, q0, load8(x, a), k0, eight, eighth, zero)
                        if a1 < total_v:
                            n1, m1, q1 = merge8(n1, m1, q1, load8(x, a1), k0, eight, eighth, zero)
                        if a2 < total_v:
                            n2, m2, q2 = merge8(n2, m2, q2, load8(x, a2), k0, eight, eighth, zero)
                    a = total  # no single values
                else:
                    a_start, i_start, da_, si_ = walk_start(outer, C, inner, c)
                    a, i, da, si = idx(a_start), idx(i_start), idx(da_), idx(si_)
                while a < total:
                    a1, i1 = plane_step(a, i, da, si, inner_i, wrap)
                    a2, i2 = plane_step(a1, i1, da, si, inner_i, wrap)
                    a3, i3 = plane_step(a2, i2, da, si, inner_i, wrap)
                    # 4 loads in flight before the arithmetic
                    v0 = load1(x, a) - k0
                    v1 = load1(x, a1) - k0 if a1 < total else zero
                    v2 = load1(x, a2) - k0 if a2 < total else zero
                    v3 = load1(x, a3) - k0 if a3 < total else zero
                    r = one / (n0 + one)  # the 4 count alike until the last step
                    n0, m0, q0 = welford_add(n0, m0, q0, v0, one, r)
                    if a1 < total:
                        n1, m1, q1 = welford_add(n1, m1, q1, v1, one, r)
                    if a2 < total:
                        n2, m2, q2 = welford_add(n2, m2, q2, v2, one, r)
                    if a3 < total:
                        n3, m3, q3 = welford_add(n3, m3, q3, v3, one, r)
                    a, i = plane_step(a3, i3, da, si, inner_i, wrap)
                # chunks' M2 are unclamped (S2 - S1^2/8 may round below 0 by
                # a few ulps of S2 when they hold equal values): clamped once
                # (NaN stays NaN)
                q0 = zero if q0 < zero else q0
                q1 = zero if q1 < zero else q1
                q2 = zero if q2 < zero else q2
                q3 = zero if q3 < zero else q3
                n0, m0, q0 = welford_combine(n0, m0, q0, n1, m1, q1)
                n2, m2, q2 = welford_combine(n2, m2, q2, n3, m3, q3)
                n0, m0, q0 = welford_combine(n0, m0, q0, n2, m2, q2)
            n0, m0, q0 = welford_block_reduce(n0, m0, q0, sh_a, sh_b, sh_c)
            if ty == 0 and active:
                stage_n[c, bx] = n0
                stage_m[c, bx] = m0
                stage_q[c, bx] = q0
            if last_to_arrive(counters, g, sh_last):
                n0 = m0 = q0 = zero
                if active:
                    for b in range(ty, cuda.gridDim.x, cuda.blockDim.y):
                        n0, m0, q0 = welford_combine(n0, m0, q0, stage_n[c, b], stage_m[c, b], stage_q[c, b])
                n0, m0, q0 = welford_block_reduce(n0, m0, q0, sh_a, sh_b, sh_c)
                if ty == 0 and active:
                    # finalize channel c (m0: mean of x - k0, q0: M2)
                    var = q0 * inv_n
                    invstd = acc(1.0 / (var + eps) ** 0.5)
                    gm = acc(gamma[c]) if has_gamma else acc(1)
                    bt = acc(beta[c]) if has_beta else zero
                    scale = gm * invstd
                    mean = k0 + m0
                    k_out[c] = k0
                    scale_out[c] = scale
                    shift_out[c] = bt - m0 * scale
                    mean_out[c] = mean
                    invstd_out[c] = invstd
                    dmean_out[c] = m0
                    m2_out[c] = q0
                    if update_running:
                        running_mean[c] = (1.0 - factor) * running_mean[c] + factor * mean
                        running_var[c] = (1.0 - factor) * running_var[c] + factor * (var * unbias)
                if tx == 0 and ty == 0:
                    counters[g] = 0  # ready for the next launch
            cuda.syncthreads()  # sh_last is reused by the next group

    return stats


def _make_backward_kernel(acc, idx, channels_last):
    plane_step = _plane_step(idx, channels_last)

    @cuda.jit
    def bwd(dy, x,  # (outer * C * inner,) same dtype
            outer, C, inner,  # int64: the canonical view
            inv_n,  # float64: 1/n
            has_gamma,  # int32 flag
            gamma,  # (C,) or (1,) dummy
            saved_mean, saved_invstd,  # (C,) from the forward
            dgamma, dbeta,  # (C,) acc outputs
            k_out, a_out, b_out, c_out,  # (C,) acc: dx = dy * a + (x - k) * b + c
            stage_s, stage_t,  # (C, gridDim.x) acc partial sums
            counters):  # (groups,) int32, zero between launches
        sh_a = cuda.shared.array((MAX_WARPS, WARP), acc)
        sh_b = cuda.shared.array((MAX_WARPS, WARP), acc)
        sh_c = cuda.shared.array((MAX_WARPS, WARP), acc)
        sh_last = cuda.shared.array(1, numba.int32)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        width = cuda.blockDim.x
        bx = cuda.blockIdx.x
        zero = acc(0)
        groups = (C + width - 1) // width
        total = idx(outer * C * inner)  # as in ``stats``
        inner_i = idx(inner)
        wrap = idx(C * inner - inner)
        for g in range(cuda.blockIdx.y, groups, cuda.gridDim.y):
            c = numba.int64(g) * width + tx
            active = c < C
            s0 = t0 = s1 = t1 = s2 = t2 = s3 = t3 = zero
            k = zero
            if active:
                k = acc(saved_mean[c])
                if not channels_last and inner % VEC == 0 and aligned16(x, dy):
                    # whole 16-byte aligned vectors, as in ``stats``: 2 of
                    # each array in flight (1, 2, 4 16-byte loads each)
                    a_start, i_start, da_, si_ = walk_start(outer, C, inner // VEC, c)
                    a, i, da, si = idx(a_start), idx(i_start), idx(da_), idx(si_)
                    total_v = idx(total // idx(VEC))
                    inner_v = idx(inner // VEC)
                    wrap_v = idx(wrap // idx(VEC))
                    while a < total_v:
                        a1, i1 = plane_step(a, i, da, si, inner_v, wrap_v)
                        ok1 = a1 < total_v
                        b1 = a1 if ok1 else a
                        h0, u0, h1, u1 = load8(dy, a), load8(x, a), load8(dy, b1), load8(x, b1)
                        s0, t0 = dot8(h0, u0, k, s0, t0)
                        if ok1:
                            s1, t1 = dot8(h1, u1, k, s1, t1)
                        a, i = plane_step(a1, i1, da, si, inner_v, wrap_v)
                    a = total  # no single values
                else:
                    a_start, i_start, da_, si_ = walk_start(outer, C, inner, c)
                    a, i, da, si = idx(a_start), idx(i_start), idx(da_), idx(si_)
                while a < total:  # unrolled by 4: 8 loads in flight
                    a1, i1 = plane_step(a, i, da, si, inner_i, wrap)
                    a2, i2 = plane_step(a1, i1, da, si, inner_i, wrap)
                    a3, i3 = plane_step(a2, i2, da, si, inner_i, wrap)
                    g0, d0 = load1(dy, a), load1(x, a) - k
                    g1, d1 = (load1(dy, a1), load1(x, a1) - k) if a1 < total else (zero, zero)
                    g2, d2 = (load1(dy, a2), load1(x, a2) - k) if a2 < total else (zero, zero)
                    g3, d3 = (load1(dy, a3), load1(x, a3) - k) if a3 < total else (zero, zero)
                    s0 += g0
                    t0 += g0 * d0
                    s1 += g1
                    t1 += g1 * d1
                    s2 += g2
                    t2 += g2 * d2
                    s3 += g3
                    t3 += g3 * d3
                    a, i = plane_step(a3, i3, da, si, inner_i, wrap)
                s0 += s1 + (s2 + s3)
                t0 += t1 + (t2 + t3)
            s0, t0, u0 = sum_block_reduce(s0, t0, zero, sh_a, sh_b, sh_c)
            if ty == 0 and active:
                stage_s[c, bx] = s0
                stage_t[c, bx] = t0
            if last_to_arrive(counters, g, sh_last):
                s0 = t0 = zero
                if active:
                    for b in range(ty, cuda.gridDim.x, cuda.blockDim.y):
                        s0 += stage_s[c, b]
                        t0 += stage_t[c, b]
                s0, t0, u0 = sum_block_reduce(s0, t0, zero, sh_a, sh_b, sh_c)
                if ty == 0 and active:
                    invstd = acc(saved_invstd[c])
                    delta = acc(saved_mean[c] - k)  # saved mean beyond acc precision
                    sum_dy_xhat = (t0 - delta * s0) * invstd
                    dgamma[c] = sum_dy_xhat
                    dbeta[c] = s0
                    gm = acc(gamma[c]) if has_gamma else acc(1)
                    a = gm * invstd
                    b = -a * invstd * sum_dy_xhat * inv_n
                    k_out[c] = k
                    a_out[c] = a
                    b_out[c] = b
                    c_out[c] = -a * s0 * inv_n - b * delta
                if tx == 0 and ty == 0:
                    counters[g] = 0
            cuda.syncthreads()

    return bwd


@functools.cache
def _make_infer_coeffs_kernel(acc):
    @cuda.jit
    def infer_coeffs(running_mean, running_var,  # (C,) float32/float64
                     eps,  # float64
                     has_gamma, has_beta,  # int32 flags
                     gamma, beta,  # (C,) or (1,) dummies
                     k_out, scale_out, shift_out,  # (C,) acc apply coefficients
                     invstd_out):  # (C,) acc
        c = cuda.grid(1)
        if c < running_mean.size:
            m = running_mean[c]
            invstd = 1.0 / (running_var[c] + eps) ** 0.5
            gm = gamma[c] if has_gamma else 1.0
            bt = beta[c] if has_beta else 0.0
            scale = gm * invstd
            k = acc(m)
            k_out[c] = k
            scale_out[c] = scale
            shift_out[c] = bt - (m - k) * scale
            invstd_out[c] = invstd

    return infer_coeffs


def compile_targets():
    """Every kernel specialization the backend launches, for ahead-of-time
    compile checks: ``(kernel name, storage dtype name, python function,
    argument types)``; bfloat16 storage is int16 arrays of its bits
    (``infer_coeffs`` reads no storage: its float32 specialization serves).

    Parameters (gamma, beta, running statistics) may be of any float dtype
    at run time; the checks use float32 for them (float64 with float64
    storage), which is what layers hold.
    """
    def arr(t, ndim=1):
        return types.Array(t, ndim, "C")
    i64, f64, i32 = types.int64, types.float64, types.int32
    out = []
    for storage, acc, label in ((types.float16, numba.float32, "float16"), (types.float32, numba.float32, "float32"),
                                (types.float64, numba.float64, "float64"), (types.int16, numba.float32, "bfloat16")):
        kernels = {bits: get_kernels(acc, numba.uint32 if bits == 32 else numba.uint64) for bits in (64, 32)}
        param = arr(f64 if storage == types.float64 else types.float32)
        a, s = arr(acc), arr(storage)
        stats_args = (s, i64, i64, i64, f64, f64, f64, f64, i64, i64, i64, param, param, param, param,
                      *[a] * 7, *[arr(acc, 2)] * 3, arr(i32))
        bwd_args = (s, s, i64, i64, i64, f64, i64, param, a, a, *[a] * 6, *[arr(acc, 2)] * 2, arr(i32))
        apply_args, dx_args = (s, s, i64, i64, a, a, a, i64), (s, s, s, i64, i64, a, a, a, a)
        residual_args = (s, s, s, i64, i64, a, a, a, i64)
        for kname, args in (
                ("stats_planes", stats_args), ("stats_rows", stats_args),
                ("apply_planes", apply_args), ("apply_rows", apply_args),
                ("apply_residual_planes", residual_args), ("apply_residual_rows", residual_args),
                ("infer_coeffs", (param, param, f64, i64, i64, param, param, a, a, a, a)),
                ("bwd_planes", bwd_args), ("bwd_rows", bwd_args), ("dx_planes", dx_args), ("dx_rows", dx_args),
                ("relu_backward", (s, s, s))):
            if kname == "infer_coeffs" and label == "bfloat16":
                continue
            for bits, k in kernels.items():
                kernel = getattr(k, kname)
                if bits == 32 and kernel is getattr(kernels[64], kname):
                    continue  # no index-width variants
                out.append((kname + ("_i32" if bits == 32 else ""), label, kernel.py_func, args))
    return out
