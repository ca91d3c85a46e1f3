// How a reduction thread walks its channel's values (the hot loops of
// bn_stats and bn_bwd_reduce); what it accumulates on the way is
// bn_accumulators.cuh's.
//
// Items: a thread loads its values as items, either 16-byte vectors (NV =
// Vec16<T>::n values, when the pointers are 16-byte aligned and every run
// of a channel starts on a vector boundary) or single values (NV = 1, any
// layout). A channel's items form `outer` runs of `width` items, run o
// starting `stride` items after run o - 1:
//   channel planes (inner > 1): a run is one plane (inner / NV items), the
//     thread's items are those of one channel;
//   channel fastest (inner == 1): a run is one row; an item holds NV
//     neighbouring channels, which the thread owns together.
// The P threads of a channel take its items j = t, t + P, t + 2P, ... in
// (run, position) order, so consecutive lanes read consecutive addresses.
//
// Offsets: the hot loop addresses items by 32-bit (unsigned) offsets from
// a base and tracks positions in runs in 32 bits. When the channel spans
// fewer than kIndex32Limit items (every tensor below 2^31 elements) the
// base is the channel's first item; else the channel is walked in chunks
// (rebased walks): runs of it, or pieces of a run, each spanning fewer
// than kChunk32Limit items, each from its own 64-bit base (f.rebase), each
// walked as a small channel; the hot loop is the same 32-bit one, and only
// once per chunk (< 2^31 items) is a 64-bit address formed. The choice is
// the same for the whole launch (no divergence). BN_INDEX32_LIMIT=0 sends
// the host-harness tests' small tensors down the rebased walks (no CPU test
// can hold 2^31 elements), and BN_CHUNK_SPAN (items) makes their chunks
// small: several runs per chunk, or pieces of one.
#pragma once
#include "bn_common.cuh"

#ifndef BN_INDEX32_LIMIT
#define BN_INDEX32_LIMIT 0x7fffffffLL
#endif

namespace bn {

constexpr long long kIndex32Limit = BN_INDEX32_LIMIT;

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// The base pointer, made opaque to the compiler: otherwise it may fold the
// address arithmetic around it into a 64-bit add per load (3 instructions
// more per item) instead of one IMAD.WIDE.U32 from the base.
// The compiler then no longer knows the pointer is global, so the loads say
// it (load(): __ldg, read-only data; a plain load in the host harness).
template <typename Item>
__device__ __forceinline__ const Item* opaque(const Item* p) {
#ifdef __CUDA_ARCH__
    asm("mov.b64 %0, %0;" : "+l"(p));
#endif
    return p;
}

template <typename Item>
__device__ __forceinline__ Item* opaque(Item* p) {
#ifdef __CUDA_ARCH__
    asm("mov.b64 %0, %0;" : "+l"(p));
#endif
    return p;
}

// An item not loaded, whose lanes are all selected out: any bits (on the
// GPU no instruction sets them; zeros in the host harness).
template <typename Item>
__device__ __forceinline__ Item unset() {
    Item v{};
#ifdef __CUDA_ARCH__
    static_assert(sizeof(Item) % 4 == 0, "32-bit words");
    unsigned* w = reinterpret_cast<unsigned*>(&v);
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(Item) / 4); ++i) asm volatile("" : "=r"(w[i]));
#endif
    return v;
}

// v, as the compiler cannot see it: computed once, kept in a register.
__device__ __forceinline__ void reload32(unsigned& v) {
#ifdef __CUDA_ARCH__
    asm volatile("mov.b32 %0, %0;" : "+r"(v));
#endif
}

template <typename Item>
__device__ __forceinline__ Item load(const Item* p) {
#ifdef __CUDA_ARCH__
    return __ldg(p);
#else
    return *p;
#endif
}

// Value j of an item (a vector or a value) in the accumulation type.
template <typename ACC, typename T, int NV, typename Item>
__device__ __forceinline__ void unpack_values(const Item& v, ACC (&out)[NV]) {
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int j = 0; j < NV; ++j) out[j] = to_acc<ACC>(e[j]);
}

template <typename T>
struct Unpack {
    template <typename ACC, int NV, typename Item>
    __device__ __forceinline__ static void run(const Item& v, ACC (&out)[NV]) {
        unpack_values<ACC, T, NV>(v, out);
    }
};

