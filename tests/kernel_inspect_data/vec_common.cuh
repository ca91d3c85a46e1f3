// Helpers for vec_kernels.cu (a test fixture of tests/test_kernel_report.py).
#pragma once
#include <cuda_fp16.h>

template <typename T> struct Vec;            // 16 bytes of T
template <> struct Vec<float> { using type = float4; static constexpr int n = 4; };
template <> struct Vec<__half> { using type = uint4; static constexpr int n = 8; };
