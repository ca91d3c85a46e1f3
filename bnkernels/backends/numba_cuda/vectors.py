"""16-byte global accesses for the numba-cuda kernels (``kernels.py``) and
the statistics of one loaded vector.

Numba emits scalar loads and stores for array elements (its array model has
no vector view; ``numba.cuda``'s ``float32x4`` etc. are values, its
cache-hint loads ``ldcg``... scalars). ``load8`` / ``store8`` are
intrinsics emitting LLVM ``<4 x i32>`` loads/stores in the global address
space (inline PTX for float16, which NVVM would split in two): elements
``8 v ... 8 v + 7`` in 1, 2 or 4 aligned 16-byte accesses for float16,
float32, float64. A CUDA C++ device function linked with
``cuda.declare_device`` and ``link=`` would be a call per access unless LTO
inlines it. Under the simulator the same functions are Python, element by
element (alignment as on the device: the NumPy arrays' addresses).

``chunk8`` / ``chan8``: the statistics of 8 loaded values around the first
of them, and their merge into a Welford accumulator given the reciprocal of
the new count, which the unrolled accumulators of a thread share (they
count alike): one division per step instead of one per value.
"""
from __future__ import annotations

import numpy as np
from numba import config, cuda, types
from numba.cuda import libdevice

#: Elements per vector of ``apply`` and ``dx``: 1, 2, 4 aligned 16-byte accesses of float16, 32, 64.
VEC = 8

if config.ENABLE_CUDASIM:
    # The simulator runs kernels as Python: the same accesses element by
    # element (its arrays are NumPy arrays; alignment as on the device).
    def aligned16(a, b):
        return (a.__array_interface__["data"][0] | b.__array_interface__["data"][0]) % 16 == 0

    def load8(a, v):
        acc = np.float32 if a.dtype == np.float16 else a.dtype.type
        return tuple(acc(a[VEC * v + j]) for j in range(VEC))

    def store8(a, v, *values):
        for j, value in enumerate(values):
            a[VEC * v + j] = value
else:
    from llvmlite import ir
    from numba.cuda.extending import intrinsic

    def _vectors(context, builder, aryty, ary, v):
        """``(pointer, element vector type)`` of each 16-byte vector of
        elements 8 v ... 8 v + 7: pointers to ``<4 x i32>`` in global memory
        (``addrspace(1)``: ``ld.global``, where a generic ``ld.v4`` would be
        an ``LD.E.128``, not an ``LDG``), the values bitcast."""
        data = context.make_array(aryty)(context, builder, ary).data
        elem = context.get_data_type(aryty.dtype)
        n = 16 // context.get_abi_sizeof(elem)
        words = ir.VectorType(ir.IntType(32), 4)
        i64 = ir.IntType(64)
        first = builder.mul(builder.zext(v, i64) if v.type.width < 64 else v, ir.Constant(i64, VEC))
        out = []
        for part in range(VEC // n):
            ptr = builder.gep(data, [builder.add(first, ir.Constant(i64, part * n))])
            ptr = builder.addrspacecast(builder.bitcast(ptr, words.as_pointer()), words.as_pointer(1))
            out.append((ptr, ir.VectorType(elem, n)))
        return out

    def _load_words(builder, ptr, dtype):
        """A 16-byte load; float16 by inline PTX (NVVM folds the bitcast
        into an ``<8 x half>`` load, which it splits in two)."""
        if dtype != types.float16:
            return builder.load(ptr, align=16)
        i32 = ir.IntType(32)
        asm = ir.InlineAsm(ir.FunctionType(ir.LiteralStructType([i32] * 4), [ptr.type]),
                           "ld.global.v4.u32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l")
        words = builder.call(asm, [ptr])
        vector = ir.Constant(ptr.type.pointee, ir.Undefined)
        for j in range(4):
            vector = builder.insert_element(vector, builder.extract_value(words, j), ir.Constant(i32, j))
        return vector

    def _store_words(builder, ptr, vector, dtype):
        """A 16-byte store (float16: inline PTX with a memory clobber)."""
        if dtype != types.float16:
            builder.store(vector, ptr, align=16)
            return
        i32 = ir.IntType(32)
        asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [ptr.type] + [i32] * 4),
                           "st.global.v4.u32 [$0], {$1, $2, $3, $4};", "l,r,r,r,r,~{memory}", side_effect=True)
        builder.call(asm, [ptr, *[builder.extract_element(vector, ir.Constant(i32, j)) for j in range(4)]])

    @intrinsic
    def aligned16(typingctx, a, b):
        """Whether both arrays' data are 16-byte aligned."""
        def codegen(context, builder, sig, args):
            i64 = ir.IntType(64)
            ptrs = [builder.ptrtoint(context.make_array(t)(context, builder, x).data, i64)
                    for t, x in zip(sig.args, args)]
            low = builder.and_(builder.or_(*ptrs), ir.Constant(i64, 15))
            return builder.icmp_unsigned("==", low, ir.Constant(i64, 0))
        return types.boolean(a, b), codegen

    @intrinsic
    def load8(typingctx, a, v):
        """Elements 8 v ... 8 v + 7 of ``a`` (16-byte aligned, unsigned
        ``v``) in the accumulation type, by 16-byte loads."""
        acc = types.float64 if a.dtype == types.float64 else types.float32

        def codegen(context, builder, sig, args):
            values = []
            for ptr, vtype in _vectors(context, builder, sig.args[0], args[0], args[1]):
                vector = builder.bitcast(_load_words(builder, ptr, a.dtype), vtype)
                values += [context.cast(builder, builder.extract_element(vector, ir.Constant(ir.IntType(32), j)),
                                        a.dtype, acc) for j in range(vtype.count)]
            return context.make_tuple(builder, sig.return_type, values)
        return types.UniTuple(acc, VEC)(a, v), codegen

    @intrinsic
    def store8(typingctx, a, v, y0, y1, y2, y3, y4, y5, y6, y7):
        """Store 8 values (converted to ``a``'s dtype as Numba converts)
        into elements 8 v ... 8 v + 7 of ``a``, by 16-byte stores."""
        def codegen(context, builder, sig, args):
            values = [context.cast(builder, x, t, a.dtype) for x, t in zip(args[2:], sig.args[2:])]
            for ptr, vtype in _vectors(context, builder, sig.args[0], args[0], args[1]):
                vector = ir.Constant(vtype, ir.Undefined)
                for j in range(vtype.count):
                    vector = builder.insert_element(vector, values.pop(0), ir.Constant(ir.IntType(32), j))
                _store_words(builder, ptr, builder.bitcast(vector, ptr.type.pointee), a.dtype)
            return context.get_dummy_value()
        return types.void(a, v, y0, y1, y2, y3, y4, y5, y6, y7), codegen