// bfloat16 vectors by 32-bit words: value 2i into the top half of a
// binary32 (a shift), value 2i + 1 already there (a mask), exact; value by
// value the conversion cost an extra register move per value.
template <>
struct Unpack<__nv_bfloat16> {
    template <typename ACC, int NV, typename Item>
    __device__ __forceinline__ static void run(const Item& v, ACC (&out)[NV]) {
        if constexpr (NV % 2 == 0 && sizeof(Item) == 2 * NV) {
            const unsigned* w = reinterpret_cast<const unsigned*>(&v);
#pragma unroll
            for (int i = 0; i < NV / 2; ++i) {
                out[2 * i] = __uint_as_float(w[i] << 16);
                out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
            }
        } else {
            unpack_values<ACC, __nv_bfloat16, NV>(v, out);
        }
    }
};

template <typename ACC, typename T, int NV, typename Item>
__device__ __forceinline__ void unpack(const Item& v, ACC (&out)[NV]) {
    Unpack<T>::template run<ACC, NV>(v, out);
}

// The 32-bit walk: one thread's next item as an offset from the channel's
// first, and (planes) its position in its run; per step of P items the
// offset grows by dn, plus dw when the position wraps to the next run.
struct Walk32 {
    unsigned off, i, wrap, si, dn, dw;
};

template <bool NOWRAP>
__device__ __forceinline__ void advance(unsigned& off, unsigned& i, const Walk32& w) {
    off += w.dn;  // unsigned: past the thread's last item it may wrap, unused
    if (!NOWRAP) {
        i += w.si;
        if (i >= w.wrap) {
            i -= w.wrap;
            off += w.dw;
        }
    }
}

// Calls f.template step<U, true>(addr) for each full step of U items of
// thread t (of P), and f.template tail<U>(addr, k) once for the k < U left
// (straight-line code, not a loop, item by item: a step's arrays there
// would spill); addr: the items' offsets from f's base, which f turns
// into pointers (f.at). The U loads of a step are issued
// before their values are used (inside step). Every value below 2^31 here.
template <int U, bool NOWRAP, typename F>
__device__ __forceinline__ void scan32(unsigned total, unsigned width, unsigned stride, unsigned t, unsigned P,
                                       F& f) {
    if (t >= total) return;
    // `left` (index space from the thread's next value to the end) instead
    // of a count: no division, which the compiler would hoist out of the
    // loop over channel groups and hold through the kernel
    int left = static_cast<int>(total - t);
    const int p = static_cast<int>(P);
    Walk32 w;
    const unsigned ol = t / width;
    w.i = t - ol * width;
    w.off = ol * stride + w.i;
    w.wrap = width;
    w.si = P % width;
    w.dn = (P / width) * stride + w.si;
    w.dw = stride - width;
    unsigned off[U];
    for (; left > (U - 1) * p; left -= U * p) {
        off[0] = w.off;
#pragma unroll
        for (int u = 1; u < U; ++u) {
            off[u] = off[u - 1];
            advance<NOWRAP>(off[u], w.i, w);
        }
        w.off = off[U - 1];
        advance<NOWRAP>(w.off, w.i, w);
        f.template step<U, true>(off, U);
    }
    if (left > 0) {
        int k = 1;
        off[0] = w.off;
#pragma unroll
        for (int u = 1; u < U; ++u) {
            off[u] = off[u - 1];
            advance<NOWRAP>(off[u], w.i, w);
            k += left > u * p;
        }
        f.template tail<U>(off, k);
    }
}

// The rebased walks: a chunk spans fewer than kChunk32Limit - U P items
// (the 32-bit walk's rule), and at most kChunkSpan (host tests: small).
#ifndef BN_CHUNK32_LIMIT
#define BN_CHUNK32_LIMIT 0x7fffffffLL
#endif
#ifndef BN_CHUNK_SPAN
#define BN_CHUNK_SPAN 0x7fffffffLL
#endif
constexpr long long kChunk32Limit = BN_CHUNK32_LIMIT;
constexpr long long kChunkSpan = BN_CHUNK_SPAN;

