// Per-channel reductions on a 2-D grid: blockIdx.y walks channel groups
// (blockDim.x channels each), blockIdx.x splits each group's values. Each
// block writes one partial per channel to a staging buffer (C, gridDim.x);
// the last block of a group to arrive merges them and finalizes the
// channel, so no extra per-channel launch is needed.
#pragma once
#include "bn_common.cuh"

// Training statistics: Welford per thread (4 independent accumulators, one
// shared reciprocal of the count per step) around k0, the channel's first value, then Chan merges across warp, block
// and grid. The last block writes the apply coefficients
// (y = (x - k) * scale + shift), the saved mean/invstd, mean - k and M2,
// and updates the running statistics.
template <typename T, typename ACC, typename R, bool CHANNELS_LAST>
__global__ void bn_stats(const T* __restrict__ x,              // (outer, C, inner) contiguous
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
                         ACC* stage_n,                         // (C, gridDim.x) partial counts
                         ACC* stage_m,                         // (C, gridDim.x) partial means (of x - k)
                         ACC* stage_q,                         // (C, gridDim.x) partial M2
                         unsigned int* counters)               // (groups,) zero between launches
{
    __shared__ bn::BlockScratch<ACC> sh;
    const bn::ReduceGrid rg = bn::reduce_grid(C);
    const long long width = rg.width, tx = rg.tx, ty = rg.ty, splits = rg.splits, groups = rg.groups;
    const bn::Walk walk = bn::walk_start(inner);
    for (long long g = blockIdx.y; g < groups; g += gridDim.y) {
        const long long c = g * width + tx;
        const bool active = c < C;
        ACC n[4] = {ACC(0), ACC(0), ACC(0), ACC(0)};
        ACC m[4] = {ACC(0), ACC(0), ACC(0), ACC(0)};
        ACC q[4] = {ACC(0), ACC(0), ACC(0), ACC(0)};
        ACC k0 = ACC(0);
        if (active) {
            k0 = bn::to_acc<ACC>(x[c * inner]);
            long long o = walk.o, i = walk.i;
            while (o < outer) {
                long long oo[4], ii[4];
                ACC v[4];
                oo[0] = o;
                ii[0] = i;
#pragma unroll
                for (int u = 1; u < 4; ++u) {
                    oo[u] = oo[u - 1];
                    ii[u] = ii[u - 1];
                    bn::walk_step(oo[u], ii[u], walk, inner);
                }
#pragma unroll
                for (int u = 0; u < 4; ++u) {  // all loads first: 4 in flight
                    const long long row = oo[u] * C + c;
                    v[u] = oo[u] < outer ? bn::to_acc<ACC>(x[CHANNELS_LAST ? row : row * inner + ii[u]]) - k0
                                         : ACC(0);
                }
                // the 4 accumulators count alike until the last step (where
                // the later ones may be past the end): one division per step
                const ACC r = ACC(1) / (n[0] + ACC(1));
#pragma unroll
                for (int u = 0; u < 4; ++u)
                    if (oo[u] < outer) bn::welford_add_r(n[u], m[u], q[u], v[u], r);
                o = oo[3];
                i = ii[3];
                bn::walk_step(o, i, walk, inner);
            }
            bn::welford_merge(n[0], m[0], q[0], n[1], m[1], q[1]);
            bn::welford_merge(n[2], m[2], q[2], n[3], m[3], q[3]);
            bn::welford_merge(n[0], m[0], q[0], n[2], m[2], q[2]);
        }
        bn::block_reduce<bn::WelfordOp>(n[0], m[0], q[0], sh);
        if (ty == 0 && active) {
            stage_n[c * splits + blockIdx.x] = n[0];
            stage_m[c * splits + blockIdx.x] = m[0];
            stage_q[c * splits + blockIdx.x] = q[0];
        }
        if (bn::last_to_arrive(counters, g, &sh.last)) {
            ACC nn = ACC(0), mm = ACC(0), qq = ACC(0);
            if (active) {
                // volatile: other blocks' partials, never from a stale cache line
                const volatile ACC* sn = stage_n + c * splits;
                const volatile ACC* sm = stage_m + c * splits;
                const volatile ACC* sq = stage_q + c * splits;
                for (long long b = ty; b < splits; b += blockDim.y) bn::welford_merge(nn, mm, qq, sn[b], sm[b], sq[b]);
            }
            bn::block_reduce<bn::WelfordOp>(nn, mm, qq, sh);
            if (ty == 0 && active) {
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
__global__ void bn_bwd_reduce(const T* __restrict__ dy,              // (outer, C, inner) contiguous
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
                              ACC* stage_s,                          // (C, gridDim.x) partial sum(dy)
                              ACC* stage_t,                          // (C, gridDim.x) partial sum(dy * (x - k))
                              unsigned int* counters)                // (groups,) zero between launches
{
    __shared__ bn::BlockScratch<ACC> sh;
    const bn::ReduceGrid rg = bn::reduce_grid(C);
    const long long width = rg.width, tx = rg.tx, ty = rg.ty, splits = rg.splits, groups = rg.groups;
    const bn::Walk walk = bn::walk_start(inner);
    for (long long g = blockIdx.y; g < groups; g += gridDim.y) {
        const long long c = g * width + tx;
        const bool active = c < C;
        ACC s[2] = {ACC(0), ACC(0)};
        ACC t[2] = {ACC(0), ACC(0)};
        ACC k = ACC(0);
        if (active) {
            k = static_cast<ACC>(saved_mean[c]);
            long long o = walk.o, i = walk.i;
            while (o < outer) {
                long long oo[2] = {o, o}, ii[2] = {i, i};
                bn::walk_step(oo[1], ii[1], walk, inner);
                ACC g_[2], d_[2];
#pragma unroll
                for (int u = 0; u < 2; ++u) {
                    const long long row = oo[u] * C + c;
                    const long long p = CHANNELS_LAST ? row : row * inner + ii[u];
                    const bool ok = oo[u] < outer;
                    g_[u] = ok ? bn::to_acc<ACC>(dy[p]) : ACC(0);
                    d_[u] = ok ? bn::to_acc<ACC>(x[p]) - k : ACC(0);
                }
#pragma unroll
                for (int u = 0; u < 2; ++u) {
                    s[u] += g_[u];
                    t[u] += g_[u] * d_[u];
                }
                o = oo[1];
                i = ii[1];
                bn::walk_step(o, i, walk, inner);
            }
        }
        ACC s0 = s[0] + s[1], t0 = t[0] + t[1], unused = ACC(0);
        bn::block_reduce<bn::SumOp>(s0, t0, unused, sh);
        if (ty == 0 && active) {
            stage_s[c * splits + blockIdx.x] = s0;
            stage_t[c * splits + blockIdx.x] = t0;
        }
        if (bn::last_to_arrive(counters, g, &sh.last)) {
            ACC ss = ACC(0), tt = ACC(0);
            unused = ACC(0);
            if (active) {
                const volatile ACC* vs = stage_s + c * splits;
                const volatile ACC* vt = stage_t + c * splits;
                for (long long b = ty; b < splits; b += blockDim.y) {
                    ss += vs[b];
                    tt += vt[b];
                }
            }
            bn::block_reduce<bn::SumOp>(ss, tt, unused, sh);
            if (ty == 0 && active) {
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