@cuda.jit(device=True, inline=True)
def chunk8(v, k, eighth, zero):
    """Mean of ``x - k`` and M2 of the 8 values ``v`` (a :func:`load8`),
    from their sums around the first: ``d = x - x0`` (exact for
    neighbouring values by Sterbenz' lemma), ``mean = (x0 - k) + S1 / 8``,
    ``M2 = S2 - S1^2 / 8``. The cancellation is bounded: ``M2 >= (7/8)
    (x0 - mean_others)^2`` when x0 is far from the others, so ``S2`` is at
    most about 8 times ``M2`` plus the others' spread. Rounding may take
    M2 a few ulps of ``S2`` below 0 (values nearly equal): the caller
    clamps its accumulators once, after the walk. ``eighth``: 1/8 in the
    accumulation type."""
    x0, x1, x2, x3, x4, x5, x6, x7 = v
    d1, d2, d3, d4, d5, d6, d7 = x1 - x0, x2 - x0, x3 - x0, x4 - x0, x5 - x0, x6 - x0, x7 - x0
    s1 = ((d1 + d2) + (d3 + d4)) + ((d5 + d6) + d7)
    s2 = d1 * d1
    s2 += d2 * d2
    s2 += d3 * d3
    s2 += d4 * d4
    s2 += d5 * d5
    s2 += d6 * d6
    s2 += d7 * d7
    s1e = s1 * eighth
    return (x0 - k) + s1e, s2 - s1 * s1e


@cuda.jit(device=True, inline=True)
def chan8(m, q, v, k, w, t, eighth, zero):
    """Chan's merge of the chunk of 8 values ``v`` (:func:`chunk8`) into an
    accumulator (count n, mean ``m`` of ``x - k``, M2 ``q``): ``w = 8 / (n +
    8)``, ``t = n w``, the same for every accumulator of the thread."""
    mc, qc = chunk8(v, k, eighth, zero)
    delta = mc - m
    return m + delta * w, q + qc + delta * delta * t


@cuda.jit(device=True, inline=True)
def merge8(n, m, q, v, k, eight, eighth, zero):
    """:func:`chan8` with a division of its own: ``(n + 8, m', q')``."""
    nn = n + eight
    w = eight / nn
    m, q = chan8(m, q, v, k, w, n * w, eighth, zero)
    return nn, m, q


@cuda.jit(device=True, inline=True)
def fast_divide32(a, b):
    """float32 ``a / b`` by a reciprocal approximation (2 ulp; ``b`` a
    count, far below 2^126): the shared weight of a step."""
    return libdevice.fast_fdividef(a, b)


@cuda.jit(device=True, inline=True)
def divide64(a, b):
    return a / b


@cuda.jit(device=True, inline=True)
def dot8(g, v, k, s, t):
    """``s + sum(g)``, ``t + sum(g * (v - k))`` over 8 values (two :func:`load8`)."""
    g0, g1, g2, g3, g4, g5, g6, g7 = g
    x0, x1, x2, x3, x4, x5, x6, x7 = v
    s += ((g0 + g1) + (g2 + g3)) + ((g4 + g5) + (g6 + g7))
    t += (((g0 * (x0 - k) + g1 * (x1 - k)) + (g2 * (x2 - k) + g3 * (x3 - k)))
          + ((g4 * (x4 - k) + g5 * (x5 - k)) + (g6 * (x6 - k) + g7 * (x7 - k))))
    return s, t