// The most items a chunk may span, given the items a walk may step past
// its last one (at least 1: only the host tests' lowered limits need it).
__device__ __forceinline__ long long chunk_span(long long past) {
    long long a = kChunk32Limit - past - 1;
    if (a > kChunkSpan) a = kChunkSpan;
    return a < 1 ? 1 : a;
}

// Runs per chunk: the largest power of two R with (R - 1) * stride <= room
// (room >= 0, stride >= 1; a loop of doublings, no 64-bit division).
__device__ __forceinline__ long long chunk_runs(long long room, long long stride) {
    long long r = 1;
#pragma unroll 1
    while ((2 * r - 1) * stride <= room) r *= 2;
    return r;
}

// The walk of a channel: `outer` runs of `width` items, `stride` apart,
// from f.origin(); thread t of P takes items t, t + P, ... in order (of
// each chunk, in the rebased walks).
template <int U, bool ROWS, typename F>
__device__ __forceinline__ void scan(long long outer, long long width, long long stride, long long t,
                                     long long P, F& f) {
    const long long span = (outer - 1) * stride + width;
    if (span + U * P < kIndex32Limit) {  // every offset, position and step of U items below 2^31
        scan32<U, ROWS>(static_cast<unsigned>(outer * width), static_cast<unsigned>(width),
                        static_cast<unsigned>(stride), static_cast<unsigned>(t), static_cast<unsigned>(P), f);
        return;
    }
    // rebased: chunks of R whole runs, or (runs of more than a chunk's
    // span) pieces of W items of one run; one chunk's items stay below
    // 2^31 - U P (a stride of 2^32 items or more, truncated, is never used:
    // one run per chunk)
    const long long A = chunk_span(U * P);
    const unsigned W = static_cast<unsigned>(width <= A ? width : A);  // < 2^31
    const unsigned R = width <= A ? static_cast<unsigned>(chunk_runs(A - width, stride)) : 1u;
    const long long step = R * stride;
    const auto* run = f.origin();
#pragma unroll 1
    for (long long o = outer; o > 0; o -= R, run += step) {
        const unsigned runs = o < R ? static_cast<unsigned>(o) : R;
        const auto* piece = run;
#pragma unroll 1
        for (long long left = width; left > 0; left -= W, piece += W) {
            const unsigned w = left < W ? static_cast<unsigned>(left) : W;
            f.rebase(piece);
            scan32<U, ROWS>(runs * w, w, static_cast<unsigned>(stride), static_cast<unsigned>(t),
                            static_cast<unsigned>(P), f);
        }
    }
}


// Planes whose inner % NV != 0 (pointers 16-byte aligned): a plane starts
// anywhere in a vector, so each plane is split. Its body: the B =
// (inner - NV + 1) / NV whole vectors from its first vector boundary (every
// plane holds that many, whatever its first element's position); its edges:
// the L = inner - B * NV values around the body (NV - 1 <= L <= 2 NV - 2),
// some before it, the rest after. The bodies are walked as the aligned
// planes are (items j = t, t + P, ... in (plane, position) order), the
// item's offset from the plane's first element a rounded up to a vector:
// a / NV + i with a kept biased by NV - 1 (a shift and an add per item,
// instead of a fixed stride between runs). Elements below 2^31 (32-bit a).
template <int NV>
struct SplitWalk {
    unsigned a, i, B, si, da, ci;
    __device__ __forceinline__ unsigned item() const { return a / NV + i; }
    __device__ __forceinline__ void advance() {
        a += da;
        i += si;
        if (i >= B) {
            i -= B;
            a += ci;
        }
    }
};

// Calls f.step / f.tail as scan32 does, for the bodies of `outer` planes of
// B items, `ci` elements apart from element `first`.
template <int NV, int U, typename F>
__device__ __forceinline__ void scan_split32(unsigned outer, unsigned B, unsigned ci, unsigned first, unsigned t,
                                             unsigned P, F& f) {
    const unsigned total = outer * B;
    if (t >= total) return;
    int left = static_cast<int>(total - t);
    const int p = static_cast<int>(P);
    SplitWalk<NV> w;
    const unsigned o = t / B;
    w.i = t - o * B;
    w.a = first + o * ci + (NV - 1);
    w.B = B;
    w.si = P % B;
    w.da = (P / B) * ci;
    w.ci = ci;
    unsigned off[U];
    for (; left > (U - 1) * p; left -= U * p) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            off[u] = w.item();
            w.advance();  // past the thread's last item it may wrap, unused
        }
        f.template step<U, true>(off, U);
    }
    if (left > 0) {
        int k = 0;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            off[u] = w.item();
            w.advance();
            k += left > u * p;
        }
        f.template tail<U>(off, k);
    }
}

