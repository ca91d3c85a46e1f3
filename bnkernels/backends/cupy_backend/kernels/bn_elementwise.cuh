// One-pass elementwise kernels: apply (forward, inference; with a residual
// added: apply_residual), dx (backward), the gradient through a fused ReLU
// (relu_backward), and the per-channel coefficients of inference. Grid-stride loops over the
// flat index; the channel of each element is tracked incrementally (no
// division in the loop), so one kernel serves every layout; in 32-bit
// indices (past 2^31 elements, per chunk: bn::rebased_walk). When the
// pointers are 16-byte aligned (vectorized != 0), each thread moves 16 bytes
// per access (float4, 8 halves or bfloat16s, double2); the remainder is done by scalars.
#pragma once
#include "bn_common.cuh"
#include "bn_scan.cuh"  // kIndex32Limit

namespace bn {

// y = (x - k) * scale + shift [+ z], optional ReLU (NaN propagates: NaN < 0
// is false). RES: a residual z is added (in ACC, before the ReLU: one
// rounding at the store); without one nothing is added (not even +0, which
// would turn a -0 into +0).
template <bool RES, typename ACC>
__device__ __forceinline__ ACC activate(ACC r, ACC z, int relu) {
    if constexpr (RES) r += z;
    return (relu && r < ACC(0)) ? ACC(0) : r;
}

template <bool RES, typename ACC, typename T, typename I>
__device__ __forceinline__ ACC residual_at(const T* __restrict__ z, I p) {
    if constexpr (RES) return to_acc<ACC>(z[p]);
    return ACC(0);  // unused
}

template <bool RES, typename ACC, typename I>
__device__ __forceinline__ ACC affine(ACC v, ACC z, I c, const ACC* __restrict__ k,
                                      const ACC* __restrict__ scale, const ACC* __restrict__ shift, int relu) {
    return activate<RES>((v - k[c]) * scale[c] + shift[c], z, relu);
}

// Value j of a 16-byte vector in ACC (j a constant once unrolled):
// bfloat16 by 32-bit words (value 2i into the top half of a binary32 by a
// shift, value 2i + 1 already there: a mask; exact), which saves a register
// move per value over converting the extracted 16 bits.
template <typename T>
struct Lane {
    template <typename ACC, typename V>
    __device__ __forceinline__ static ACC get(const V& v, int j) {
        return to_acc<ACC>(reinterpret_cast<const T*>(&v)[j]);
    }
};
template <>
struct Lane<__nv_bfloat16> {
    template <typename ACC, typename V>
    __device__ __forceinline__ static ACC get(const V& v, int j) {
        const unsigned w = reinterpret_cast<const unsigned*>(&v)[j / 2];
        return __uint_as_float((j & 1) ? (w & 0xffff0000u) : (w << 16));
    }
};

// WORDS = false: value by value for every T (bn_apply_residual's bfloat16
// plane loop: with words ptxas no longer split it by the ReLU flag, 3.09
// instructions per byte on sm_90 instead of 2.27 and 1.91).
template <typename ACC, typename T, bool WORDS = true, typename V>
__device__ __forceinline__ ACC lane(const V& v, int j) {
    if constexpr (WORDS) return Lane<T>::template get<ACC>(v, j);
    return to_acc<ACC>(reinterpret_cast<const T*>(&v)[j]);
}

#ifndef BN_TRACK32_LIMIT
#define BN_TRACK32_LIMIT 0x7fffffffLL
#endif
constexpr long long kTrack32Limit = BN_TRACK32_LIMIT;

// The walks of bn_apply and bn_dx in 32-bit indices (unsigned) when every
// index, and a grid stride past the last, stays below kIndex32Limit (every
// tensor below 2^31 elements), else rebased (rebased_walk: chunks of the
// tensor walked the same way, each from its own base); the same for the
// whole launch. BN_INDEX32_LIMIT=0 (host tests) takes the rebased walk.
__device__ __forceinline__ bool index32(long long total) {
    return total + static_cast<long long>(gridDim.x) * blockDim.x * 8 < kIndex32Limit;
}

// Whether the rebased walks' channel tracking can wrap as usual: planes
// and channels number below 2^31 (i + ti < 2 inner, c + tc < 2 C).
// BN_TRACK32_LIMIT (host tests) lowers the limit: 0 cuts the tensor into
// planes, one below C into samples.
__device__ __forceinline__ bool track32(long long C, long long inner) {
    return C < kTrack32Limit && inner < kTrack32Limit;
}

// RES: z (like x) is added before the ReLU, read as x is (16-byte vectors
// when every pointer is aligned).
template <bool RES, typename I, typename J, typename T, typename ACC>
__device__ __forceinline__ void apply_walk(const T* __restrict__ x, const T* __restrict__ z, T* __restrict__ y,
                                           I total, J C, J inner, TrackT<J> start, const ACC* __restrict__ k,
                                           const ACC* __restrict__ scale, const ACC* __restrict__ shift, int relu,
                                           int vectorized) {
    using V = typename Vec16<T>::type;
    constexpr int N = Vec16<T>::n;
    const I threads = static_cast<I>(gridDim.x) * blockDim.x;
    const I tid = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (vectorized) {
        const I nvec = total / N;
        const V* __restrict__ xv = reinterpret_cast<const V*>(x);
        const V* __restrict__ zv = reinterpret_cast<const V*>(z);
        V* __restrict__ yv = reinterpret_cast<V*>(y);
        TrackT<J> t = track_at(tid * N, C, inner);
        track_advance(t, start, C, inner);
        const TrackT<J> stride = track_at(threads * N, C, inner);
        if (inner % N == 0) {
            // every vector lies in one channel plane: its 3 coefficients
            // are loaded once, into registers, for its N values
            for (I v = tid; v < nvec; v += threads) {
                const V in = xv[v];
                V zin;
                if constexpr (RES) zin = zv[v];
                const ACC kk = k[t.c], sc = scale[t.c], sf = shift[t.c];
                V out;
                T* yo = reinterpret_cast<T*>(&out);
#pragma unroll
                for (int j = 0; j < N; ++j)
                    yo[j] = from_acc<T>(activate<RES>((lane<ACC, T, !RES>(in, j) - kk) * sc + sf,
                                                      RES ? lane<ACC, T, false>(zin, j) : ACC(0), relu));
                yv[v] = out;
                track_advance(t, stride, C, inner);
            }
        } else {
            for (I v = tid; v < nvec; v += threads) {
                const V in = xv[v];
                V zin;
                if constexpr (RES) zin = zv[v];
                V out;
                T* yo = reinterpret_cast<T*>(&out);
                TrackT<J> e = t;
#pragma unroll
                for (int j = 0; j < N; ++j) {
                    yo[j] = from_acc<T>(affine<RES>(lane<ACC, T>(in, j), RES ? lane<ACC, T>(zin, j) : ACC(0), e.c,
                                                    k, scale, shift, relu));
                    track_next(e, C, inner);
                }
                yv[v] = out;
                track_advance(t, stride, C, inner);
            }
        }
        // fewer than N values are left: at most one per thread, no loop
        const I p = nvec * N + tid;
        if (p < total) {
            TrackT<J> e = track_at(p, C, inner);
            track_advance(e, start, C, inner);
            y[p] = from_acc<T>(affine<RES>(to_acc<ACC>(x[p]), residual_at<RES, ACC>(z, p), e.c, k, scale, shift,
                                           relu));
        }
        return;
    }
    TrackT<J> t = track_at(tid, C, inner);
    track_advance(t, start, C, inner);
    const TrackT<J> stride = track_at(threads, C, inner);
    for (I p = tid; p < total; p += threads) {
        y[p] = from_acc<T>(affine<RES>(to_acc<ACC>(x[p]), residual_at<RES, ACC>(z, p), t.c, k, scale, shift, relu));
        track_advance(t, stride, C, inner);
    }
}

// g = dy where not y <= 0 (le_zero: exact on the bits), else 0: the
// gradient through a fused ReLU, torch's rule (a NaN y passes dy). dy's
// values are passed through as they are (no conversion).
template <typename I, typename T>
__device__ __forceinline__ void relu_backward_walk(const T* __restrict__ dy, const T* __restrict__ y,
                                                   T* __restrict__ g, I total, int vectorized) {
    using V = typename Vec16<T>::type;
    constexpr int N = Vec16<T>::n;
    const I threads = static_cast<I>(gridDim.x) * blockDim.x;
    const I tid = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x;
    const T zero = from_acc<T>(0.0f);
    if (vectorized) {
        const I nvec = total / N;
        const V* __restrict__ dv = reinterpret_cast<const V*>(dy);
        const V* __restrict__ yv = reinterpret_cast<const V*>(y);
        V* __restrict__ gv = reinterpret_cast<V*>(g);
        for (I v = tid; v < nvec; v += threads) {
            const V din = dv[v];
            const V yin = yv[v];
            V out;
            const T* di = reinterpret_cast<const T*>(&din);
            const T* yi = reinterpret_cast<const T*>(&yin);
            T* o = reinterpret_cast<T*>(&out);
#pragma unroll
            for (int j = 0; j < N; ++j) o[j] = le_zero(yi[j]) ? zero : di[j];
            gv[v] = out;
        }
        // fewer than N values are left: at most one per thread, no loop
        const I p = nvec * N + tid;
        if (p < total) g[p] = le_zero(y[p]) ? zero : dy[p];
        return;
    }
    // single values, G consecutive ones per thread and step (one address
    // per array for G values, immediate offsets; the loads in flight
    // first): one value per step spent 15 instructions on 4 bytes of half
    // on sm_90. Then the fewer than G left, one per thread.
    constexpr int G = 4;
    const I groups = total / G;
    for (I q = tid; q < groups; q += threads) {
        const I p = q * G;
        T d[G], v[G];
#pragma unroll
        for (int j = 0; j < G; ++j) {
            d[j] = dy[p + j];
            v[j] = y[p + j];
        }
#pragma unroll
        for (int j = 0; j < G; ++j) g[p + j] = le_zero(v[j]) ? zero : d[j];
    }
    const I p = groups * G + tid;
    if (p < total) g[p] = le_zero(y[p]) ? zero : dy[p];
}

template <typename I, typename J, typename T, typename ACC>
__device__ __forceinline__ void dx_walk(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                        I total, J C, J inner, TrackT<J> start, const ACC* __restrict__ k,
                                        const ACC* __restrict__ a, const ACC* __restrict__ b,
                                        const ACC* __restrict__ cc, int vectorized) {
    using V = typename Vec16<T>::type;
    constexpr int N = Vec16<T>::n;
    const I threads = static_cast<I>(gridDim.x) * blockDim.x;
    const I tid = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (vectorized) {
        const I nvec = total / N;
        const V* __restrict__ gv = reinterpret_cast<const V*>(dy);
        const V* __restrict__ xv = reinterpret_cast<const V*>(x);
        V* __restrict__ ov = reinterpret_cast<V*>(dx);
        TrackT<J> t = track_at(tid * N, C, inner);
        track_advance(t, start, C, inner);
        const TrackT<J> stride = track_at(threads * N, C, inner);
        if (inner % N == 0) {
            // every vector lies in one channel plane: its 4 coefficients
            // are loaded once, into registers, for its N values
            for (I v = tid; v < nvec; v += threads) {
                const V gin = gv[v];
                const V xin = xv[v];
                const ACC kk = k[t.c], ca = a[t.c], cb = b[t.c], cc0 = cc[t.c];
                V out;
                T* o = reinterpret_cast<T*>(&out);
#pragma unroll
                for (int j = 0; j < N; ++j)
                    o[j] = from_acc<T>(lane<ACC, T>(gin, j) * ca + (lane<ACC, T>(xin, j) - kk) * cb + cc0);
                ov[v] = out;
                track_advance(t, stride, C, inner);
            }
        } else {
            for (I v = tid; v < nvec; v += threads) {
                const V gin = gv[v];
                const V xin = xv[v];
                V out;
                T* o = reinterpret_cast<T*>(&out);
                TrackT<J> e = t;
#pragma unroll
                for (int j = 0; j < N; ++j) {
                    const J c = e.c;
                    o[j] = from_acc<T>(lane<ACC, T>(gin, j) * a[c] + (lane<ACC, T>(xin, j) - k[c]) * b[c] + cc[c]);
                    track_next(e, C, inner);
                }
                ov[v] = out;
                track_advance(t, stride, C, inner);
            }
        }
        // fewer than N values are left: at most one per thread, no loop
        const I p = nvec * N + tid;
        if (p < total) {
            TrackT<J> e = track_at(p, C, inner);
            track_advance(e, start, C, inner);
            const J c = e.c;
            dx[p] = from_acc<T>(to_acc<ACC>(dy[p]) * a[c] + (to_acc<ACC>(x[p]) - k[c]) * b[c] + cc[c]);
        }
        return;
    }
    TrackT<J> t = track_at(tid, C, inner);
    track_advance(t, start, C, inner);
    const TrackT<J> stride = track_at(threads, C, inner);
    for (I p = tid; p < total; p += threads) {
        const J c = t.c;
        dx[p] = from_acc<T>(to_acc<ACC>(dy[p]) * a[c] + (to_acc<ACC>(x[p]) - k[c]) * b[c] + cc[c]);
        track_advance(t, stride, C, inner);
    }
}

}  // namespace bn

