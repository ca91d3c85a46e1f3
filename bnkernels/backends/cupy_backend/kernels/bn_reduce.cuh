// Per-channel reductions on a 2-D grid: blockIdx.y walks channel groups
// (blockDim.x channels each), blockIdx.x splits each group's values. Each
// block writes one partial per channel to a staging buffer of C * gridDim.x
// values (bn::staging); the last block of a group to arrive merges them and
// finalizes the channel, so no extra per-channel launch is needed.
#pragma once
#include "bn_common.cuh"
#include "bn_scan.cuh"
#include "bn_accumulators.cuh"

namespace bn {

// The items of the vector walks: 16-byte vectors, except for the statistics
// of half in channel-fastest layouts: there a thread owns every channel of
// its item, 3 registers each, and 8 channels (16 bytes) with 4 items in
// flight spill on sm_80 at 64 registers; 8-byte items of 4 channels, 8 in
// flight, move as many bytes per step.
template <typename T, bool ROWS, bool STATS>
struct ScanItem {
    using type = typename Vec16<T>::type;
    static constexpr int n = Vec16<T>::n;
};
template <>
struct ScanItem<__half, true, true> {
    using type = uint2;
    static constexpr int n = 4;
};
template <>
struct ScanItem<__nv_bfloat16, true, true> {  // as half's: 2-byte values
    using type = uint2;
    static constexpr int n = 4;
};

// Items per step: loads in flight per thread (per array). More would not
// fit in 64 registers (rows: 3 registers per owned channel for statistics;
// the backward sums read 2 arrays).
template <typename Item>
struct StatsUnroll { static constexpr int value = 4; };
template <>
struct StatsUnroll<uint2> { static constexpr int value = 8; };  // 8-byte items: 8 in flight
// single values: 8 per step, one Chan merge for more bytes
template <>
struct StatsUnroll<__half> { static constexpr int value = 8; };
template <>
struct StatsUnroll<__nv_bfloat16> { static constexpr int value = 8; };
template <>
struct StatsUnroll<float> { static constexpr int value = 8; };
template <int NV, bool ROWS>
constexpr int bwd_unroll() { return NV == 1 ? 8 : ROWS && NV >= 8 ? 2 : 4; }  // single values: 8 per array

// Whether this launch reads vectors of N values: the pointers aligned to
// 16 bytes, and every run of every channel starting on a vector boundary
// (planes: inner % N == 0; rows: C % N == 0, and a thread's N channels
// within its group). The same for every block: no divergence.
template <int N, bool ROWS>
__device__ __forceinline__ bool use_vectors(const void* p, long long C, long long inner) {
    return aligned16(p) && (ROWS ? (C % N == 0 && blockDim.x % N == 0) : inner % N == 0);
}

// Whether planes take the split walk (bn_scan.cuh: vector bodies from each
// plane's first 16-byte boundary, masked vector edges): planes with inner %
// N != 0 or a misaligned x (then rounded down to its 16-byte boundary; x
// aligned to its element size), of at least one whole vector whatever
// their first element's position, one plane (and a step past it) within a
// rebased chunk. Else single values.
template <int N, bool ROWS, typename T>
__device__ __forceinline__ bool use_split(const T* p, long long inner) {
    const unsigned long long a = reinterpret_cast<unsigned long long>(p);
    const long long P = static_cast<long long>(gridDim.x) * blockDim.x * blockDim.y;
    return !ROWS && (inner % N != 0 || (a & 15ull) != 0) && a % sizeof(T) == 0 && inner >= 2 * N - 1 &&
           inner + 2 * N <= split_span(P, N);
}

// p, as the compiler cannot see it (not hoisted, not held: recomputed where
// it is used from the kernel's arguments).
template <typename P>
__device__ __forceinline__ void reload(P*& p) {
#ifdef __CUDA_ARCH__
    asm volatile("mov.b64 %0, %0;" : "+l"(p));
#endif
}

// x's elements after the 16-byte boundary below it.
template <typename T>
__device__ __forceinline__ unsigned misalignment(const T* x) {
    return static_cast<unsigned>((reinterpret_cast<unsigned long long>(x) & 15ull) / sizeof(T));
}

// This block's partial statistics of channel c = g * blockDim.x + threadIdx.x
// (n, mean - k0, M2 with k0 = x[c * inner]), valid in threads with
// threadIdx.y == 0; NV values per item (Item: ScanItem's type or T).
template <typename T, typename ACC, bool ROWS, int NV, typename Item, bool SPLIT = false>
__device__ __forceinline__ void stats_partial(const T* x, long long outer, long long C, long long inner,
                                              long long g, ACC& n, ACC& m, ACC& q, BlockScratch<ACC>& sh) {
    constexpr int CH = ROWS ? NV : 1;
    constexpr int U = StatsUnroll<Item>::value;
    const unsigned width = blockDim.x;
    const unsigned lanes = width / CH;  // threads side by side in a row
    const unsigned lin = threadIdx.x + threadIdx.y * width;
    const long long per_block = (width * blockDim.y) / lanes;  // threads per channel per block
    const long long t = blockIdx.x * per_block + lin / lanes, P = gridDim.x * per_block;
    const long long c0 = g * width + (lin % lanes) * CH;  // first channel owned
    ACC a[CH], b[CH], c[CH];
#pragma unroll
    for (int j = 0; j < CH; ++j) a[j] = b[j] = c[j] = ACC(0);
    if (c0 < C) {
        ACC k[CH];
        const Item* first = reinterpret_cast<const Item*>(x + c0 * inner);
        if constexpr (ROWS) {
            unpack<ACC, T, NV>(first[0], k);  // row 0
        } else {
            k[0] = to_acc<ACC>(x[c0 * inner]);
        }
        if constexpr (SPLIT) {  // planes, inner % NV != 0 or misaligned: the split walk (bn_scan.cuh)
            const unsigned mis = misalignment(x);
            StatsScan<T, ACC, Item, NV, false> st(reinterpret_cast<const Item*>(x - mis), k);
            scan_split<NV, U, false>(outer, C, inner, c0 * inner + mis, t, P, st);
            a[0] = st.n;
            b[0] = st.m[0];
            c[0] = st.q[0];
        } else {
        StatsScan<T, ACC, Item, NV, ROWS> st(first, k);
        if constexpr (ROWS)
            scan<U, true>(outer, 1, C / NV, t, P, st);
        else
            scan<U, false>(outer, inner / NV, C * inner / NV, t, P, st);
#pragma unroll
        for (int j = 0; j < CH; ++j) {
            a[j] = st.n;
            b[j] = st.m[j];
            c[j] = st.q[j];
        }
        }
    }
    block_reduce_n<WelfordOp, CH>(a, b, c, sh, lanes);
    n = a[0];
    m = b[0];
    q = c[0];
}

// The same for the backward sums: sum(dy), sum(dy * (x - k)) with k the
// saved mean in ACC.
template <typename T, typename ACC, typename S, bool ROWS, int NV, typename Item, bool SPLIT = false>
__device__ __forceinline__ void bwd_partial(const T* dy, const T* x, const S* saved_mean, long long outer,
                                            long long C, long long inner, long long g, ACC& s, ACC& t,
                                            BlockScratch<ACC>& sh) {
    constexpr int CH = ROWS ? NV : 1;
    constexpr int U = bwd_unroll<NV, ROWS>();
    const unsigned width = blockDim.x;
    const unsigned lanes = width / CH;
    const unsigned lin = threadIdx.x + threadIdx.y * width;
    const long long per_block = (width * blockDim.y) / lanes;
    const long long tt = blockIdx.x * per_block + lin / lanes, P = gridDim.x * per_block;
    const long long c0 = g * width + (lin % lanes) * CH;
    ACC a[CH], b[CH], c[CH];
#pragma unroll
    for (int j = 0; j < CH; ++j) a[j] = b[j] = c[j] = ACC(0);
    if (c0 < C) {
        ACC k[CH];
#pragma unroll
        for (int j = 0; j < CH; ++j) k[j] = static_cast<ACC>(saved_mean[c0 + j]);
        // split: from the tensors' 16-byte boundaries (dy and x equally misaligned)
        const long long base = SPLIT ? -static_cast<long long>(misalignment(x)) : c0 * inner;
        BwdScan<T, ACC, Item, NV, ROWS, U> bs(reinterpret_cast<const Item*>(dy + base),
                                              reinterpret_cast<const Item*>(x + base), k);
        if constexpr (SPLIT) {  // planes, inner % NV != 0 or misaligned: the split walk (bn_scan.cuh)
            scan_split<NV, U, true>(outer, C, inner, c0 * inner - base, tt, P, bs);
        } else if constexpr (ROWS) {
            scan<U, true>(outer, 1, C / NV, tt, P, bs);
        } else {
            scan<U, false>(outer, inner / NV, C * inner / NV, tt, P, bs);
        }
        if constexpr (ROWS) {
#pragma unroll
            for (int j = 0; j < CH; ++j) {
                a[j] = bs.s[j];
                b[j] = bs.t[j];
            }
        } else {
#pragma unroll
            for (int u = 1; u < BwdScan<T, ACC, Item, NV, ROWS, U>::SL; ++u) {
                bs.s[0] += bs.s[u];
                bs.t[0] += bs.t[u];
            }
            a[0] = bs.s[0];
            b[0] = bs.t[0];
        }
    }
    block_reduce_n<SumOp, CH>(a, b, c, sh, lanes);
    s = a[0];
    t = b[0];
}

}  // namespace bn