// The edges of the planes: thread t of P takes planes t, t + P, ...; the L
// = inner - B * NV values of a plane (those before its first vector
// boundary, then those after its B body vectors) as one chunk, read as the
// three 16-byte vectors that hold them, masked: the head vector a / NV
// (values j >= r = a % NV, none if r = 0) and the two vectors after the
// body, v1 and v1 + 1 (values j < t1 and j < t1 - NV, t1 = a + inner - v1 *
// NV <= L); a vector with no value of the plane is not loaded (the last
// plane's may lie past the tensor). A loaded vector holds a value of the
// tensor, so it lies in the tensor's allocation (16-byte granules) even
// where its other lanes lie before the first value (a misaligned x) or
// past the last. Lanes outside the plane contribute nothing (f.edge_vec
// selects them out: they may hold anything, NaN too). f.at(off) is the
// item at offset off from the 16-byte boundary at or below x.
struct EdgeMask {
    unsigned lo, t1;  // head vector: lanes j >= lo; tail vectors: lanes j < t1, j + NV < t1
    // lo >= 1 and t1 <= 2 NV - 2: lane 0 of the head vector and lanes
    // NV - 2, NV - 1 of the third never hold a value of the plane (known
    // at compile time: not computed)
    template <int NV>
    __device__ __forceinline__ bool valid(int k, int j) const {
        if (k == 0) return j >= 1 && static_cast<unsigned>(j) >= lo;
        if (k == 2 && j >= NV - 2) return false;
        return static_cast<unsigned>(j + (k - 1) * NV) < t1;
    }
    // The same as the bits of one word, lane k NV + j (NV = 8: 24 bits),
    // which ptxas turns into predicates 7 at a time (R2P): a comparison per
    // lane cost 21 instructions of the half/bfloat16 edges.
    template <int NV>
    __device__ __forceinline__ unsigned bits() const {
        if constexpr (NV == 8) {
            const unsigned head = (0xffu << lo) & 0xffu;  // lanes lo..7 of vector 0 (lo = NV: none)
            return head | ((1u << t1) - 1u) << NV;        // lanes 0..t1-1 of vectors 1, 2
        }
        return 0u;
    }
    template <int NV>
    __device__ __forceinline__ bool ok(unsigned bits, int k, int j) const {
        if constexpr (NV == 8) return ((bits >> (k * NV + j)) & 1u) != 0;
        return valid<NV>(k, j);
    }
};

// K: the vectors that may hold edge values (t1 <= L <= 2 NV - 2: a third
// only for NV > 2).
template <int NV>
constexpr int edge_vector_count() { return NV > 2 ? 3 : 2; }

template <int NV, int K>
__device__ __forceinline__ unsigned edge_vectors(unsigned a, unsigned B, unsigned inner, unsigned (&at)[K],
                                                 bool (&live)[K], EdgeMask& mk) {
    const unsigned r = a & (NV - 1);
    const unsigned v1 = (a + (NV - 1)) / NV + B;  // the first vector after the body
    mk.lo = r ? r : NV;
    mk.t1 = a + inner - v1 * NV;
    at[0] = a / NV;
    live[0] = r != 0;
#pragma unroll
    for (int k = 1; k < K; ++k) {
        at[k] = v1 + (k - 1);
        live[k] = mk.t1 > static_cast<unsigned>((k - 1) * NV);
    }
    return r ? a : v1 * NV;  // the chunk's first value
}

