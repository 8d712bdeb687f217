// Shared helpers of the a2r-kernels CUDA backend: dtype codes and conversions, warp reductions,
// launch error checks. Header-only; included by every .cu file of csrc/.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "ops.h"

namespace a2r {

// ------------------------------------------------------------------------------------ errors
inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("a2r_kernels._C: ") + what + " failed: " +
                             cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")");
  }
}

// The extension links its own (static) CUDA runtime, so it cannot rely on torch having made the
// tensors' device current in *this* runtime: make it current before launching.
inline void set_device(int device) {
  int current = -1;
  check_cuda(cudaGetDevice(&current), "cudaGetDevice");
  if (current != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
}

// Launch errors (bad configuration, no device, no kernel image for this GPU) surface here.
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

// ------------------------------------------------------------------------------------ dtypes
template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two consecutive elements as float2 (one 4-byte load for 16-bit types, one 8-byte load for
// fp32). `ptr` must be aligned to 2 elements.
template <typename T>
__device__ __forceinline__ float2 load_float2(const T* ptr);
template <>
__device__ __forceinline__ float2 load_float2<float>(const float* ptr) {
  return *reinterpret_cast<const float2*>(ptr);
}
template <>
__device__ __forceinline__ float2 load_float2<__half>(const __half* ptr) {
  return __half22float2(*reinterpret_cast<const __half2*>(ptr));
}
template <>
__device__ __forceinline__ float2 load_float2<__nv_bfloat16>(const __nv_bfloat16* ptr) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(ptr));
}

// Run `body.template operator()<T>()` with T the C++ type of `dtype`.
#define A2R_DISPATCH_FLOAT(dtype, NAME, T, ...)                                              \
  switch (dtype) {                                                                           \
    case DType::kFloat32: {                                                                  \
      using T = float;                                                                       \
      __VA_ARGS__;                                                                           \
      break;                                                                                 \
    }                                                                                        \
    case DType::kFloat16: {                                                                  \
      using T = __half;                                                                      \
      __VA_ARGS__;                                                                           \
      break;                                                                                 \
    }                                                                                        \
    case DType::kBFloat16: {                                                                 \
      using T = __nv_bfloat16;                                                               \
      __VA_ARGS__;                                                                           \
      break;                                                                                 \
    }                                                                                        \
    default:                                                                                 \
      throw std::invalid_argument(std::string(NAME) + ": dtype must be float32, float16 or " \
                                  "bfloat16");                                               \
  }

// ------------------------------------------------------------------------------------ math
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

__device__ __forceinline__ int warp_sum_int(int x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

}  // namespace a2r
