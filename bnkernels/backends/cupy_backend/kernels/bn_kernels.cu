// Batch-normalization kernels of the CuPy backend, compiled with NVRTC by
// cupy.RawModule (name expressions: bnkernels/backends/cupy_backend/sources.py).
//
//   bn_stats<T, ACC, R, CHANNELS_LAST>   training statistics + fused finalize
//   bn_apply<T, ACC>                     y = (x - k) * scale + shift [ReLU]
//   bn_apply_residual<T, ACC>            y = (x - k) * scale + shift + z [ReLU]
//   bn_infer_coeffs<ACC, R>              inference coefficients from running stats
//   bn_bwd_reduce<T, ACC, CHANNELS_LAST> backward sums + dx coefficients
//   bn_dx<T, ACC>                        dx = dy * a + (x - k) * b + c
//   bn_relu_backward<T>                  g = dy, 0 where y <= 0 (through a ReLU)
//
// T: storage (__half, __nv_bfloat16, float, double); ACC: accumulation
// (float for half, bfloat16 and float, double for double); R:
// running-statistics dtype (float, double).
#include "bn_common.cuh"
#include "bn_reduce.cuh"
#include "bn_elementwise.cuh"
