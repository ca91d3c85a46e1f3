// How a reduction thread walks its channel's values (the hot loops of
// bn_stats and bn_bwd_reduce), and what it accumulates on the way.
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
// Offsets: the hot loop addresses items by offsets of type O from the
// channel's first item, and tracks positions in runs in O too: 32-bit
// (unsigned) when the channel spans fewer than kIndex32Limit items - every
// tensor below 2^31 elements - else 64-bit. The choice is the same for the
// whole launch (no divergence); both loops are compiled. BN_INDEX32_LIMIT
// lowers the limit: the host-harness tests build with 0 so that the 64-bit
// loop runs on small data (no CPU test can hold 2^31 elements), and
// BN_POSITION32_LIMIT=0 for the plane-by-plane loop of planes of 2^32 items
// and more.
#pragma once
#include "bn_common.cuh"

#ifndef BN_INDEX32_LIMIT
#define BN_INDEX32_LIMIT 0x7fffffffLL
#endif
#ifndef BN_POSITION32_LIMIT
#define BN_POSITION32_LIMIT 0xffffffffLL
#endif

namespace bn {

constexpr long long kIndex32Limit = BN_INDEX32_LIMIT;
constexpr long long kPosition32Limit = BN_POSITION32_LIMIT;

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

// The 64-bit walk: the item's address itself (as cheap per item as an
// offset plus IMAD.WIDE), positions in 32 bits (width + P < 2^32).
template <typename Item>
struct Walk64 {
    const Item* p;
    unsigned i, wrap, si;
    long long dn, dw;
};

template <bool NOWRAP, typename Item>
__device__ __forceinline__ void advance(const Item*& p, unsigned& i, const Walk64<Item>& w) {
    p += w.dn;
    if (!NOWRAP) {
        i += w.si;
        if (i >= w.wrap) {
            i -= w.wrap;
            p += w.dw;
        }
    }
}

// Calls f.template step<U, true>(addr) for each full step of U items of
// thread t (of P), and f.template tail<U>(addr, k) once for the k < U left
// (straight-line code, not a loop, item by item: a step's arrays there
// would spill); addr: the items' offsets (32-bit) or addresses (64-bit),
// which f turns into pointers (f.at). The U loads of a step are issued
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

// 64-bit: `left` (index space from the thread's next value to the end)
// replaces the count, so no 64-bit division (a call, whose convention
// spills registers) is needed; returns `left` at the end (<= 0: how far
// past the end the next value would be).
template <int U, bool NOWRAP, typename Item, typename F>
__device__ __forceinline__ long long scan64(const Item* first, long long left, unsigned width, long long stride,
                                            unsigned t, unsigned P, F& f) {
    Walk64<Item> w;
    const unsigned ol = t / width;
    w.i = t - ol * width;
    w.p = first + ol * stride + w.i;
    w.wrap = width;
    w.si = P % width;
    w.dn = static_cast<long long>(P / width) * stride + w.si;
    w.dw = stride - width;
    const Item* p[U];
    for (; left > static_cast<long long>(U - 1) * P; left -= static_cast<long long>(U) * P) {
        p[0] = w.p;
#pragma unroll
        for (int u = 1; u < U; ++u) {
            p[u] = p[u - 1];
            advance<NOWRAP>(p[u], w.i, w);
        }
        w.p = p[U - 1];
        advance<NOWRAP>(w.p, w.i, w);
        f.template step<U, true>(p, U);
    }
    if (left > 0) {
        int k = 1;
        p[0] = w.p;
#pragma unroll
        for (int u = 1; u < U; ++u) {
            p[u] = p[u - 1];
            advance<NOWRAP>(p[u], w.i, w);
            k += left > static_cast<long long>(u) * P;
        }
        f.template tail<U>(p, k);
        left -= static_cast<long long>(k) * P;
    }
    return left;
}

// The walk of a channel: `outer` runs of `width` items, `stride` apart,
// from f.origin(); thread t of P takes items t, t + P, ... in order.
template <int U, bool ROWS, typename F>
__device__ __forceinline__ void scan(long long outer, long long width, long long stride, long long t,
                                     long long P, F& f) {
    const long long span = (outer - 1) * stride + width;
    if (span + U * P < kIndex32Limit) {  // every offset, position and step of U items below 2^31
        scan32<U, ROWS>(static_cast<unsigned>(outer * width), static_cast<unsigned>(width),
                        static_cast<unsigned>(stride), static_cast<unsigned>(t), static_cast<unsigned>(P), f);
    } else if (ROWS || width + P < kPosition32Limit) {  // 64-bit addresses, 32-bit positions
        scan64<U, ROWS>(f.origin(), outer * width - t, static_cast<unsigned>(width), stride,
                        static_cast<unsigned>(t), static_cast<unsigned>(P), f);
    } else if constexpr (!ROWS) {  // planes of 2^32 items and more: one by one, positions never wrap
        long long r = t;  // the thread's next position in the plane at rp
        const auto* const end = f.origin() + outer * stride;
        for (const auto* rp = f.origin(); rp != end; rp += stride) {
            if (r < width) {
                // wrap 0xffffffff: never reached; steps of P items
                const long long left =
                    scan64<U, true>(rp + r, width - r, 0xffffffffu, 0, 0u, static_cast<unsigned>(P), f);
                r = -left;  // the next value's position past the end of this plane
            } else {
                r -= width;
            }
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
// plane's may lie past the tensor). Lanes outside the plane contribute
// nothing (f.edge_vec selects them out: they may hold anything, NaN too).
// f.at(off) is the item at offset off from the tensor's first element.
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

template <int NV, typename T, typename F>
__device__ __forceinline__ void scan_edges32(const T* x, unsigned outer, unsigned B, unsigned inner, unsigned ci,
                                             unsigned first, unsigned t, unsigned P, F& f) {
    using Item = typename F::item;
    using ACC = typename F::acc;
    const T* const xs = reinterpret_cast<const T*>(f.origin());  // x, opaque
    if (t >= outer) return;
    // L and 1 / L; NV = 2: inner is odd, L = 1 its own reciprocal (a
    // division held through the loop, or even constants, made ptxas spill
    // the kernel's walk flag at 64 registers)
    const ACC cl = ACC(static_cast<int>(inner - B * NV));
    const ACC inv_l = NV == 2 ? cl : count_ratio(ACC(1), cl);
    for (unsigned o = t; o < outer; o += P) {
        constexpr int K = edge_vector_count<NV>();
        unsigned at[K];
        bool live[K];
        EdgeMask mk;
        const unsigned s = edge_vectors<NV, K>(first + o * ci, B, inner, at, live, mk);
        Item e[K];
#pragma unroll
        for (int k = 0; k < K; ++k) e[k] = live[k] ? load(f.at(at[k])) : Item{};
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

// ---- statistics: (n, mean - k0, M2) per owned channel ------------------------
// Per step, for each channel the thread owns, the chunk of values it
// loaded (U * NV values of one channel for planes, U for rows) is reduced
// around s, the chunk's first value: S1 = sum(v - s), S2 = sum((v - s)^2);
// then the chunk (count c, mean s + S1 / c, M2 = S2 - S1^2 / c) is merged
// into the thread's (n, m, q) by Chan's formula, with one division per step
// shared by all owned channels (they count alike).
// Why this is exact: s is a value of the chunk, so n_c (mean_c - s)^2 <=
// (c - 1) M2_c (no value is further from the mean than sqrt((c-1)/c M2));
// hence S2 = M2_c + c (mean_c - s)^2 <= c * M2_c and the cancellation in
// S2 - S1^2 / c loses at most log2(c) bits (c <= 32), whatever the mean of
// the data (a mean of 1e4 with std 1 loses nothing: every v - s is small).
// The chunk sums are short (<= 8 terms per partial), and the merges are
// Welford's/Chan's, whose error does not grow with the mean either. With
// no values (c = 0) nothing is merged.
template <typename T, typename ACC, typename Item, int NV, bool ROWS>
struct StatsScan {
    static constexpr int CH = ROWS ? NV : 1;  // channels owned
    using acc = ACC;
    using item = Item;
    const Item* b;                            // the channel's (or channels') first item
    ACC n = ACC(0);
    ACC m[CH], q[CH], k0[CH];

    __device__ __forceinline__ const Item* origin() const { return b; }
    __device__ __forceinline__ const Item* at(unsigned off) const { return b + off; }
    __device__ __forceinline__ const Item* at(const Item* p) const { return p; }

    __device__ __forceinline__ StatsScan(const Item* first, const ACC (&k)[CH]) : b(opaque(first)) {
#pragma unroll
        for (int j = 0; j < CH; ++j) {
            m[j] = ACC(0);
            q[j] = ACC(0);
            k0[j] = k[j];
        }
    }

    template <int U, bool FULL, typename A>
    __device__ __forceinline__ void step(const A (&addr)[U], int valid) {
        Item it[U];
#pragma unroll
        for (int u = 0; u < U; ++u) it[u] = load(at(addr[u]));  // all loads in flight first
        ACC v[U][NV];
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (FULL || u < valid) unpack<ACC, T, NV>(it[u], v[u]);
        ACC s1[CH], s2[CH], x0[CH];
        if (ROWS) {  // channel j: element j of each item
#pragma unroll
            for (int j = 0; j < CH; ++j) {
                x0[j] = v[0][j];
                ACC a = ACC(0), a2 = q[j];  // the chunk's S2 is added to q on the way
#pragma unroll
                for (int u = 1; u < U; ++u)
                    if (FULL || u < valid) {
                        const ACC e = v[u][j] - x0[j];
                        a += e;
                        a2 = fma(e, e, a2);
                    }
                s1[j] = a;
                s2[j] = a2;
            }
        } else {  // one channel: every element of every item, a partial per item
            x0[0] = v[0][0];
            ACC a[U], a2[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                a[u] = ACC(0);
                a2[u] = u == 0 ? q[0] : ACC(0);  // the chunk's S2 is added to q on the way
                if (FULL || u < valid) {
#pragma unroll
                    for (int j = u == 0 ? 1 : 0; j < NV; ++j) {  // value 0 is the shift
                        const ACC e = v[u][j] - x0[0];
                        a[u] += e;
                        a2[u] = fma(e, e, a2[u]);
                    }
                }
            }
#pragma unroll
            for (int u = 1; u < U; ++u) {
                a[0] += a[u];
                a2[0] += a2[u];
            }
            s1[0] = a[0];
            s2[0] = a2[0];
        }
        const int cnt = FULL ? U : valid;
        const ACC c = ACC(ROWS ? cnt : cnt * NV);
        // 1 / c is a power of two in full steps: an exact multiply
        const ACC inv_c = FULL ? ACC(1) / ACC(ROWS ? U : U * NV) : count_ratio(ACC(1), c);
        const ACC total = n + c;
        const ACC r = count_ratio(c, total);  // the step's one division
        const ACC w = n * r;                  // n * c / total
#pragma unroll
        for (int j = 0; j < CH; ++j) {
            const ACC t = s1[j] * inv_c;
            const ACC q2 = fma(-t, s1[j], s2[j]);  // q + M2 of the chunk
            const ACC delta = ((x0[j] - k0[j]) - m[j]) + t;
            m[j] = fma(delta, r, m[j]);
            q[j] = fma(delta * w, delta, q2);
        }
        n = total;
    }

    // A plane's cl = L edge values (split walk: scan_edges32) as one chunk
    // around its first value x0, exact as a step's: K masked vectors.
    template <int K>
    __device__ __forceinline__ void edge_vec(const Item (&e)[K], ACC x0, const EdgeMask& mk, ACC cl, ACC inv_l) {
        ACC s1[K], s2[K];
#pragma unroll
        for (int k = 0; k < K; ++k) {
            ACC v[NV];
            unpack<ACC, T, NV>(e[k], v);
            s1[k] = ACC(0);
            s2[k] = k == 0 ? q[0] : ACC(0);
#pragma unroll
            for (int j = 0; j < NV; ++j) {
                const ACC d = mk.valid<NV>(k, j) ? v[j] - x0 : ACC(0);
                s1[k] += d;
                s2[k] = fma(d, d, s2[k]);
            }
        }
#pragma unroll
        for (int k = 1; k < K; ++k) {
            s1[0] += s1[k];
            s2[0] += s2[k];
        }
        const ACC total = n + cl;
        const ACC r = count_ratio(cl, total);
        const ACC w = n * r;
        const ACC t = s1[0] * inv_l;
        const ACC q2 = fma(-t, s1[0], s2[0]);
        const ACC delta = ((x0 - k0[0]) - m[0]) + t;
        m[0] = fma(delta, r, m[0]);
        q[0] = fma(delta * w, delta, q2);
        n = total;
    }

    // The last k < U items, one chunk each (planes: its NV values around its
    // first; rows: one value per channel, a Welford step).
    template <int U, typename A>
    __device__ __forceinline__ void tail(const A (&addr)[U], int valid) {
#pragma unroll
        for (int u = 0; u < U - 1; ++u) {
            if (u >= valid) break;
            ACC v[NV];
            unpack<ACC, T, NV>(load(at(addr[u])), v);
            const ACC c = ACC(ROWS ? 1 : NV);
            const ACC total = n + c;
            const ACC r = count_ratio(c, total);
            const ACC w = n * r;
            ACC s1 = ACC(0), q2 = q[0];
            if constexpr (!ROWS) {
#pragma unroll
                for (int j = 1; j < NV; ++j) {
                    const ACC e = v[j] - v[0];
                    s1 += e;
                    q2 = fma(e, e, q2);
                }
                const ACC t = s1 * (ACC(1) / ACC(NV));  // NV: a power of two
                q2 = fma(-t, s1, q2);
                const ACC delta = ((v[0] - k0[0]) - m[0]) + t;
                m[0] = fma(delta, r, m[0]);
                q[0] = fma(delta * w, delta, q2);
            } else {
#pragma unroll
                for (int j = 0; j < CH; ++j) {
                    const ACC delta = (v[j] - k0[j]) - m[j];
                    m[j] = fma(delta, r, m[j]);
                    q[j] = fma(delta * w, delta, q[j]);
                }
            }
            n = total;
        }
    }
};

// ---- backward sums: sum(dy), sum(dy * (x - k)) per owned channel ---------------
// Plain sums in ACC, as before vectorization: k is the saved mean, so x - k
// does not cancel. Independent partials (one per item slot for planes, one
// per channel for rows) keep the chains short and the loads in flight.
template <typename T, typename ACC, typename Item, int NV, bool ROWS, int U>
struct BwdScan {
    static constexpr int CH = ROWS ? NV : 1;
    static constexpr int SL = ROWS ? NV : 2;  // partial sums (more would spill)
    using acc = ACC;
    using item = Item;
    const Item* gb;
    const Item* xb;
    unsigned long long dist;  // bytes from x to dy (the 64-bit walks follow x)
    ACC s[SL], t[SL], k[CH];

    __device__ __forceinline__ const Item* origin() const { return xb; }
    __device__ __forceinline__ const Item* xat(unsigned off) const { return xb + off; }
    __device__ __forceinline__ const Item* xat(const Item* p) const { return p; }
    __device__ __forceinline__ const Item* gat(unsigned off) const { return gb + off; }
    __device__ __forceinline__ const Item* gat(const Item* p) const {
        return reinterpret_cast<const Item*>(reinterpret_cast<const char*>(p) + dist);
    }

    __device__ __forceinline__ BwdScan(const Item* g, const Item* x, const ACC (&kk)[CH]) : gb(opaque(g)), xb(opaque(x)),
          dist(reinterpret_cast<unsigned long long>(g) - reinterpret_cast<unsigned long long>(x)) {
#pragma unroll
        for (int j = 0; j < SL; ++j) s[j] = t[j] = ACC(0);
#pragma unroll
        for (int j = 0; j < CH; ++j) k[j] = kk[j];
    }

    template <int UU, bool FULL, typename A>
    __device__ __forceinline__ void step(const A (&addr)[UU], int valid) {
        Item gi[UU], xi[UU];
#pragma unroll
        for (int u = 0; u < UU; ++u) {
            gi[u] = load(gat(addr[u]));
            xi[u] = load(xat(addr[u]));
        }
#pragma unroll
        for (int u = 0; u < UU; ++u)
            if (FULL || u < valid) {
                ACC g[NV], x[NV];
                unpack<ACC, T, NV>(gi[u], g);
                unpack<ACC, T, NV>(xi[u], x);
#pragma unroll
                for (int j = 0; j < NV; ++j) {
                    const int sl = ROWS ? j : u % SL;
                    s[sl] += g[j];
                    t[sl] = fma(g[j], x[j] - k[ROWS ? j : 0], t[sl]);
                }
            }
    }

    // A plane's edge values (split walk: scan_edges2_32), K masked vectors
    // of dy and x; lanes outside the plane add nothing (both selected out:
    // 0 * NaN would not be 0).
    template <int K>
    __device__ __forceinline__ void edge_vec2(const Item (&gv)[K], const Item (&xv)[K], const EdgeMask& mk) {
#pragma unroll
        for (int kk = 0; kk < K; ++kk) {
            ACC g[NV], x[NV];
            unpack<ACC, T, NV>(gv[kk], g);
            unpack<ACC, T, NV>(xv[kk], x);
#pragma unroll
            for (int j = 0; j < NV; ++j) {
                const bool ok = mk.valid<NV>(kk, j);
                const ACC gg = ok ? g[j] : ACC(0);
                const ACC d = ok ? x[j] - k[0] : ACC(0);
                const int sl = (kk * NV + j) % SL;
                s[sl] += gg;
                t[sl] = fma(gg, d, t[sl]);
            }
        }
    }

    // The last k < U items, one by one.
    template <int UU, typename A>
    __device__ __forceinline__ void tail(const A (&addr)[UU], int valid) {
#pragma unroll
        for (int u = 0; u < UU - 1; ++u) {
            if (u >= valid) break;
            ACC g[NV], x[NV];
            unpack<ACC, T, NV>(load(gat(addr[u])), g);
            unpack<ACC, T, NV>(load(xat(addr[u])), x);
#pragma unroll
            for (int j = 0; j < NV; ++j) {
                const int sl = ROWS ? j : u % SL;
                s[sl] += g[j];
                t[sl] = fma(g[j], x[j] - k[ROWS ? j : 0], t[sl]);
            }
        }
    }
};

}  // namespace bn
