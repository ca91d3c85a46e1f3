// Shared pieces of the batch-norm kernels: conversions (__half and
// __nv_bfloat16 storage accumulate in float), Welford/Chan merges,
// warp+block reductions, the grid-level last-block protocol, index walks.
//
// Layout: every kernel sees a contiguous input as the canonical view
// (outer, C, inner); "planes" kernels handle inner > 1 (NCHW-like),
// "rows" kernels inner == 1 (NHWC, 2-D). Indices are 64-bit except in the
// hot loops, which are 32-bit at any size: from the tensor's start below
// 2^31 elements, from a base per chunk of fewer than 2^31 above (the
// reductions': bn_scan.cuh; the elementwise passes': bn_elementwise.cuh).
#pragma once
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

namespace bn {

constexpr unsigned kWarp = 32;
constexpr unsigned kMaxWarps = 32;  // 1024 threads per block at most
constexpr unsigned kFullMask = 0xffffffffu;

// ---- storage <-> accumulator conversions (half and bfloat16 accumulate in
// float; bfloat16 -> float is exact, float -> bfloat16 rounds to nearest
// even, NaN stays NaN) ----------------------------------------------------------
template <typename ACC, typename T>
__device__ __forceinline__ ACC to_acc(T v) { return static_cast<ACC>(v); }
template <>
__device__ __forceinline__ float to_acc<float, __half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, typename ACC>
__device__ __forceinline__ T from_acc(ACC v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }

// ---- 16-byte vectors of each storage type ---------------------------------
template <typename T> struct Vec16;
template <> struct Vec16<float> { using type = float4; static constexpr int n = 4; };
template <> struct Vec16<double> { using type = double2; static constexpr int n = 2; };
template <> struct Vec16<__half> { using type = uint4; static constexpr int n = 8; };
template <> struct Vec16<__nv_bfloat16> { using type = uint4; static constexpr int n = 8; };

// ---- y <= 0 of a stored value, exactly (the gradient of a fused ReLU) ------
// On its bits for float and bfloat16: -ftz=true (CuPy's NVRTC option) would
// flush a positive subnormal to zero in a float comparison. +0, -0 and every
// negative number but NaN: u == 0, or u - sign <= inf (unsigned; NaN's bits
// lie above inf's, positives below the sign bit wrap past it).
template <typename T>
__device__ __forceinline__ bool le_zero(T v) { return v <= T(0); }  // double: no flush
template <>
__device__ __forceinline__ bool le_zero<float>(float v) {
    const unsigned u = __float_as_uint(v);
    return u == 0u || u - 0x80000000u <= 0x7f800000u;
}
template <>
__device__ __forceinline__ bool le_zero<__half>(__half v) { return __half2float(v) <= 0.0f; }  // exact, normal
template <>
__device__ __forceinline__ bool le_zero<__nv_bfloat16>(__nv_bfloat16 v) {
    const unsigned u = __bfloat16_as_ushort(v);
    return u == 0u || u - 0x8000u <= 0x7f80u;
}

// ---- Welford / Chan ---------------------------------------------------------
// a / b where both are whole numbers (counts, exact in ACC), b >= 1: for a
// Welford/Chan weight an error of an ulp or two is harmless, and IEEE
// division has a slow-path call whose calling convention spills registers.
// The host harness (no __CUDA_ARCH__) divides exactly.
template <typename ACC>
__device__ __forceinline__ ACC count_ratio(ACC a, ACC b) { return a / b; }
#ifdef __CUDA_ARCH__
template <>
__device__ __forceinline__ float count_ratio<float>(float a, float b) { return __fdividef(a, b); }
// double: a float reciprocal refined by two Newton steps (2^-21 -> 2^-42 ->
// below double's 2^-53), then one multiply: within an ulp or two of a / b,
// for b >= 1 a whole number, with no slow-path call.
template <>
__device__ __forceinline__ double count_ratio<double>(double a, double b) {
    double r = static_cast<double>(__fdividef(1.0f, static_cast<float>(b)));
    r = fma(r, fma(-b, r, 1.0), r);
    r = fma(r, fma(-b, r, 1.0), r);
    return a * r;
}
#endif

// Welford's update of (n, m, q) with value v, given the reciprocal of the
// new count: accumulators that count alike (the unrolled ones of one
// thread) share one division per step instead of one per value.
template <typename ACC>
__device__ __forceinline__ void welford_add_r(ACC& n, ACC& m, ACC& q, ACC v, ACC inv_count) {
    n += ACC(1);
    const ACC d = v - m;
    m += d * inv_count;
    q += d * (v - m);
}

// Chan's merge of (nb, mb, qb) into (n, m, q): count, mean, sum of squared
// deviations.
template <typename ACC>
__device__ __forceinline__ void welford_merge(ACC& n, ACC& m, ACC& q, ACC nb, ACC mb, ACC qb) {
    const ACC total = n + nb;
    if (total == ACC(0)) return;
    const ACC delta = mb - m;
    const ACC r = count_ratio(nb, total);
    q = q + qb + delta * delta * n * r;
    m = m + delta * r;
    n = total;
}

struct WelfordOp {
    template <typename ACC>
    __device__ __forceinline__ static void merge(ACC& a, ACC& b, ACC& c, ACC a2, ACC b2, ACC c2) {
        welford_merge(a, b, c, a2, b2, c2);
    }
};

struct SumOp {
    template <typename ACC>
    __device__ __forceinline__ static void merge(ACC& a, ACC& b, ACC& c, ACC a2, ACC b2, ACC c2) {
        a += a2;
        b += b2;
        c += c2;
    }
};

// Shared memory of a reduction block: per-warp partial triples and the
// "last block" flag. Declared once per kernel as `__shared__ BlockScratch<ACC>`.
template <typename ACC>
struct BlockScratch {
    ACC a[kMaxWarps][kWarp];
    ACC b[kMaxWarps][kWarp];
    ACC c[kMaxWarps][kWarp];
    int last;
};

// Reduce triples over the lanes of a block that hold the same channels.
// Thread lin = threadIdx.x + threadIdx.y * blockDim.x holds NV triples, of
// channels (lin % lanes) * NV + j (j < NV) of the block's group: warp
// shuffles first (lanes lane and lane + offset hold the same channels while
// offset >= lanes), then shared memory [warp][channel] across warps. The
// result of channel x is valid in thread lin == x (threadIdx.y == 0,
// threadIdx.x == x), in a[0], b[0], c[0]. Every thread of the block must
// call it (barriers); lanes * NV == blockDim.x <= 32, lanes a power of two,
// the block a whole number of warps.
template <typename Op, int NV, typename ACC>
__device__ __forceinline__ void block_reduce_n(ACC (&a)[NV], ACC (&b)[NV], ACC (&c)[NV], BlockScratch<ACC>& sh,
                                               unsigned lanes) {
    const unsigned width = blockDim.x;
    const unsigned lin = threadIdx.x + threadIdx.y * width;
    const unsigned lane = lin % kWarp;
    const unsigned warp = lin / kWarp;
    const unsigned nwarps = (width * blockDim.y) / kWarp;
    for (unsigned offset = kWarp / 2; offset >= lanes; offset /= 2) {
#pragma unroll
        for (int j = 0; j < NV; ++j) {
            const ACC a2 = __shfl_down_sync(kFullMask, a[j], offset);
            const ACC b2 = __shfl_down_sync(kFullMask, b[j], offset);
            const ACC c2 = __shfl_down_sync(kFullMask, c[j], offset);
            Op::merge(a[j], b[j], c[j], a2, b2, c2);
        }
    }
    if (lane < lanes) {
#pragma unroll
        for (int j = 0; j < NV; ++j) {
            sh.a[warp][lane * NV + j] = a[j];
            sh.b[warp][lane * NV + j] = b[j];
            sh.c[warp][lane * NV + j] = c[j];
        }
    }
    __syncthreads();
    if (warp == 0 && lane < width) {
        a[0] = sh.a[0][lane];
        b[0] = sh.b[0][lane];
        c[0] = sh.c[0][lane];
        // not unrolled: its trip count would be computed once and held (or
        // spilled) through the whole kernel
#pragma unroll 1
        for (unsigned w = 1; w < nwarps; ++w) Op::merge(a[0], b[0], c[0], sh.a[w][lane], sh.b[w][lane], sh.c[w][lane]);
    }
    __syncthreads();  // the shared slots may be reused after this
}

// One triple per thread, of channel threadIdx.x (lanes == blockDim.x).
template <typename Op, typename ACC>
__device__ __forceinline__ void block_reduce(ACC& a, ACC& b, ACC& c, BlockScratch<ACC>& sh) {
    ACC a1[1] = {a}, b1[1] = {b}, c1[1] = {c};
    block_reduce_n<Op, 1>(a1, b1, c1, sh, blockDim.x);
    a = a1[0];
    b = b1[0];
    c = c1[0];
}

// Count this block's arrival at channel group g (after its partials were
// written) and tell every thread whether it is the last block of its grid
// row; if so, all partials of the group are visible to it. The last block
// resets the counter (counters are zero between launches).
__device__ __forceinline__ bool last_to_arrive(unsigned int* counters, long long g, int* flag) {
    __threadfence();  // this block's partials are visible device-wide first
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) *flag = atomicAdd(&counters[g], 1u) == gridDim.x - 1;
    __syncthreads();
    const bool last = *flag != 0;
    if (last) __threadfence();
    return last;
}