namespace bn {

// The rebased walks of bn_apply and bn_dx (tensors past index32): chunks of
// fewer than kChunk32Limit - 8 * threads elements (whole vectors), each
// walked as a small tensor in 32-bit indices from its own 64-bit base,
// with 32-bit channel tracking from the chunk's first element. While
// planes and channels number below kTrack32Limit the tracking starts at
// the chunk's (position, channel) and wraps as usual; past that (planes or
// channels of 2^31 and more) the tensor is cut into units (planes, or
// samples of C * inner) that no chunk crosses: the coefficients are
// rebased to the chunk's first channel, the channel never wraps within a
// chunk (C taken as 2^32 - 1) and in a plane of 2^31 and more never
// changes (inner taken as 2^31: every chunk lies in one plane). A unit's
// first and last values up to the vector boundaries (fewer than N each)
// are done one by one in 64 bits: one(p). chunk(e0, len, C32, inner32,
// start, c0): the chunk from element e0, its coefficients from channel c0.
// BN_CHUNK_SPAN (vectors) makes the chunks of the host tests small.
template <int N, typename Chunk, typename One>
__device__ __forceinline__ void rebased_walk(long long total, long long C, long long inner, int vectorized,
                                             Chunk&& chunk, One&& one) {
    const bool t32 = track32(C, inner);
    const long long unit = t32 ? total : inner >= kTrack32Limit ? inner : C * inner;
    const long long threads = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long tid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    long long E = kChunk32Limit - 8 * threads - 1;
    if (E > kChunkSpan * N) E = kChunkSpan * N;
    E = E < N ? N : E & ~static_cast<long long>(N - 1);
    const unsigned C32 = t32 ? static_cast<unsigned>(C) : 0xffffffffu;
    const unsigned in32 = t32 || inner < kTrack32Limit ? static_cast<unsigned>(inner) : 0x80000000u;
#pragma unroll 1
    for (long long u0 = 0; u0 < total; u0 += unit) {
        const long long u1 = total - u0 <= unit ? total : u0 + unit;
        long long a = u0, b = u1;
        if (vectorized) {  // units' edges to vector boundaries (the tensor's end: the walk's own tail)
            a = (u0 + (N - 1)) & ~static_cast<long long>(N - 1);
            if (u1 != total) b = u1 & ~static_cast<long long>(N - 1);
            if (a > b) a = b = u1;
        }
        if (tid < a - u0) one(u0 + tid);
        if (tid < u1 - b) one(b + tid);
#pragma unroll 1
        for (long long e0 = a; e0 < b; e0 += E) {
            const long long q = e0 / inner;
            TrackT<unsigned> st;
            st.i = t32 || inner < kTrack32Limit ? static_cast<unsigned>(e0 - q * inner) : 0u;
            st.c = t32 ? static_cast<unsigned>(q % C) : 0u;
            chunk(e0, static_cast<unsigned>(b - e0 < E ? b - e0 : E), C32, in32, st, t32 ? 0LL : q % C);
        }
    }
}

// The launch of an apply walk: 32-bit, or rebased.
template <bool RES, typename T, typename ACC>
__device__ __forceinline__ void apply_launch(const T* __restrict__ x, const T* __restrict__ z, T* __restrict__ y,
                                             long long total, long long C, long long inner,
                                             const ACC* __restrict__ k, const ACC* __restrict__ scale,
                                             const ACC* __restrict__ shift, int relu, int vectorized) {
    if (index32(total)) {
        apply_walk<RES, unsigned, unsigned>(x, z, y, static_cast<unsigned>(total), static_cast<unsigned>(C),
                                            static_cast<unsigned>(inner), TrackT<unsigned>{0u, 0u}, k, scale, shift,
                                            relu, vectorized);
        return;
    }
    rebased_walk<Vec16<T>::n>(
        total, C, inner, vectorized,
        [&](long long e0, unsigned len, unsigned C32, unsigned in32, TrackT<unsigned> st, long long c0) {
            apply_walk<RES, unsigned, unsigned>(x + e0, RES ? z + e0 : z, y + e0, len, C32, in32, st, k + c0,
                                                scale + c0, shift + c0, relu, vectorized);
        },
        [&](long long p) {
            const long long c = (p / inner) % C;
            y[p] = from_acc<T>(affine<RES>(to_acc<ACC>(x[p]), residual_at<RES, ACC>(z, p), c, k, scale, shift, relu));
        });
}

}  // namespace bn