template <int NV, typename F>
__device__ __forceinline__ void scan_edges32(unsigned outer, unsigned B, unsigned inner, unsigned ci,
                                             unsigned first, unsigned t, unsigned P, F& f) {
    using Item = typename F::item;
    using ACC = typename F::acc;
    using T = typename F::value;
    const T* const xs = reinterpret_cast<const T*>(f.origin());  // x, opaque
    if (t >= outer) return;
    // L and 1 / L; NV = 2: L is 1 (inner odd) or 2 (inner even, x
    // misaligned), 1 / L = 1.5 - L / 2 exactly (a division held through
    // the loop made ptxas spill the kernel's walk flag at 64 registers)
    const ACC cl = ACC(static_cast<int>(inner - B * NV));
    const ACC inv_l = NV == 2 ? fma(ACC(-0.5), cl, ACC(1.5)) : count_ratio(ACC(1), cl);
    for (unsigned o = t; o < outer; o += P) {
        constexpr int K = edge_vector_count<NV>();
        unsigned at[K];
        bool live[K];
        EdgeMask mk;
        const unsigned s = edge_vectors<NV, K>(first + o * ci, B, inner, at, live, mk);
        Item e[K];
#pragma unroll
        for (int k = 0; k < K; ++k) e[k] = live[k] ? load(f.at(at[k])) : unset<Item>();
        f.template edge_vec<K>(e, to_acc<ACC>(load(xs + s)), mk, cl, inv_l);
    }
}

// The same for two arrays at the same offsets (dy and x of the backward
// sums): no shift needed (plain sums).
template <int NV, typename F>
__device__ __forceinline__ void scan_edges2_32(unsigned outer, unsigned B, unsigned inner, unsigned ci,
                                               unsigned first, unsigned t, unsigned P, F& f) {
    using Item = typename F::item;
    for (unsigned o = t; o < outer; o += P) {
        constexpr int K = edge_vector_count<NV>();
        unsigned at[K];
        bool live[K];
        EdgeMask mk;
        edge_vectors<NV, K>(first + o * ci, B, inner, at, live, mk);
        Item g[K], x[K];
#pragma unroll
        for (int k = 0; k < K; ++k) {
            g[k] = live[k] ? load(f.gat(at[k])) : Item{};
            x[k] = live[k] ? load(f.xat(at[k])) : Item{};
        }
        f.template edge_vec2<K>(g, x, mk);
    }
}

// The split walk of a channel (bodies, then edges: BWD, dy and x's) from
// f.origin(), x rounded down to a 16-byte boundary (a misaligned x's planes
// split as any others); `first`: the channel's first element from there.
// Tensors of 2^31 elements and more are walked in chunks of R planes, each
// from the vector holding its first element (f.rebase), each spanning
// fewer than 2^31 - 8 P elements (the 32-bit walks' rule; use_split
// checks that one plane does).
__device__ __forceinline__ long long split_span(long long P, int nv) {
    const long long a = kChunk32Limit - 8 * P - 1, b = kChunkSpan * nv;
    return a < b ? a : b;
}

template <int NV, int U, bool BWD, typename F>
__device__ __forceinline__ void scan_split(long long outer, long long C, long long inner, long long first,
                                           long long t, long long P, F& f) {
    const long long ci = C * inner;
    const unsigned B = static_cast<unsigned>((inner - (NV - 1)) / NV);
    const long long room = split_span(P, NV) - inner - 2 * NV;  // >= 0 (use_split)
    const long long R = (outer - 1) * ci <= room ? outer : chunk_runs(room, ci);
    const auto* const origin = f.origin();
#pragma unroll 1
    for (long long o0 = 0; o0 < outer; o0 += R) {
        unsigned runs = static_cast<unsigned>(outer - o0 < R ? outer - o0 : R);
        reload32(runs);  // a register: not recomputed in 64 bits in the loops below
        const long long e0 = first + o0 * ci;
        const long long ea = e0 & ~static_cast<long long>(NV - 1);
        f.rebase(origin + ea / NV);
        const unsigned f32 = static_cast<unsigned>(e0 - ea);
        scan_split32<NV, U>(runs, B, static_cast<unsigned>(ci), f32, static_cast<unsigned>(t),
                            static_cast<unsigned>(P), f);
        if constexpr (BWD)
            scan_edges2_32<NV>(runs, B, static_cast<unsigned>(inner), static_cast<unsigned>(ci), f32,
                               static_cast<unsigned>(t), static_cast<unsigned>(P), f);
        else
            scan_edges32<NV>(runs, B, static_cast<unsigned>(inner), static_cast<unsigned>(ci), f32,
                             static_cast<unsigned>(t), static_cast<unsigned>(P), f);
    }
}

}  // namespace bn
