// One-pass elementwise kernels: apply (forward, inference), dx (backward),
// and the per-channel coefficients of inference. Grid-stride loops over the
// flat index; the channel of each element is tracked incrementally (no
// division in the loop), so one kernel serves every layout. When the
// pointers are 16-byte aligned (vectorized != 0), each thread moves 16 bytes
// per access (float4, 8 halves, double2); the remainder is done by scalars.
#pragma once
#include "bn_common.cuh"

namespace bn {

// y = (x - k) * scale + shift, optional ReLU (NaN propagates: NaN < 0 is false).
template <typename ACC>
__device__ __forceinline__ ACC affine(ACC v, long long c, const ACC* __restrict__ k,
                                      const ACC* __restrict__ scale, const ACC* __restrict__ shift, int relu) {
    ACC y = (v - k[c]) * scale[c] + shift[c];
    return (relu && y < ACC(0)) ? ACC(0) : y;
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
    using V = typename bn::Vec16<T>::type;
    constexpr int N = bn::Vec16<T>::n;
    const long long threads = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long tid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (vectorized) {
        const long long nvec = total / N;
        const V* __restrict__ xv = reinterpret_cast<const V*>(x);
        V* __restrict__ yv = reinterpret_cast<V*>(y);
        bn::Track t = bn::track_at(tid * N, C, inner);
        const bn::Track stride = bn::track_at(threads * N, C, inner);
        if (inner % N == 0) {
            // every vector lies in one channel plane: its 3 coefficients
            // are loaded once, into registers, for its N values
            for (long long v = tid; v < nvec; v += threads) {
                const V in = xv[v];
                const ACC kk = k[t.c], sc = scale[t.c], sf = shift[t.c];
                V out;
                const T* xi = reinterpret_cast<const T*>(&in);
                T* yo = reinterpret_cast<T*>(&out);
#pragma unroll
                for (int j = 0; j < N; ++j) {
                    const ACC r = (bn::to_acc<ACC>(xi[j]) - kk) * sc + sf;
                    yo[j] = bn::from_acc<T>((relu && r < ACC(0)) ? ACC(0) : r);
                }
                yv[v] = out;
                bn::track_advance(t, stride, C, inner);
            }
        } else {
            for (long long v = tid; v < nvec; v += threads) {
                const V in = xv[v];
                V out;
                const T* xi = reinterpret_cast<const T*>(&in);
                T* yo = reinterpret_cast<T*>(&out);
                bn::Track e = t;
#pragma unroll
                for (int j = 0; j < N; ++j) {
                    yo[j] = bn::from_acc<T>(bn::affine(bn::to_acc<ACC>(xi[j]), e.c, k, scale, shift, relu));
                    bn::track_next(e, C, inner);
                }
                yv[v] = out;
                bn::track_advance(t, stride, C, inner);
            }
        }
        // fewer than N values are left: at most one per thread, no loop
        const long long p = nvec * N + tid;
        if (p < total) y[p] = bn::from_acc<T>(bn::affine(bn::to_acc<ACC>(x[p]), bn::track_at(p, C, inner).c, k,
                                                         scale, shift, relu));
        return;
    }
    bn::Track t = bn::track_at(tid, C, inner);
    const bn::Track stride = bn::track_at(threads, C, inner);
    for (long long p = tid; p < total; p += threads) {
        y[p] = bn::from_acc<T>(bn::affine(bn::to_acc<ACC>(x[p]), t.c, k, scale, shift, relu));
        bn::track_advance(t, stride, C, inner);
    }
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
    using V = typename bn::Vec16<T>::type;
    constexpr int N = bn::Vec16<T>::n;
    const long long threads = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long tid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (vectorized) {
        const long long nvec = total / N;
        const V* __restrict__ gv = reinterpret_cast<const V*>(dy);
        const V* __restrict__ xv = reinterpret_cast<const V*>(x);
        V* __restrict__ ov = reinterpret_cast<V*>(dx);
        bn::Track t = bn::track_at(tid * N, C, inner);
        const bn::Track stride = bn::track_at(threads * N, C, inner);
        if (inner % N == 0) {
            // every vector lies in one channel plane: its 4 coefficients
            // are loaded once, into registers, for its N values
            for (long long v = tid; v < nvec; v += threads) {
                const V gin = gv[v];
                const V xin = xv[v];
                const ACC kk = k[t.c], ca = a[t.c], cb = b[t.c], cc0 = cc[t.c];
                V out;
                const T* gi = reinterpret_cast<const T*>(&gin);
                const T* xi = reinterpret_cast<const T*>(&xin);
                T* o = reinterpret_cast<T*>(&out);
#pragma unroll
                for (int j = 0; j < N; ++j)
                    o[j] = bn::from_acc<T>(bn::to_acc<ACC>(gi[j]) * ca + (bn::to_acc<ACC>(xi[j]) - kk) * cb + cc0);
                ov[v] = out;
                bn::track_advance(t, stride, C, inner);
            }
        } else {
            for (long long v = tid; v < nvec; v += threads) {
                const V gin = gv[v];
                const V xin = xv[v];
                V out;
                const T* gi = reinterpret_cast<const T*>(&gin);
                const T* xi = reinterpret_cast<const T*>(&xin);
                T* o = reinterpret_cast<T*>(&out);
                bn::Track e = t;
#pragma unroll
                for (int j = 0; j < N; ++j) {
                    const long long c = e.c;
                    o[j] = bn::from_acc<T>(bn::to_acc<ACC>(gi[j]) * a[c] + (bn::to_acc<ACC>(xi[j]) - k[c]) * b[c] +
                                           cc[c]);
                    bn::track_next(e, C, inner);
                }
                ov[v] = out;
                bn::track_advance(t, stride, C, inner);
            }
        }
        // fewer than N values are left: at most one per thread, no loop
        const long long p = nvec * N + tid;
        if (p < total) {
            const long long c = bn::track_at(p, C, inner).c;
            dx[p] = bn::from_acc<T>(bn::to_acc<ACC>(dy[p]) * a[c] + (bn::to_acc<ACC>(x[p]) - k[c]) * b[c] + cc[c]);
        }
        return;
    }
    bn::Track t = bn::track_at(tid, C, inner);
    const bn::Track stride = bn::track_at(threads, C, inner);
    for (long long p = tid; p < total; p += threads) {
        const long long c = t.c;
        dx[p] = bn::from_acc<T>(bn::to_acc<ACC>(dy[p]) * a[c] + (bn::to_acc<ACC>(x[p]) - k[c]) * b[c] + cc[c]);
        bn::track_advance(t, stride, C, inner);
    }
}
