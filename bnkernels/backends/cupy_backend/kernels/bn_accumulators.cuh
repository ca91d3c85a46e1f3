// What a reduction thread accumulates on its walk (bn_scan.cuh): the
// statistics of its chunks (StatsScan) and the backward sums (BwdScan).
// Each is the F of the walks: origin() / rebase() (the walk's base, moved
// per chunk of the rebased walks), at() (an item from an offset), step(),
// tail(), and the split walk's masked edges (edge_vec, edge_vec2).
#pragma once
#include "bn_common.cuh"
#include "bn_scan.cuh"

namespace bn {
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
    using value = T;
    const Item* b;                            // the channel's (or channels') first item
    ACC n = ACC(0);
    ACC m[CH], q[CH], k0[CH];

    __device__ __forceinline__ const Item* origin() const { return b; }
    __device__ __forceinline__ void rebase(const Item* p) { b = opaque(p); }
    __device__ __forceinline__ const Item* at(unsigned off) const { return b + off; }

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
        // sums start at their first term (not 0 + e: an add the compiler
        // may not fold, as -0 + 0 is +0)
        if (ROWS || NV == 1) {  // channel j: element j of each item (NV = 1: the one value of each)
#pragma unroll
            for (int j = 0; j < CH; ++j) {
                x0[j] = v[0][j];
                ACC a = ACC(0), a2 = q[j];  // the chunk's S2 is added to q on the way
#pragma unroll
                for (int u = 1; u < U; ++u)
                    if (FULL || u < valid) {
                        const ACC e = v[u][j] - x0[j];
                        a = u == 1 ? e : a + e;
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
                        const bool first = j == (u == 0 ? 1 : 0);
                        a[u] = first ? e : a[u] + e;
                        a2[u] = first && u > 0 ? e * e : fma(e, e, a2[u]);
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
        // one sum of each (fewer adds than a partial per vector: 3.3
        // instructions per byte instead of 3.2 for half on sm_90), starting
        // at its first term, lanes outside the plane selected out (0)
        const unsigned mb = mk.bits<NV>();
        ACC s1 = ACC(0), s2 = q[0];
#pragma unroll
        for (int k = 0; k < K; ++k) {
            ACC v[NV];
            unpack<ACC, T, NV>(e[k], v);
#pragma unroll
            for (int j = k == 0 ? 1 : 0; j < (k == 2 ? NV - 2 : NV); ++j) {  // lanes that may hold values
                const ACC d = mk.ok<NV>(mb, k, j) ? v[j] - x0 : ACC(0);
                s1 = k == 0 && j == 1 ? d : s1 + d;
                s2 = fma(d, d, s2);
            }
        }
        const ACC total = n + cl;
        const ACC r = count_ratio(cl, total);
        const ACC w = n * r;
        const ACC t = s1 * inv_l;
        const ACC q2 = fma(-t, s1, s2);
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
    unsigned long long dist;  // bytes from x to dy (rebase follows x)
    ACC s[SL], t[SL], k[CH];

    __device__ __forceinline__ const Item* origin() const { return xb; }
    // x's new base, and dy's at the same offset
    __device__ __forceinline__ void rebase(const Item* p) {
        xb = opaque(p);
        gb = opaque(reinterpret_cast<const Item*>(reinterpret_cast<const char*>(p) + dist));
    }
    __device__ __forceinline__ const Item* xat(unsigned off) const { return xb + off; }
    __device__ __forceinline__ const Item* gat(unsigned off) const { return gb + off; }

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