// Where block b's partial of channel c lies in a staging buffer of C *
// gridDim.x values: (C, splits) for channel planes (the lanes of the one
// channel of a block read consecutive partials), (splits, C) for channel
// fastest (the lanes of a row, neighbouring channels, read consecutive
// partials).
struct Staging {
    long long base, step;
    __device__ __forceinline__ long long at(unsigned b) const { return base + b * step; }
};

template <bool CHANNELS_LAST>
__device__ __forceinline__ Staging staging(long long c, long long C) {
    return CHANNELS_LAST ? Staging{c, C} : Staging{c * gridDim.x, 1};
}

// Channel tracking of a flat index: (i, c) = position in its plane and its
// channel; advancing by a stride decomposed as (ti, tc) needs no division.
// I: the index type (unsigned when the walk's indices stay below 2^31:
// i + ti < 2 inner and c + tc < 2 C fit; else long long).
template <typename I>
struct TrackT {
    I i, c;
};
using Track = TrackT<long long>;

// Of flat index p (type P, at least as wide as I).
template <typename I, typename P>
__device__ __forceinline__ TrackT<I> track_at(P p, I C, I inner) {
    const P q = p / static_cast<P>(inner);
    TrackT<I> t;
    t.i = static_cast<I>(p - q * static_cast<P>(inner));
    t.c = static_cast<I>(q % static_cast<P>(C));
    return t;
}

template <typename I>
__device__ __forceinline__ void track_advance(TrackT<I>& t, const TrackT<I>& stride, I C, I inner) {
    t.i += stride.i;
    t.c += stride.c;
    if (t.i >= inner) {
        t.i -= inner;
        ++t.c;
    }
    if (t.c >= C) t.c -= C;
}

// Advance by one element (within a 16-byte vector).
template <typename I>
__device__ __forceinline__ void track_next(TrackT<I>& t, I C, I inner) {
    if (++t.i == inner) {
        t.i = 0;
        if (++t.c == C) t.c = 0;
    }
}

}  // namespace bn
