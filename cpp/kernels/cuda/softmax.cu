// CUDA scaled, masked softmax over the last dimension of [batch, heads, sq, sk]: one block per row.

#include "common.cuh"

namespace megalith::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// ---- CUDA kernels

__device__ __forceinline__ bool is_masked(const SoftmaxParams& p, int64_t b, int64_t h, int64_t i, int64_t j) {
  if (p.causal && j > i + (p.sk - p.sq)) return true;
  if (p.mask == nullptr) return false;
  return p.mask[b * p.mask_strides[0] + h * p.mask_strides[1] + i * p.mask_strides[2] + j * p.mask_strides[3]] != 0;
}

template <typename T>
__global__ void softmax_forward_kernel(const SoftmaxParams p) {
  const int64_t row = blockIdx.x;
  const int64_t i = row % p.sq, h = (row / p.sq) % p.heads, b = row / (p.sq * p.heads);
  const T* xr = static_cast<const T*>(p.x) + row * p.sk;
  T* yr = static_cast<T*>(p.out) + row * p.sk;
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < p.sk; j += blockDim.x) {
    if (!is_masked(p, b, h, i, j)) m = fmaxf(m, to_f(xr[j]) * p.scale);
  }
  m = block_max(m);
  if (m == -INFINITY) {  // every key masked: zeros, not NaN
    for (int64_t j = threadIdx.x; j < p.sk; j += blockDim.x) yr[j] = from_f<T>(0.0f);
    return;
  }
  float sum = 0.0f;
  for (int64_t j = threadIdx.x; j < p.sk; j += blockDim.x) {
    if (!is_masked(p, b, h, i, j)) sum += expf(to_f(xr[j]) * p.scale - m);
  }
  const float inv = 1.0f / block_sum(sum);
  for (int64_t j = threadIdx.x; j < p.sk; j += blockDim.x) {
    yr[j] = from_f<T>(is_masked(p, b, h, i, j) ? 0.0f : expf(to_f(xr[j]) * p.scale - m) * inv);
  }
}

// dx = scale * y * (dy - sum(dy * y)); p.x holds the saved output y.
template <typename T>
__global__ void softmax_backward_kernel(const SoftmaxParams p) {
  const int64_t row = blockIdx.x;
  const T* yr = static_cast<const T*>(p.x) + row * p.sk;
  const T* dyr = static_cast<const T*>(p.dy) + row * p.sk;
  T* dxr = static_cast<T*>(p.out) + row * p.sk;
  float dot = 0.0f;
  for (int64_t j = threadIdx.x; j < p.sk; j += blockDim.x) dot += to_f(yr[j]) * to_f(dyr[j]);
  dot = block_sum(dot);
  for (int64_t j = threadIdx.x; j < p.sk; j += blockDim.x) {
    dxr[j] = from_f<T>(p.scale * to_f(yr[j]) * (to_f(dyr[j]) - dot));
  }
}

}  // namespace

// ---- kernel launchers

void softmax_forward(const SoftmaxParams& p, void* stream) {
  const int64_t rows = p.batch * p.heads * p.sq;
  check_grid(rows, 2147483647, "batch * heads * sq");
  if (rows == 0 || p.sk == 0) return;
  dispatch(p.dtype, [&](auto tag) {
    softmax_forward_kernel<decltype(tag)><<<static_cast<unsigned>(rows), kThreads, 0, as_stream(stream)>>>(p);
  });
  MEGALITH_CUDA_CHECK(cudaGetLastError());
}

void softmax_backward(const SoftmaxParams& p, void* stream) {
  const int64_t rows = p.batch * p.heads * p.sq;
  check_grid(rows, 2147483647, "batch * heads * sq");
  if (rows == 0 || p.sk == 0) return;
  dispatch(p.dtype, [&](auto tag) {
    softmax_backward_kernel<decltype(tag)><<<static_cast<unsigned>(rows), kThreads, 0, as_stream(stream)>>>(p);
  });
  MEGALITH_CUDA_CHECK(cudaGetLastError());
}

}  // namespace megalith::kernels::cuda