template <typename T, typename ACC>
__global__ void bn_apply(const T* __restrict__ x,          // (total,) input, contiguous
                         T* __restrict__ y,                // (total,) output
                         long long total, long long C, long long inner,
                         const ACC* __restrict__ k,        // (C,)
                         const ACC* __restrict__ scale,    // (C,)
                         const ACC* __restrict__ shift,    // (C,)
                         int relu,                         // fuse max(y, 0)
                         int vectorized)                   // x and y are 16-byte aligned
{
    bn::apply_launch<false>(x, static_cast<const T*>(nullptr), y, total, C, inner, k, scale, shift, relu,
                            vectorized);
}

// y = act((x - k) * scale + shift + z): bn_apply with a residual z added in
// ACC before the activation (one rounding), z read like x.
template <typename T, typename ACC>
__global__ void bn_apply_residual(const T* __restrict__ x,          // (total,) input, contiguous
                                  const T* __restrict__ residual,   // (total,) z, contiguous
                                  T* __restrict__ y,                // (total,) output
                                  long long total, long long C, long long inner,
                                  const ACC* __restrict__ k,        // (C,)
                                  const ACC* __restrict__ scale,    // (C,)
                                  const ACC* __restrict__ shift,    // (C,)
                                  int relu,                         // fuse max(y, 0)
                                  int vectorized)                   // x, residual and y are 16-byte aligned
{
    bn::apply_launch<true>(x, residual, y, total, C, inner, k, scale, shift, relu, vectorized);
}

