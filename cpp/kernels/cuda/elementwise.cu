// CUDA rotary embedding, SwiGLU and bias-GeLU, forward and backward: grid-stride elementwise kernels.

#include "common.cuh"

namespace megalith::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// ---- CUDA kernels

// Each thread writes one output element; its rotation partner is read from x.
template <typename T>
__global__ void rope_kernel(const RopeParams p, int64_t n) {
  const auto* x = static_cast<const T*>(p.x);
  auto* out = static_cast<T*>(p.out);
  const int64_t half = p.rot_dim / 2;
  const float sign = p.inverse ? -1.0f : 1.0f;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = idx % p.dim;
    if (d >= p.rot_dim) {
      out[idx] = x[idx];
      continue;
    }
    const int64_t s = (idx / (p.dim * p.heads)) % p.seq;
    // first: whether d is the first element of its pair; i: the pair's frequency index; partner's offset.
    bool first;
    int64_t i, partner;
    if (p.interleaved) {
      first = (d % 2) == 0, i = d / 2, partner = first ? 1 : -1;
    } else {
      first = d < half, i = first ? d : d - half, partner = first ? half : -half;
    }
    const float c = p.cos[s * half + i], sn = sign * p.sin[s * half + i];
    const float self = to_f(x[idx]), other = to_f(x[idx + partner]);
    out[idx] = from_f<T>(first ? self * c - other * sn : self * c + other * sn);
  }
}

__device__ __forceinline__ float sigmoidf(float v) { return 1.0f / (1.0f + expf(-v)); }

template <typename T>
__global__ void swiglu_kernel(const SwigluParams p, bool backward) {
  const auto* g = static_cast<const T*>(p.gate);
  const auto* u = static_cast<const T*>(p.up);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float gv = to_f(g[i]), uv = to_f(u[i]), sg = sigmoidf(gv);
    if (!backward) {
      static_cast<T*>(p.out)[i] = from_f<T>(gv * sg * uv);
      continue;
    }
    const float dv = to_f(static_cast<const T*>(p.dout)[i]);
    static_cast<T*>(p.dup)[i] = from_f<T>(dv * gv * sg);
    static_cast<T*>(p.dgate)[i] = from_f<T>(dv * uv * sg * (1.0f + gv * (1.0f - sg)));
  }
}

__device__ __forceinline__ float gelu_value(float v, bool tanh_approx, bool grad) {
  constexpr float kSqrt2OverPi = 0.7978845608028654f, kInvSqrt2 = 0.7071067811865476f;
  constexpr float kInvSqrt2Pi = 0.3989422804014327f;
  if (tanh_approx) {
    const float t = tanhf(kSqrt2OverPi * (v + 0.044715f * v * v * v));
    if (!grad) return 0.5f * v * (1.0f + t);
    return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * 0.044715f * v * v);
  }
  const float cdf = 0.5f * (1.0f + erff(v * kInvSqrt2));
  return grad ? cdf + v * kInvSqrt2Pi * expf(-0.5f * v * v) : v * cdf;
}

template <typename T>
__global__ void bias_gelu_kernel(const GeluParams p, bool backward) {
  const auto* x = static_cast<const T*>(p.x);
  const auto* b = static_cast<const T*>(p.bias);
  auto* out = static_cast<T*>(p.out);
  const int64_t n = p.rows * p.cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = to_f(x[i]);
    if (b != nullptr) v += to_f(b[i % p.cols]);
    const float g = gelu_value(v, p.tanh_approx, backward);
    out[i] = from_f<T>(backward ? to_f(static_cast<const T*>(p.dout)[i]) * g : g);
  }
}

}  // namespace

// ---- kernel launchers

void rope(const RopeParams& p, void* stream) {
  MEGALITH_CHECK(p.rot_dim % 2 == 0 && p.rot_dim <= p.dim, "rope: rot_dim ", p.rot_dim, " must be even and <= ",
                 p.dim);
  const int64_t n = p.batch * p.seq * p.heads * p.dim;
  if (n == 0) return;
  dispatch(p.dtype, [&](auto tag) {
    rope_kernel<decltype(tag)><<<grid_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(p, n);
  });
  MEGALITH_CUDA_CHECK(cudaGetLastError());
}

void swiglu_forward(const SwigluParams& p, void* stream) {
  if (p.n == 0) return;
  dispatch(p.dtype, [&](auto tag) {
    swiglu_kernel<decltype(tag)><<<grid_for(p.n, kThreads), kThreads, 0, as_stream(stream)>>>(p, false);
  });
  MEGALITH_CUDA_CHECK(cudaGetLastError());
}

void swiglu_backward(const SwigluParams& p, void* stream) {
  if (p.n == 0) return;
  dispatch(p.dtype, [&](auto tag) {
    swiglu_kernel<decltype(tag)><<<grid_for(p.n, kThreads), kThreads, 0, as_stream(stream)>>>(p, true);
  });
  MEGALITH_CUDA_CHECK(cudaGetLastError());
}

void bias_gelu_forward(const GeluParams& p, void* stream) {
  const int64_t n = p.rows * p.cols;
  if (n == 0) return;
  dispatch(p.dtype, [&](auto tag) {
    bias_gelu_kernel<decltype(tag)><<<grid_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(p, false);
  });
  MEGALITH_CUDA_CHECK(cudaGetLastError());
}

void bias_gelu_backward(const GeluParams& p, void* stream) {
  const int64_t n = p.rows * p.cols;
  if (n == 0) return;
  dispatch(p.dtype, [&](auto tag) {
    bias_gelu_kernel<decltype(tag)><<<grid_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(p, true);
  });
  MEGALITH_CUDA_CHECK(cudaGetLastError());
}

}  // namespace megalith::kernels::cuda
