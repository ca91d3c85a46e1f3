// Small stand-in for bnkernels' CUDA kernels, compiled by
// tests/test_kernel_report.py for sm_80 and sm_90 (no GPU needed):
//   scale_vec<T>     16-byte vector global loads and stores (LDG/STG .128)
//   scale_scalar<T>  only 4-byte global accesses
//   block_sum<T>     1 KiB of static shared memory
//   local_array      a per-thread array indexed at run time: local memory
//                    (stack frame, LDL/STL), but no spills
//   spill_prone      register pressure under __launch_bounds__: spills
// The quoted include resolves only through -I, as under cupy.RawModule.
#include "vec_common.cuh"

template <typename T>
__global__ void scale_vec(const T* __restrict__ x, T* __restrict__ y, float a, long long n_vec) {
    using V = typename Vec<T>::type;
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i < n_vec) {
        V v = reinterpret_cast<const V*>(x)[i];
        T* e = reinterpret_cast<T*>(&v);
#pragma unroll
        for (int k = 0; k < Vec<T>::n; ++k) e[k] = T(float(e[k]) * a);
        reinterpret_cast<V*>(y)[i] = v;
    }
}

template <typename T>
__global__ void scale_scalar(const T* x, T* y, float a, long long n) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i < n) y[i] = T(float(x[i]) * a);
}

template <typename T>
__global__ void block_sum(const T* x, float* out, int n) {
    __shared__ float buf[256];
    int i = blockIdx.x * 256 + threadIdx.x;
    buf[threadIdx.x] = i < n ? float(x[i]) : 0.0f;
    __syncthreads();
    for (int s = 128; s > 0; s >>= 1) {
        if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = buf[0];
}

__global__ void local_array(const int* idx, int* y, int n) {
    int hist[64];
    const int t = threadIdx.x;
    for (int k = 0; k < 64; ++k) hist[k] = 0;
    for (int k = 0; k < n; ++k) hist[idx[k * blockDim.x + t] & 63] += 1;
    int s = 0;
    for (int k = 0; k < 64; ++k) s += hist[k] * k;
    y[t] = s;
}

__global__ void __launch_bounds__(1024, 2) spill_prone(const float* __restrict__ x, float* y, int n) {
    float acc[40];
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
#pragma unroll
    for (int k = 0; k < 40; ++k) acc[k] = x[t + k * n];
    for (int r = 0; r < n; ++r) {
#pragma unroll
        for (int k = 0; k < 40; ++k) acc[k] = acc[k] * acc[(k + 7) % 40] + acc[(k + 13) % 40];
    }
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < 40; ++k) s += acc[k] * (k + 1);
    y[t] = s;
}
