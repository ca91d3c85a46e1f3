// Kernels whose __syncthreads() is required. Built with -DDROP_BARRIER it is
// missing, and threads race on shared memory: ThreadSanitizer must report
// the race at the marked lines (the tests find the lines by their markers).
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#include <cuda_fp16.h>
#endif

// Block-local reversal: thread t reads the slot thread (n - 1 - t) wrote.
template <typename T>
__global__ void reverse_block(const T* __restrict__ in, T* __restrict__ out) {
    __shared__ T buf[256];
    const unsigned t = threadIdx.x;
    const unsigned base = blockIdx.x * blockDim.x;
    buf[t] = in[base + t];  // MARK: shared write
#ifndef DROP_BARRIER
    __syncthreads();
#endif
    out[base + t] = buf[blockDim.x - 1 - t];  // MARK: shared read
}

// Block total: warp sums by shuffles, then thread 0 adds the per-warp
// totals. The race is between warps (lane 0 of warp w writes, thread 0
// reads), so it also shows that shuffles do not order memory across warps.
template <typename T>
__global__ void block_total(const T* __restrict__ in, T* __restrict__ out) {
    __shared__ T totals[32];
    const unsigned lane = threadIdx.x % 32u;
    const unsigned warp = threadIdx.x / 32u;
    T v = in[blockIdx.x * blockDim.x + threadIdx.x];
    for (unsigned offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) totals[warp] = v;  // MARK: totals write
#ifndef DROP_BARRIER
    __syncthreads();
#endif
    if (threadIdx.x == 0) {
        T s = T(0);
        for (unsigned w = 0; w < blockDim.x / 32u; ++w) s += totals[w];  // MARK: totals read
        out[blockIdx.x] = s;
    }
}