// Training statistics: per thread, chunks of values reduced around their
// own first value and merged by Chan's formula (bn_scan.cuh: StatsScan),
// relative to k0, the channel's first value; then Chan merges across warp,
// block and grid. The last block writes the apply coefficients
// (y = (x - k) * scale + shift), the saved mean/invstd, mean - k and M2,
// and updates the running statistics.
// __launch_bounds__(1024): at most 64 registers, so that 4 blocks of 256
// threads stay resident per SM (the unrolled loads would take more).
template <typename T, typename ACC, typename R, bool CHANNELS_LAST>
__global__ void __launch_bounds__(1024, 1) bn_stats(const T* __restrict__ x,              // (outer, C, inner) contiguous
                         long long outer, long long C, long long inner,
                         double inv_n,                         // 1 / (outer * inner)
                         double unbias,                        // n / (n - 1)
                         double eps,
                         double factor,                        // momentum (or 1 / batches)
                         const ACC* __restrict__ gamma,        // (C,) or null: 1
                         const ACC* __restrict__ beta,         // (C,) or null: 0
                         R* running_mean,                      // (C,) or null: no update
                         R* running_var,                       // (C,) or null
                         ACC* __restrict__ k_out,              // (C,) shift of the apply pass
                         ACC* __restrict__ scale_out,          // (C,) gamma * invstd
                         ACC* __restrict__ shift_out,          // (C,) beta - (mean - k) * scale
                         ACC* __restrict__ mean_out,           // (C,) saved mean
                         ACC* __restrict__ invstd_out,         // (C,) saved invstd
                         ACC* __restrict__ dmean_out,          // (C,) mean - k
                         ACC* __restrict__ m2_out,             // (C,) sum of squared deviations
                         ACC* stage_n,                         // (C * gridDim.x) partial counts (bn::staging)
                         ACC* stage_m,                         // (C * gridDim.x) partial means (of x - k)
                         ACC* stage_q,                         // (C * gridDim.x) partial M2
                         unsigned int* counters)               // (groups,) zero between launches
{
    __shared__ bn::BlockScratch<ACC> sh;
    const unsigned width = blockDim.x, tx = threadIdx.x, ty = threadIdx.y;
    using Item = bn::ScanItem<T, CHANNELS_LAST, true>;
    for (long long g = blockIdx.y; g * width < C; g += gridDim.y) {
        // the walk, decided per group from the arguments (held through the
        // walks, or hoisted out of this loop, its flags spilled at 64 registers)
        const T* xw = x;
        bn::reload(xw);
        const bool vec = bn::use_vectors<Item::n, CHANNELS_LAST>(xw, C, inner);
        const bool split = !vec && bn::use_split<Item::n, CHANNELS_LAST>(xw, inner);
        const long long c = g * width + tx;
        const bool active = c < C;
        ACC n0, m0, q0;
        if (vec)
            bn::stats_partial<T, ACC, CHANNELS_LAST, Item::n, typename Item::type>(
                x, outer, C, inner, g, n0, m0, q0, sh);
        else if (split)
            bn::stats_partial<T, ACC, CHANNELS_LAST, Item::n, typename Item::type, !CHANNELS_LAST>(
                x, outer, C, inner, g, n0, m0, q0, sh);
        else
            bn::stats_partial<T, ACC, CHANNELS_LAST, 1, T>(x, outer, C, inner, g, n0, m0, q0, sh);
        const bn::Staging st = bn::staging<CHANNELS_LAST>(c, C);
        if (ty == 0 && active) {
            stage_n[st.at(blockIdx.x)] = n0;
            stage_m[st.at(blockIdx.x)] = m0;
            stage_q[st.at(blockIdx.x)] = q0;
        }
        if (bn::last_to_arrive(counters, g, &sh.last)) {
            ACC nn = ACC(0), mm = ACC(0), qq = ACC(0);
            if (active) {
                // volatile: other blocks' partials, never from a stale cache line
                const volatile ACC* sn = stage_n;
                const volatile ACC* sm = stage_m;
                const volatile ACC* sq = stage_q;
                for (unsigned b = ty; b < gridDim.x; b += blockDim.y)
                    bn::welford_merge(nn, mm, qq, sn[st.at(b)], sm[st.at(b)], sq[st.at(b)]);
            }
            bn::block_reduce<bn::WelfordOp>(nn, mm, qq, sh);
            if (ty == 0 && active) {
                const ACC k0 = bn::to_acc<ACC>(x[c * inner]);  // the shift of the partials
                const double var = static_cast<double>(qq) * inv_n;
                const ACC invstd = static_cast<ACC>(1.0 / sqrt(var + eps));
                const ACC gm = gamma ? gamma[c] : ACC(1);
                const ACC bt = beta ? beta[c] : ACC(0);
                const ACC scale = gm * invstd;
                const ACC mean = k0 + mm;
                k_out[c] = k0;
                scale_out[c] = scale;
                shift_out[c] = bt - mm * scale;
                mean_out[c] = mean;
                invstd_out[c] = invstd;
                dmean_out[c] = mm;
                m2_out[c] = qq;
                if (running_mean) {
                    running_mean[c] = static_cast<R>((1.0 - factor) * static_cast<double>(running_mean[c]) +
                                                     factor * static_cast<double>(mean));
                    running_var[c] = static_cast<R>((1.0 - factor) * static_cast<double>(running_var[c]) +
                                                    factor * var * unbias);
                }
            }
            if (tx == 0 && ty == 0) counters[g] = 0u;  // ready for the next launch
        }
        __syncthreads();  // sh.last is reused by the next group
    }
}

