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

bfloat16 (no Numba dtype): the kernels take its bits as int16 arrays
(``numba_cuda.__init__``: the adapter views the data so) and every access
of a storage array goes through ``load1`` / ``store1`` / ``load8`` /
``store8``, which convert: bits -> float32 is ``bits << 16`` (one
instruction); float32 -> bits rounds to nearest even (a value beyond the
largest bfloat16 becomes Inf, as ``astype`` does) by the hardware's
``cvt.rn.bf16x2.f32`` (two values per instruction; ``cvt.rn.bf16.f32``
for one; sm_80 and later, which only the bfloat16 specializations need),
what ``__float2bfloat16_rn`` of the cupy backend compiles to. NaN stays a
quiet NaN: the canonical ``0x7FFF`` on the device; under the simulator
(bit arithmetic: add ``0x7FFF`` plus the lowest kept bit) the quiet NaN of
its sign, ``0x7FC0``/``0xFFC0``, as ``numba_bf16`` and ml_dtypes give.
Other dtypes convert as Numba does.

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

    def _bf16_value(b):
        return np.array(np.uint32(np.uint16(b)) << np.uint32(16), np.uint32).view(np.float32)[()]

    def _bf16_bits(f):
        u = int(np.array(f, np.float32).view(np.uint32))
        if u & 0x7FFFFFFF > 0x7F800000:
            return np.uint16((u >> 16) & 0x8000 | 0x7FC0).view(np.int16)
        return np.uint16(((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF).view(np.int16)

    def load1(a, i):
        """Element ``i`` of ``a`` in the accumulation type (int16: bfloat16 bits)."""
        if a.dtype == np.int16:
            return _bf16_value(a[i])
        return (np.float32 if a.dtype == np.float16 else a.dtype.type)(a[i])

    def store1(a, i, value):
        """``a[i] = value`` (int16: as bfloat16 bits)."""
        a[i] = _bf16_bits(value) if a.dtype == np.int16 else value

    def load8(a, v):
        return tuple(load1(a, VEC * v + j) for j in range(VEC))

    def store8(a, v, *values):
        for j, value in enumerate(values):
            store1(a, VEC * v + j, value)
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

    def _f32(builder, value, valtype, context):
        return context.cast(builder, value, valtype, types.float32)

    def _bf16x2(builder, hi, lo):
        """Two float32 values as one word of bfloat16 bits (``lo`` in the
        low half), rounded to nearest even: ``cvt.rn.bf16x2.f32``."""
        asm = ir.InlineAsm(ir.FunctionType(ir.IntType(32), [ir.FloatType()] * 2),
                           "cvt.rn.bf16x2.f32 $0, $1, $2;", "=r,f,f")
        return builder.call(asm, [hi, lo])

    def _bf16(builder, value):
        """One float32 value as bfloat16 bits (i16): ``cvt.rn.bf16.f32``."""
        asm = ir.InlineAsm(ir.FunctionType(ir.IntType(16), [ir.FloatType()]), "cvt.rn.bf16.f32 $0, $1;", "=h,f")
        return builder.call(asm, [value])

    def _element(context, builder, aryty, ary, i):
        data = context.make_array(aryty)(context, builder, ary).data
        i64 = ir.IntType(64)
        return builder.gep(data, [builder.zext(i, i64) if i.type.width < 64 else i])

    def _acc_type(dtype):
        return types.float64 if dtype == types.float64 else types.float32

    @intrinsic
    def load1(typingctx, a, i):
        """Element ``i`` (unsigned) of ``a`` in the accumulation type
        (int16: bfloat16 bits)."""
        acc = _acc_type(a.dtype)

        def codegen(context, builder, sig, args):
            value = builder.load(_element(context, builder, sig.args[0], args[0], args[1]))
            if a.dtype == types.int16:
                i32 = ir.IntType(32)
                return builder.bitcast(builder.shl(builder.zext(value, i32), ir.Constant(i32, 16)),
                                       ir.FloatType())
            return context.cast(builder, value, a.dtype, acc)
        return acc(a, i), codegen

    @intrinsic
    def store1(typingctx, a, i, value):
        """``a[i] = value`` (unsigned ``i``; int16: as bfloat16 bits)."""
        def codegen(context, builder, sig, args):
            ptr = _element(context, builder, sig.args[0], args[0], args[1])
            if a.dtype == types.int16:
                builder.store(_bf16(builder, _f32(builder, args[2], sig.args[2], context)), ptr)
            else:
                builder.store(context.cast(builder, args[2], sig.args[2], a.dtype), ptr)
            return context.get_dummy_value()
        return types.void(a, i, value), codegen

    def _load_words(builder, ptr, dtype):
        """A 16-byte load; float16 (and bfloat16 bits) by inline PTX (NVVM folds the bitcast
        into an ``<8 x half>`` load, which it splits in two)."""
        if dtype not in (types.float16, types.int16):
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
        """A 16-byte store (float16, bfloat16: inline PTX with a memory clobber)."""
        if dtype not in (types.float16, types.int16):
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
        acc = _acc_type(a.dtype)

        def codegen(context, builder, sig, args):
            values = []
            if a.dtype == types.int16:  # bfloat16: each 32-bit word holds 2, the first in its low half
                (ptr, _), = _vectors(context, builder, sig.args[0], args[0], args[1])
                words = _load_words(builder, ptr, a.dtype)  # <4 x i32>
                i32 = ir.IntType(32)
                for j in range(4):
                    word = builder.extract_element(words, ir.Constant(i32, j))
                    for half in (builder.shl(word, ir.Constant(i32, 16)),
                                 builder.and_(word, ir.Constant(i32, 0xFFFF0000))):
                        values.append(builder.bitcast(half, ir.FloatType()))
                return context.make_tuple(builder, sig.return_type, values)
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
            if a.dtype == types.int16:  # bfloat16: 2 per 32-bit word, the first in its low half
                i32 = ir.IntType(32)
                values = [_f32(builder, x, t, context) for x, t in zip(args[2:], sig.args[2:])]
                (ptr, _), = _vectors(context, builder, sig.args[0], args[0], args[1])
                words = ir.Constant(ptr.type.pointee, ir.Undefined)
                for j in range(4):
                    word = _bf16x2(builder, values[2 * j + 1], values[2 * j])
                    words = builder.insert_element(words, word, ir.Constant(i32, j))
                _store_words(builder, ptr, words, a.dtype)
                return context.get_dummy_value()
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
