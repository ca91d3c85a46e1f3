// Shared pieces of the batch-norm kernels: conversions, Welford/Chan merges,
// warp+block reductions, the grid-level last-block protocol, index walks.
//
// Layout: every kernel sees a contiguous input as the canonical view
// (outer, C, inner); "planes" kernels handle inner > 1 (NCHW-like),
// "rows" kernels inner == 1 (NHWC, 2-D). All indices are 64-bit.
#pragma once
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#include <cuda_fp16.h>
#endif

namespace bn {

constexpr unsigned kWarp = 32;
constexpr unsigned kMaxWarps = 32;  // 1024 threads per block at most
constexpr unsigned kFullMask = 0xffffffffu;

// ---- storage <-> accumulator conversions (half accumulates in float) ------
template <typename ACC, typename T>
__device__ __forceinline__ ACC to_acc(T v) { return static_cast<ACC>(v); }
template <>
__device__ __forceinline__ float to_acc<float, __half>(__half v) { return __half2float(v); }

template <typename T, typename ACC>
__device__ __forceinline__ T from_acc(ACC v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float v) { return __float2half_rn(v); }

// ---- 16-byte vectors of each storage type ---------------------------------
template <typename T> struct Vec16;
template <> struct Vec16<float> { using type = float4; static constexpr int n = 4; };
template <> struct Vec16<double> { using type = double2; static constexpr int n = 2; };
template <> struct Vec16<__half> { using type = uint4; static constexpr int n = 8; };

// ---- Welford / Chan ---------------------------------------------------------
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
    const ACC r = nb / total;
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

// Reduce a triple over the ty lanes of each tx column of a 2-D block: warp
// shuffles (lanes lane and lane + offset hold the same channel while offset
// >= blockDim.x), then shared memory across warps. The result is valid in
// threads with threadIdx.y == 0. Every thread of the block must call it
// (barriers); blockDim.x is a power of two <= 32, the block a whole number
// of warps.
template <typename Op, typename ACC>
__device__ __forceinline__ void block_reduce(ACC& a, ACC& b, ACC& c, BlockScratch<ACC>& sh) {
    const unsigned width = blockDim.x;
    const unsigned lin = threadIdx.x + threadIdx.y * width;
    const unsigned lane = lin % kWarp;
    const unsigned warp = lin / kWarp;
    const unsigned nwarps = (width * blockDim.y) / kWarp;
    for (unsigned offset = kWarp / 2; offset >= width; offset /= 2) {
        const ACC a2 = __shfl_down_sync(kFullMask, a, offset);
        const ACC b2 = __shfl_down_sync(kFullMask, b, offset);
        const ACC c2 = __shfl_down_sync(kFullMask, c, offset);
        Op::merge(a, b, c, a2, b2, c2);
    }
    if (lane < width) {
        sh.a[warp][lane] = a;
        sh.b[warp][lane] = b;
        sh.c[warp][lane] = c;
    }
    __syncthreads();
    if (warp == 0 && lane < width) {
        a = sh.a[0][lane];
        b = sh.b[0][lane];
        c = sh.c[0][lane];
        for (unsigned w = 1; w < nwarps; ++w) Op::merge(a, b, c, sh.a[w][lane], sh.b[w][lane], sh.c[w][lane]);
    }
    __syncthreads();  // the shared slots may be reused after this
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

// Where this thread starts walking its channel's values and its stride, in
// (o, i) coordinates of the (outer, inner) plane: values j0, j0 + S, ...
// with j0 = blockIdx.x * blockDim.y + threadIdx.y, S = gridDim.x * blockDim.y.
struct Walk {
    long long o, i, so, si;
};

// The geometry of a reduction block: blockDim.x channels per group (tx is
// this thread's), groups along gridDim.y, splits along gridDim.x.
struct ReduceGrid {
    long long width, tx, ty, splits, groups;
};

__device__ __forceinline__ ReduceGrid reduce_grid(long long C) {
    ReduceGrid r;
    r.width = blockDim.x;
    r.tx = threadIdx.x;
    r.ty = threadIdx.y;
    r.splits = gridDim.x;
    r.groups = (C + r.width - 1) / r.width;
    return r;
}

__device__ __forceinline__ Walk walk_start(long long inner) {
    const long long S = static_cast<long long>(gridDim.x) * blockDim.y;
    const long long j0 = static_cast<long long>(blockIdx.x) * blockDim.y + threadIdx.y;
    Walk w;
    w.o = j0 / inner;
    w.i = j0 - w.o * inner;
    w.so = S / inner;
    w.si = S - w.so * inner;
    return w;
}

__device__ __forceinline__ void walk_step(long long& o, long long& i, const Walk& w, long long inner) {
    i += w.si;
    o += w.so;
    if (i >= inner) {
        i -= inner;
        ++o;
    }
}

// Channel tracking of a flat index: (i, c) = position in its plane and its
// channel; advancing by a stride decomposed as (ti, tc) needs no division.
struct Track {
    long long i, c;
};

__device__ __forceinline__ Track track_at(long long p, long long C, long long inner) {
    const long long q = p / inner;
    Track t;
    t.i = p - q * inner;
    t.c = q % C;
    return t;
}

__device__ __forceinline__ void track_advance(Track& t, const Track& stride, long long C, long long inner) {
    t.i += stride.i;
    t.c += stride.c;
    if (t.i >= inner) {
        t.i -= inner;
        ++t.c;
    }
    if (t.c >= C) t.c -= C;
}

// Advance by one element (within a 16-byte vector).
__device__ __forceinline__ void track_next(Track& t, long long C, long long inner) {
    if (++t.i == inner) {
        t.i = 0;
        if (++t.c == C) t.c = 0;
    }
}

}  // namespace bn
