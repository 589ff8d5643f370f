// Shared pieces of the CUDA kernels: error checks that throw, dtype conversion, a dtype dispatcher and
// warp/block reductions. Every kernel computes in float32 whatever its storage type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "megalith/error.h"
#include "megalith/kernels.h"

namespace megalith::kernels::cuda {

// Throws std::runtime_error (a Python RuntimeError) naming the failed call; never exits the process.
[[noreturn]] void throw_cuda_error(cudaError_t status, const char* what, const char* file, int line);

#define MEGALITH_CUDA_CHECK(expr)                                                                   \
  do {                                                                                              \
    const cudaError_t megalith_status_ = (expr);                                                    \
    if (megalith_status_ != cudaSuccess) {                                                          \
      ::megalith::kernels::cuda::throw_cuda_error(megalith_status_, #expr, __FILE__, __LINE__);     \
    }                                                                                               \
  } while (0)

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

constexpr int kWarp = 32;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Calls fn(T{}) with T = float, __half or __nv_bfloat16 for the runtime dtype.
template <typename Fn>
void dispatch(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      fn(float{});
      return;
    case DType::kFloat16:
      fn(__half{});
      return;
    case DType::kBFloat16:
      fn(__nv_bfloat16{});
      return;
  }
  fail("unsupported dtype code ", static_cast<int>(dtype));
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Sum (or max) over the whole block; every thread gets the result. blockDim.x must be a multiple of 32.
template <bool kMax>
__device__ float block_reduce(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, num_warps = blockDim.x / kWarp;
  v = kMax ? warp_max(v) : warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const float identity = kMax ? -INFINITY : 0.0f;
  v = threadIdx.x < num_warps ? partial[threadIdx.x] : identity;
  if (warp == 0) v = kMax ? warp_max(v) : warp_sum(v);
  if (threadIdx.x == 0) partial[0] = v;
  __syncthreads();
  const float result = partial[0];
  __syncthreads();  // the next call may overwrite `partial`
  return result;
}

__device__ __forceinline__ float block_sum(float v) { return block_reduce<false>(v); }
__device__ __forceinline__ float block_max(float v) { return block_reduce<true>(v); }

// Grid size for a grid-stride loop over n items with `threads` per block (capped; the loop covers the rest).
inline unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 * 8 ? 65535 * 8 : blocks));
}

// Checks that a count fits a grid dimension (2^31 - 1 blocks in x, 65535 in y/z).
inline void check_grid(int64_t n, int64_t limit, const char* what) {
  MEGALITH_CHECK(n <= limit, what, " (", n, ") is too large for one launch (limit ", limit, ")");
}

}  // namespace megalith::kernels::cuda