// g = dy, and 0 where y <= 0: the gradient through the forward's fused ReLU.
template <typename T>
__global__ void bn_relu_backward(const T* __restrict__ dy,   // (total,) contiguous
                                 const T* __restrict__ y,    // (total,) the forward's output, contiguous
                                 T* __restrict__ g,          // (total,)
                                 long long total,
                                 int vectorized)             // dy, y and g are 16-byte aligned
{
    if (bn::index32(total))
        bn::relu_backward_walk<unsigned>(dy, y, g, static_cast<unsigned>(total), vectorized);
    else
        bn::relu_backward_walk<long long>(dy, y, g, total, vectorized);
}

// Per-channel apply coefficients from running statistics (inference).
template <typename ACC, typename R>
__global__ void bn_infer_coeffs(const R* __restrict__ running_mean,  // (C,)
                                const R* __restrict__ running_var,   // (C,)
                                long long C, double eps,
                                const ACC* __restrict__ gamma,       // (C,) or null: 1
                                const ACC* __restrict__ beta,        // (C,) or null: 0
                                ACC* __restrict__ k_out,             // (C,)
                                ACC* __restrict__ scale_out,         // (C,)
                                ACC* __restrict__ shift_out,         // (C,)
                                ACC* __restrict__ invstd_out)        // (C,)
{
    const long long c = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const double m = running_mean[c];
    const double invstd = 1.0 / sqrt(static_cast<double>(running_var[c]) + eps);
    const double scale = (gamma ? static_cast<double>(gamma[c]) : 1.0) * invstd;
    const ACC k = static_cast<ACC>(m);
    k_out[c] = k;
    scale_out[c] = static_cast<ACC>(scale);
    shift_out[c] = static_cast<ACC>((beta ? static_cast<double>(beta[c]) : 0.0) - (m - static_cast<double>(k)) * scale);
    invstd_out[c] = static_cast<ACC>(invstd);
}