// Backward sums: sum(dy) and sum(dy * (x - k)) per channel with k the saved
// mean in ACC; the last block writes dgamma, dbeta and the dx coefficients
// dx = dy * a + (x - k) * b + c. S: the dtype of the saved statistics as the
// forward returned them (float, or double for double input, or double from
// a caller), read in place: no cast before the launch.
template <typename T, typename ACC, typename S, bool CHANNELS_LAST>
__global__ void __launch_bounds__(1024, 1) bn_bwd_reduce(const T* __restrict__ dy,              // (outer, C, inner) contiguous
                              const T* __restrict__ x,               // (outer, C, inner) contiguous
                              long long outer, long long C, long long inner,
                              double inv_n,                          // 1 / (outer * inner)
                              const ACC* __restrict__ gamma,         // (C,) or null: 1
                              const S* __restrict__ saved_mean,      // (C,)
                              const S* __restrict__ saved_invstd,    // (C,)
                              ACC* __restrict__ dgamma,              // (C,) sum(dy * xhat)
                              ACC* __restrict__ dbeta,               // (C,) sum(dy)
                              ACC* __restrict__ k_out,               // (C,) dx coefficients
                              ACC* __restrict__ a_out,               // (C,)
                              ACC* __restrict__ b_out,               // (C,)
                              ACC* __restrict__ c_out,               // (C,)
                              ACC* stage_s,                          // (C * gridDim.x) partial sum(dy)
                              ACC* stage_t,                          // (C * gridDim.x) partial sum(dy * (x - k))
                              unsigned int* counters)                // (groups,) zero between launches
{
    __shared__ bn::BlockScratch<ACC> sh;
    const unsigned width = blockDim.x, tx = threadIdx.x, ty = threadIdx.y;
    using Item = bn::ScanItem<T, CHANNELS_LAST, false>;
    // float (N = 4): not split; at 64 registers the split walk's body spilled
    // (24 bytes on sm_90 with 4 items per array in flight, 52 on sm_80)
    constexpr bool kSplit = !CHANNELS_LAST && Item::n != 4;
    for (long long g = blockIdx.y; g * width < C; g += gridDim.y) {
        const T* xw = x;  // the walk, decided per group (bn_stats)
        bn::reload(xw);
        const bool vec = bn::use_vectors<Item::n, CHANNELS_LAST>(xw, C, inner) && bn::aligned16(dy);
        // dy and x equally misaligned: the same offsets from their boundaries
        const bool split = kSplit && !vec && bn::use_split<Item::n, CHANNELS_LAST>(xw, inner) &&
                           ((reinterpret_cast<unsigned long long>(xw) ^ reinterpret_cast<unsigned long long>(dy)) &
                            15ull) == 0;
        const long long c = g * width + tx;
        const bool active = c < C;
        ACC s0, t0, unused = ACC(0);
        if (vec)
            bn::bwd_partial<T, ACC, S, CHANNELS_LAST, Item::n, typename Item::type>(
                dy, x, saved_mean, outer, C, inner, g, s0, t0, sh);
        else if (split)
            bn::bwd_partial<T, ACC, S, CHANNELS_LAST, Item::n, typename Item::type, kSplit>(
                dy, x, saved_mean, outer, C, inner, g, s0, t0, sh);
        else
            bn::bwd_partial<T, ACC, S, CHANNELS_LAST, 1, T>(dy, x, saved_mean, outer, C, inner, g, s0, t0, sh);
        const bn::Staging st = bn::staging<CHANNELS_LAST>(c, C);
        if (ty == 0 && active) {
            stage_s[st.at(blockIdx.x)] = s0;
            stage_t[st.at(blockIdx.x)] = t0;
        }
        if (bn::last_to_arrive(counters, g, &sh.last)) {
            ACC ss = ACC(0), tt = ACC(0);
            unused = ACC(0);
            if (active) {
                const volatile ACC* vs = stage_s;
                const volatile ACC* vt = stage_t;
                for (unsigned b = ty; b < gridDim.x; b += blockDim.y) {
                    ss += vs[st.at(b)];
                    tt += vt[st.at(b)];
                }
            }
            bn::block_reduce<bn::SumOp>(ss, tt, unused, sh);
            if (ty == 0 && active) {
                const ACC k = static_cast<ACC>(saved_mean[c]);  // the shift of the partials
                const double invstd = static_cast<double>(saved_invstd[c]);
                const double delta = static_cast<double>(saved_mean[c]) - static_cast<double>(k);  // beyond ACC
                const double sum_dy = ss;
                const double sum_dy_xhat = (static_cast<double>(tt) - delta * sum_dy) * invstd;
                const double gm = gamma ? static_cast<double>(gamma[c]) : 1.0;
                const double a = gm * invstd;
                const double b = -a * invstd * sum_dy_xhat * inv_n;
                dgamma[c] = static_cast<ACC>(sum_dy_xhat);
                dbeta[c] = ss;
                k_out[c] = k;
                a_out[c] = static_cast<ACC>(a);
                b_out[c] = static_cast<ACC>(b);
                c_out[c] = static_cast<ACC>(-a * sum_dy * inv_n - b * delta);
            }
            if (tx == 0 && ty == 0) counters[g] = 0u;
        }
        __syncthreads();
    }
}
