"""Numba CUDA kernels of the ``numba-cuda`` backend.

All kernels take the input as a flat contiguous 1-D array holding the
canonical view ``(outer, C, inner)`` (see ``launch.py``); indices are int64,
so tensors over 2^31 elements are safe. ``acc`` is the accumulation type:
float32 for float16/float32 storage, float64 for float64.

Kernels (built per ``acc`` by :func:`get_kernels`):

- ``stats_planes`` / ``stats_rows``: per-channel Welford statistics for
  ``inner > 1`` and ``inner == 1`` data, on a 2-D grid (channel groups on y,
  splits on x). Each thread runs 4 independent Welford accumulators around
  the shift ``k0`` (the channel's first value), merged by Chan's formula
  across the thread, the warp (shuffles), the block (shared memory) and the
  grid: blocks write partials to a staging buffer and the last block of a
  group (atomic counter after a memory fence) merges them and finalizes:
  saved mean/invstd, the apply coefficients and the running statistics.
  It then resets the counter for the next launch.
- ``apply``: ``y = (x - k) * scale + shift`` [ReLU], one pass, layout
  agnostic (the channel of each flat index is tracked incrementally, with no
  division in the loop), 4 loads in flight per thread. Loads are scalar:
  Numba emits no vector (16-byte) loads, even through complex views.
- ``infer_coeffs``: per-channel ``k, scale, shift`` from running statistics.
- ``bwd_planes`` / ``bwd_rows``: ``sum(dy)`` and ``sum(dy * (x - k))`` per
  channel with the same grid and last-block merge; the last block writes
  dgamma, dbeta and the dx coefficients.
- ``dx``: ``dx = dy * a + (x - k) * b + c`` per channel, one pass.

Applying as ``(x - k) * scale + shift'`` with ``k`` a value of the data
type and ``shift'`` absorbing ``mean - k`` keeps float32 exact near the mean
however large it is (``x - k`` is exact by Sterbenz' lemma).
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import numba
from numba import cuda

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
def step(o, i, so, si, inner):
    """Advance position (o, i) of the (outer, inner) plane by (so, si)."""
    i += si
    o += so
    if i >= inner:
        i -= inner
        o += 1
    return o, i


@cuda.jit(device=True, inline=True)
def advance(i, c, ti, tc, inner, C):
    """Channel tracking of a grid-stride loop: the position ``i`` within a
    plane and the channel ``c`` of flat index ``p + T``, given those of ``p``
    and the decomposition ``(ti, tc)`` of the stride ``T``. No division."""
    i += ti
    c += tc
    if i >= inner:
        i -= inner
        c += 1
    if c >= C:
        c -= C
    return i, c


@cuda.jit(device=True, inline=True)
def stride_parts(p, T, C, inner):
    """(i, c) of flat index p and (ti, tc) of the stride T."""
    q = p // inner
    tq = T // inner
    return p - q * inner, q % C, T - tq * inner, tq % C


@cuda.jit(device=True, inline=True)
def walk(inner):
    """Where this thread starts walking the values of its channel, and its
    stride, in (o, i) coordinates of the (outer, inner) plane: values
    j0, j0 + S, ... with S = gridDim.x * blockDim.y. Returns (o, i, so, si)."""
    height = cuda.blockDim.y
    S = numba.int64(cuda.gridDim.x) * height
    j0 = numba.int64(cuda.blockIdx.x) * height + cuda.threadIdx.y
    o = j0 // inner
    so = S // inner
    return o, j0 - o * inner, so, S - so * inner


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
def get_kernels(acc):
    """The kernel set for accumulation type ``acc`` (numba.float32/float64)."""
    stats_planes = _make_stats_kernel(acc, channels_last=False)
    stats_rows = _make_stats_kernel(acc, channels_last=True)
    bwd_planes = _make_backward_kernel(acc, channels_last=False)
    bwd_rows = _make_backward_kernel(acc, channels_last=True)
    return SimpleNamespace(stats_planes=stats_planes, stats_rows=stats_rows, apply=_make_apply_kernel(acc),
                           infer_coeffs=_make_infer_coeffs_kernel(acc), bwd_planes=bwd_planes,
                           bwd_rows=bwd_rows, dx=_make_dx_kernel(acc))


def _make_stats_kernel(acc, channels_last):
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
        groups = (C + width - 1) // width
        o_start, i_start, so, si = walk(inner)
        for g in range(cuda.blockIdx.y, groups, cuda.gridDim.y):
            c = numba.int64(g) * width + tx
            active = c < C
            n0 = m0 = q0 = zero
            n1 = m1 = q1 = zero
            n2 = m2 = q2 = zero
            n3 = m3 = q3 = zero
            k0 = zero
            if active:
                k0 = acc(x[c * inner])  # shift: the channel's first value
                o, i = o_start, i_start
                while o < outer:
                    base = o * C + c
                    v0 = acc(x[base if channels_last else base * inner + i]) - k0
                    o1, i1 = step(o, i, so, si, inner)
                    o2, i2 = step(o1, i1, so, si, inner)
                    o3, i3 = step(o2, i2, so, si, inner)
                    v1 = v2 = v3 = zero
                    if o1 < outer:
                        base = o1 * C + c
                        v1 = acc(x[base if channels_last else base * inner + i1]) - k0
                    if o2 < outer:
                        base = o2 * C + c
                        v2 = acc(x[base if channels_last else base * inner + i2]) - k0
                    if o3 < outer:
                        base = o3 * C + c
                        v3 = acc(x[base if channels_last else base * inner + i3]) - k0
                    r = one / (n0 + one)  # the 4 count alike until the last step
                    n0, m0, q0 = welford_add(n0, m0, q0, v0, one, r)
                    if o1 < outer:
                        n1, m1, q1 = welford_add(n1, m1, q1, v1, one, r)
                    if o2 < outer:
                        n2, m2, q2 = welford_add(n2, m2, q2, v2, one, r)
                    if o3 < outer:
                        n3, m3, q3 = welford_add(n3, m3, q3, v3, one, r)
                    o, i = step(o3, i3, so, si, inner)
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


def _make_backward_kernel(acc, channels_last):
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
        o_start, i_start, so, si = walk(inner)
        for g in range(cuda.blockIdx.y, groups, cuda.gridDim.y):
            c = numba.int64(g) * width + tx
            active = c < C
            s0 = t0 = s1 = t1 = zero
            k = zero
            if active:
                k = acc(saved_mean[c])
                o, i = o_start, i_start
                while o < outer:
                    base = o * C + c
                    p0 = base if channels_last else base * inner + i
                    o1, i1 = step(o, i, so, si, inner)
                    g0 = acc(dy[p0])
                    d0 = acc(x[p0]) - k
                    g1 = d1 = zero
                    if o1 < outer:
                        base = o1 * C + c
                        p1 = base if channels_last else base * inner + i1
                        g1 = acc(dy[p1])
                        d1 = acc(x[p1]) - k
                    s0 += g0
                    t0 += g0 * d0
                    s1 += g1
                    t1 += g1 * d1
                    o, i = step(o1, i1, so, si, inner)
                s0 += s1
                t0 += t1
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


def _make_apply_kernel(acc):
    @cuda.jit
    def apply(x, y,  # (outer * C * inner,) input and output, same dtype
              C, inner,  # int64
              k, scale, shift,  # (C,) acc
              relu):  # int flag
        # Grid-stride loop unrolled by 4: all loads are issued before
        # the stores (more bytes in flight per thread); coalesced in every
        # layout, since consecutive threads take consecutive addresses.
        total = x.size
        T = numba.int64(cuda.gridDim.x) * cuda.blockDim.x
        p = numba.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
        i0, c0, ti, tc = stride_parts(p, T, C, inner)
        zero = acc(0)
        while p < total:
            i1, c1 = advance(i0, c0, ti, tc, inner, C)
            i2, c2 = advance(i1, c1, ti, tc, inner, C)
            i3, c3 = advance(i2, c2, ti, tc, inner, C)
            v0 = acc(x[p])
            v1 = v2 = v3 = zero
            if p + T < total:
                v1 = acc(x[p + T])
            if p + 2 * T < total:
                v2 = acc(x[p + 2 * T])
            if p + 3 * T < total:
                v3 = acc(x[p + 3 * T])
            v0 = (v0 - k[c0]) * scale[c0] + shift[c0]
            v1 = (v1 - k[c1]) * scale[c1] + shift[c1]
            v2 = (v2 - k[c2]) * scale[c2] + shift[c2]
            v3 = (v3 - k[c3]) * scale[c3] + shift[c3]
            if relu:  # NaN < 0 is False: NaN propagates
                if v0 < zero:
                    v0 = zero
                if v1 < zero:
                    v1 = zero
                if v2 < zero:
                    v2 = zero
                if v3 < zero:
                    v3 = zero
            y[p] = v0
            if p + T < total:
                y[p + T] = v1
            if p + 2 * T < total:
                y[p + 2 * T] = v2
            if p + 3 * T < total:
                y[p + 3 * T] = v3
            p += 4 * T
            i0, c0 = advance(i3, c3, ti, tc, inner, C)

    return apply


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


def _make_dx_kernel(acc):
    @cuda.jit
    def dx(dy, x, out,  # (outer * C * inner,) same dtype
           C, inner,  # int64
           k, a, b, cc):  # (C,) acc: out = dy * a + (x - k) * b + cc
        # Unrolled grid-stride loop as in ``apply``.
        total = x.size
        T = numba.int64(cuda.gridDim.x) * cuda.blockDim.x
        p = numba.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
        i0, c0, ti, tc = stride_parts(p, T, C, inner)
        zero = acc(0)
        while p < total:
            i1, c1 = advance(i0, c0, ti, tc, inner, C)
            g0 = acc(dy[p])
            v0 = acc(x[p])
            g1 = v1 = zero
            if p + T < total:
                g1 = acc(dy[p + T])
                v1 = acc(x[p + T])
            out[p] = g0 * a[c0] + (v0 - k[c0]) * b[c0] + cc[c0]
            if p + T < total:
                out[p + T] = g1 * a[c1] + (v1 - k[c1]) * b[c1] + cc[c1]
            p += 2 * T
            i0, c0 = advance(i1, c1, ti, tc, inner, C)

    return dx


def compile_targets():
    """Every kernel specialization the backend launches, for ahead-of-time
    compile checks: ``(kernel name, storage dtype name, python function,
    argument types)``.

    Parameters (gamma, beta, running statistics) may be of any float dtype
    at run time; the checks use float32 for them (float64 with float64
    storage), which is what layers hold.
    """
    from numba import types

    def arr(t, ndim=1):
        return types.Array(t, ndim, "C")

    i64, f64, i32 = types.int64, types.float64, types.int32
    out = []
    for storage, acc in ((types.float16, numba.float32), (types.float32, numba.float32),
                         (types.float64, numba.float64)):
        k = get_kernels(acc)
        param = arr(f64 if storage == types.float64 else types.float32)
        a, s = arr(acc), arr(storage)
        stats_args = (s, i64, i64, i64, f64, f64, f64, f64, i64, i64, i64, param, param, param, param,
                      *[a] * 7, *[arr(acc, 2)] * 3, arr(i32))
        bwd_args = (s, s, i64, i64, i64, f64, i64, param, a, a, *[a] * 6, *[arr(acc, 2)] * 2, arr(i32))
        for kname, kernel, args in (
                ("stats_planes", k.stats_planes, stats_args),
                ("stats_rows", k.stats_rows, stats_args),
                ("apply", k.apply, (s, s, i64, i64, a, a, a, i64)),
                ("infer_coeffs", k.infer_coeffs, (param, param, f64, i64, i64, param, param, a, a, a, a)),
                ("bwd_planes", k.bwd_planes, bwd_args),
                ("bwd_rows", k.bwd_rows, bwd_args),
                ("dx", k.dx, (s, s, s, i64, i64, a, a, a, a))):
            out.append((kname, str(storage), kernel.py_func, args))
    return out