// dx = dy * a + (x - k) * b + c per channel.
template <typename T, typename ACC>
__global__ void bn_dx(const T* __restrict__ dy,       // (total,) contiguous
                      const T* __restrict__ x,        // (total,) contiguous
                      T* __restrict__ dx,             // (total,)
                      long long total, long long C, long long inner,
                      const ACC* __restrict__ k,      // (C,)
                      const ACC* __restrict__ a,      // (C,)
                      const ACC* __restrict__ b,      // (C,)
                      const ACC* __restrict__ cc,     // (C,)
                      int vectorized)                 // dy, x and dx are 16-byte aligned
{
    if (bn::index32(total)) {
        bn::dx_walk<unsigned, unsigned>(dy, x, dx, static_cast<unsigned>(total), static_cast<unsigned>(C),
                                        static_cast<unsigned>(inner), bn::TrackT<unsigned>{0u, 0u}, k, a, b, cc,
                                        vectorized);
        return;
    }
    bn::rebased_walk<bn::Vec16<T>::n>(
        total, C, inner, vectorized,
        [&](long long e0, unsigned len, unsigned C32, unsigned in32, bn::TrackT<unsigned> st, long long c0) {
            bn::dx_walk<unsigned, unsigned>(dy + e0, x + e0, dx + e0, len, C32, in32, st, k + c0, a + c0, b + c0,
                                            cc + c0, vectorized);
        },
        [&](long long p) {
            const long long c = (p / inner) % C;
            dx[p] = bn::from_acc<T>(bn::to_acc<ACC>(dy[p]) * a[c] + (bn::to_acc<ACC>(x[p]) - k[c]) * b[c] + cc[c]);
        });
}
