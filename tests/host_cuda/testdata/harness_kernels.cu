// Small CUDA kernels that exercise tests/host_cuda/cuda_host.h. Written as
// CUDA C++ for NVRTC (they would compile there unchanged); on the host they
// rely on cuda_host.h for every CUDA name.
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#include <cuda_fp16.h>
#endif

#define FULL_MASK 0xffffffffu

// --- Block reduction: warp shuffles + shared memory + __syncthreads --------
// partial[blockIdx.x] = sum of x[i] over a grid-stride loop. Works for any
// blockDim.x <= 1024, including a partial last warp: a lane adds what it
// received only if the source lane exists (the shuffle itself is done with
// the full mask by every lane, which CUDA allows for exited/absent lanes).
template <typename T>
__device__ __forceinline__ T warp_sum(T v, unsigned lanes_in_warp) {
    const unsigned lane = threadIdx.x % 32u;
    for (unsigned offset = 16; offset > 0; offset /= 2) {
        const T other = __shfl_down_sync(FULL_MASK, v, offset);
        if (lane + offset < lanes_in_warp) v += other;
    }
    return v;
}

template <typename T>
__global__ void block_sum(const T* __restrict__ x, T* __restrict__ partial, long long n) {
    __shared__ T warp_totals[32];
    const unsigned lane = threadIdx.x % 32u;
    const unsigned warp = threadIdx.x / 32u;
    const unsigned nwarps = (blockDim.x + 31u) / 32u;
    const unsigned lanes_in_warp = blockDim.x - warp * 32u < 32u ? blockDim.x - warp * 32u : 32u;

    T v = T(0);
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        v += x[i];
    v = warp_sum(v, lanes_in_warp);
    if (lane == 0) warp_totals[warp] = v;
    __syncthreads();
    if (warp == 0) {
        // Only slots [0, nwarps) were written; the others hold garbage
        // (poison on the host), so they must not be read.
        v = lane < nwarps ? warp_totals[lane] : T(0);
        if (blockDim.x >= 32) {
            // warp 0 is complete: xor butterfly, every lane ends with the sum
            for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(FULL_MASK, v, m);
        } else {
            v = warp_sum(v, lanes_in_warp);  // a single, partial warp
        }
        if (lane == 0) partial[blockIdx.x] = v;
    }
}

// --- Raw shuffles: what each lane receives ----------------------------------
// out[k*n + t] for k = 0 down(delta), 1 up(delta), 2 xor(delta), 3 idx(delta),
// 4 down(delta, width 8), 5 xor(delta, width 8), 6 idx(delta, width 8).
template <typename T>
__global__ void shuffle_lanes(const T* in, T* out, int delta) {
    const unsigned t = threadIdx.x;
    const unsigned n = blockDim.x;
    const T v = in[t];
    out[0 * n + t] = __shfl_down_sync(FULL_MASK, v, (unsigned)delta);
    out[1 * n + t] = __shfl_up_sync(FULL_MASK, v, (unsigned)delta);
    out[2 * n + t] = __shfl_xor_sync(FULL_MASK, v, delta);
    out[3 * n + t] = __shfl_sync(FULL_MASK, v, delta);
    out[4 * n + t] = __shfl_down_sync(FULL_MASK, v, (unsigned)delta, 8);
    out[5 * n + t] = __shfl_xor_sync(FULL_MASK, v, delta, 8);
    out[6 * n + t] = __shfl_sync(FULL_MASK, v, delta, 8);
}

// Two half-warps shuffle independently with disjoint masks.
__global__ void half_warp_groups(const float* in, float* out) {
    const unsigned lane = threadIdx.x % 32u;
    const unsigned mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
    out[threadIdx.x] = __shfl_sync(mask, in[threadIdx.x], 0, 16);
}

// --- Built-in variables and atomics ------------------------------------------
// ids[linear global thread] = (block linear << 16) | thread linear;
// counters[0] counts blocks, counters[1] threads; order[block] = arrival
// rank of the block; last[0] = linear id of the block that saw itself last.
__global__ void count_blocks(unsigned* ids, unsigned* counters, unsigned* order, unsigned* last,
                             unsigned* dims) {
    const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const unsigned per_block = blockDim.x * blockDim.y * blockDim.z;
    ids[block * per_block + tid] = (block << 16) | tid;
    atomicAdd(&counters[1], 1u);
    __syncthreads();
    if (tid == 0) {
        __threadfence();
        const unsigned rank = atomicAdd(&counters[0], 1u);
        order[block] = rank;
        if (rank == gridDim.x * gridDim.y * gridDim.z - 1) last[0] = block;
        if (block == 0) {
            dims[0] = gridDim.x; dims[1] = gridDim.y; dims[2] = gridDim.z;
            dims[3] = blockDim.x; dims[4] = blockDim.y; dims[5] = blockDim.z;
        }
    }
}

