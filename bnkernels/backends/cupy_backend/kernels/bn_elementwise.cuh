// One-pass elementwise kernels: apply (forward, inference), dx (backward),
// and the per-channel coefficients of inference. Grid-stride loops over the
// flat index; the channel of each element is tracked incrementally (no
// division in the loop), so one kernel serves every layout; in 32-bit
// indices below 2^31 elements (bn::index32). When the
// pointers are 16-byte aligned (vectorized != 0), each thread moves 16 bytes
// per access (float4, 8 halves, double2); the remainder is done by scalars.
#pragma once
#include "bn_common.cuh"
#include "bn_scan.cuh"  // kIndex32Limit

namespace bn {

// y = (x - k) * scale + shift, optional ReLU (NaN propagates: NaN < 0 is false).
template <typename ACC, typename I>
__device__ __forceinline__ ACC affine(ACC v, I c, const ACC* __restrict__ k,
                                      const ACC* __restrict__ scale, const ACC* __restrict__ shift, int relu) {
    ACC y = (v - k[c]) * scale[c] + shift[c];
    return (relu && y < ACC(0)) ? ACC(0) : y;
}

#ifndef BN_TRACK32_LIMIT
#define BN_TRACK32_LIMIT 0x7fffffffLL
#endif
constexpr long long kTrack32Limit = BN_TRACK32_LIMIT;

// The walks of bn_apply and bn_dx in index type I: 32-bit (unsigned) when
// every index, and a grid stride past the last, stays below kIndex32Limit
// (every tensor below 2^31 elements), else 64-bit; the same for the whole
// launch. BN_INDEX32_LIMIT=0 (host tests) takes the 64-bit walk.
__device__ __forceinline__ bool index32(long long total) {
    return total + static_cast<long long>(gridDim.x) * blockDim.x * 8 < kIndex32Limit;
}

// Past it, the channel tracking (position in the plane, channel: J) stays
// 32-bit while planes and channels number below 2^31 (i + ti < 2 inner,
// c + tc < 2 C); I (flat indices) is then 64-bit. BN_TRACK32_LIMIT=0 (host
// tests) takes the all-64-bit walk.
__device__ __forceinline__ bool track32(long long C, long long inner) {
    return C < kTrack32Limit && inner < kTrack32Limit;
}

template <typename I, typename J, typename T, typename ACC>
__device__ __forceinline__ void apply_walk(const T* __restrict__ x, T* __restrict__ y, I total, J C, J inner,
                                           const ACC* __restrict__ k, const ACC* __restrict__ scale,
                                           const ACC* __restrict__ shift, int relu, int vectorized) {
    using V = typename Vec16<T>::type;
    constexpr int N = Vec16<T>::n;
    const I threads = static_cast<I>(gridDim.x) * blockDim.x;
    const I tid = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (vectorized) {
        const I nvec = total / N;
        const V* __restrict__ xv = reinterpret_cast<const V*>(x);
        V* __restrict__ yv = reinterpret_cast<V*>(y);
        TrackT<J> t = track_at(tid * N, C, inner);
        const TrackT<J> stride = track_at(threads * N, C, inner);
        if (inner % N == 0) {
            // every vector lies in one channel plane: its 3 coefficients
            // are loaded once, into registers, for its N values
            for (I v = tid; v < nvec; v += threads) {
                const V in = xv[v];
                const ACC kk = k[t.c], sc = scale[t.c], sf = shift[t.c];
                V out;
                const T* xi = reinterpret_cast<const T*>(&in);
                T* yo = reinterpret_cast<T*>(&out);
#pragma unroll
                for (int j = 0; j < N; ++j) {
                    const ACC r = (to_acc<ACC>(xi[j]) - kk) * sc + sf;
                    yo[j] = from_acc<T>((relu && r < ACC(0)) ? ACC(0) : r);
                }
                yv[v] = out;
                track_advance(t, stride, C, inner);
            }
        } else {
            for (I v = tid; v < nvec; v += threads) {
                const V in = xv[v];
                V out;
                const T* xi = reinterpret_cast<const T*>(&in);
                T* yo = reinterpret_cast<T*>(&out);
                TrackT<J> e = t;
#pragma unroll
                for (int j = 0; j < N; ++j) {
                    yo[j] = from_acc<T>(affine(to_acc<ACC>(xi[j]), e.c, k, scale, shift, relu));
                    track_next(e, C, inner);
                }
                yv[v] = out;
                track_advance(t, stride, C, inner);
            }
        }
        // fewer than N values are left: at most one per thread, no loop
        const I p = nvec * N + tid;
        if (p < total) y[p] = from_acc<T>(affine(to_acc<ACC>(x[p]), track_at(p, C, inner).c, k,
                                                         scale, shift, relu));
        return;
    }
    TrackT<J> t = track_at(tid, C, inner);
    const TrackT<J> stride = track_at(threads, C, inner);
    for (I p = tid; p < total; p += threads) {
        y[p] = from_acc<T>(affine(to_acc<ACC>(x[p]), t.c, k, scale, shift, relu));
        track_advance(t, stride, C, inner);
    }
}

template <typename I, typename J, typename T, typename ACC>
__device__ __forceinline__ void dx_walk(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                        I total, J C, J inner, const ACC* __restrict__ k,
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
        const TrackT<J> stride = track_at(threads * N, C, inner);
        if (inner % N == 0) {
            // every vector lies in one channel plane: its 4 coefficients
            // are loaded once, into registers, for its N values
            for (I v = tid; v < nvec; v += threads) {
                const V gin = gv[v];
                const V xin = xv[v];
                const ACC kk = k[t.c], ca = a[t.c], cb = b[t.c], cc0 = cc[t.c];
                V out;
                const T* gi = reinterpret_cast<const T*>(&gin);
                const T* xi = reinterpret_cast<const T*>(&xin);
                T* o = reinterpret_cast<T*>(&out);
#pragma unroll
                for (int j = 0; j < N; ++j)
                    o[j] = from_acc<T>(to_acc<ACC>(gi[j]) * ca + (to_acc<ACC>(xi[j]) - kk) * cb + cc0);
                ov[v] = out;
                track_advance(t, stride, C, inner);
            }
        } else {
            for (I v = tid; v < nvec; v += threads) {
                const V gin = gv[v];
                const V xin = xv[v];
                V out;
                const T* gi = reinterpret_cast<const T*>(&gin);
                const T* xi = reinterpret_cast<const T*>(&xin);
                T* o = reinterpret_cast<T*>(&out);
                TrackT<J> e = t;
#pragma unroll
                for (int j = 0; j < N; ++j) {
                    const J c = e.c;
                    o[j] = from_acc<T>(to_acc<ACC>(gi[j]) * a[c] + (to_acc<ACC>(xi[j]) - k[c]) * b[c] +
                                           cc[c]);
                    track_next(e, C, inner);
                }
                ov[v] = out;
                track_advance(t, stride, C, inner);
            }
        }
        // fewer than N values are left: at most one per thread, no loop
        const I p = nvec * N + tid;
        if (p < total) {
            const J c = track_at(p, C, inner).c;
            dx[p] = from_acc<T>(to_acc<ACC>(dy[p]) * a[c] + (to_acc<ACC>(x[p]) - k[c]) * b[c] + cc[c]);
        }
        return;
    }
    TrackT<J> t = track_at(tid, C, inner);
    const TrackT<J> stride = track_at(threads, C, inner);
    for (I p = tid; p < total; p += threads) {
        const J c = t.c;
        dx[p] = from_acc<T>(to_acc<ACC>(dy[p]) * a[c] + (to_acc<ACC>(x[p]) - k[c]) * b[c] + cc[c]);
        track_advance(t, stride, C, inner);
    }
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
    const unsigned C32 = static_cast<unsigned>(C), inner32 = static_cast<unsigned>(inner);
    if (bn::index32(total))
        bn::apply_walk<unsigned, unsigned>(x, y, static_cast<unsigned>(total), C32, inner32, k, scale, shift, relu,
                                           vectorized);
    else if (bn::track32(C, inner))
        bn::apply_walk<long long, unsigned>(x, y, total, C32, inner32, k, scale, shift, relu, vectorized);
    else
        bn::apply_walk<long long, long long>(x, y, total, C, inner, k, scale, shift, relu, vectorized);
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
    const unsigned C32 = static_cast<unsigned>(C), inner32 = static_cast<unsigned>(inner);
    if (bn::index32(total))
        bn::dx_walk<unsigned, unsigned>(dy, x, dx, static_cast<unsigned>(total), C32, inner32, k, a, b, cc,
                                        vectorized);
    else if (bn::track32(C, inner))
        bn::dx_walk<long long, unsigned>(dy, x, dx, total, C32, inner32, k, a, b, cc, vectorized);
    else
        bn::dx_walk<long long, long long>(dy, x, dx, total, C, inner, k, a, b, cc, vectorized);
}