// --- Half precision ------------------------------------------------------------
__global__ void half_to_float(const __half* in, float* out, unsigned n) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        out[i] = __half2float(in[i]);
}

__global__ void float_to_half(const float* in, __half* out, unsigned n) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        out[i] = __float2half_rn(in[i]);
}

// Swaps the halves of each pair through __half2; n2 = number of pairs.
__global__ void swap_half2(const __half* in, __half* out, unsigned n2) {
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n2) {
        const __half2 p = reinterpret_cast<const __half2*>(in)[i];
        reinterpret_cast<__half2*>(out)[i] = __halves2half2(__high2half(p), __low2half(p));
    }
}

// --- Vector loads and stores -----------------------------------------------------
// out = a * in + b with float4 loads/stores for the bulk and a scalar tail.
__global__ void axpb_float4(const float* __restrict__ in, float* __restrict__ out, float a,
                            float b, unsigned n) {
    const unsigned n4 = n / 4;
    const unsigned stride = gridDim.x * blockDim.x;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += stride) {
        float4 v = reinterpret_cast<const float4*>(in)[i];
        v.x = fma(a, v.x, b); v.y = fma(a, v.y, b); v.z = fma(a, v.z, b); v.w = fma(a, v.w, b);
        reinterpret_cast<float4*>(out)[i] = v;
    }
    for (unsigned i = 4 * n4 + blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = fma(a, in[i], b);
}

// Copies bytes through every vector type: n16 = number of 16-byte chunks.
__global__ void vector_copy(const unsigned* in, unsigned* out, unsigned n16) {
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n16) return;
    switch (i % 4) {
    case 0: reinterpret_cast<uint4*>(out)[i] = reinterpret_cast<const uint4*>(in)[i]; break;
    case 1: reinterpret_cast<double2*>(out)[i] = reinterpret_cast<const double2*>(in)[i]; break;
    case 2: {
        const uint2* s = reinterpret_cast<const uint2*>(in) + 2 * i;
        uint2* d = reinterpret_cast<uint2*>(out) + 2 * i;
        d[0] = s[0]; d[1] = s[1];
        break;
    }
    default: {
        const float2* s = reinterpret_cast<const float2*>(in) + 2 * i;
        float2* d = reinterpret_cast<float2*>(out) + 2 * i;
        d[0] = s[0]; d[1] = s[1];
    }
    }
}

// --- Scalars, null pointers, math ---------------------------------------------------
__global__ void scalars(long long a, int b, unsigned c, double d, float e, double* out,
                        const float* maybe_null) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    out[0] = (double)a; out[1] = (double)b; out[2] = (double)c; out[3] = d; out[4] = (double)e;
    out[5] = maybe_null == nullptr ? -1.0 : (double)maybe_null[0];
    out[6] = rsqrt(d);
    out[7] = (double)rsqrt(e);
    out[8] = sqrt(d);
    out[9] = (double)fmaxf(e, 2.0f);
}

// --- Misuse that the harness reports ---------------------------------------------------
// Thread 3 leaves before the barrier the others wait at.
__global__ void divergent_barrier(float* out) {
    if (threadIdx.x == 3) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

// Lane 5 is not in the mask it passes.
__global__ void bad_mask(float* out) {
    out[threadIdx.x] = __shfl_down_sync(0x0000000fu, 1.0f, 1);
}

// Thread 0 waits at __syncthreads while the other lanes of its warp wait for
// it in a shuffle: hangs on a GPU; the host watchdog aborts.
__global__ void deadlock(float* out) {
    if (threadIdx.x == 0) __syncthreads();
    else out[threadIdx.x] = __shfl_sync(FULL_MASK, 1.0f, 0);
}

// Reads shared memory it never wrote: returns the poison bytes, then writes
// the block index so a later block would see it if nothing re-poisoned.
__global__ void read_uninitialised_shared(unsigned* out) {
    __shared__ unsigned scratch[64];
    const unsigned t = threadIdx.x;
    out[blockIdx.x * blockDim.x + t] = scratch[t];
    __syncthreads();
    scratch[t] = blockIdx.x;
}
