// CUDA cross-entropy: per-token loss and log-sum-exp, the vocab-parallel partials (one block per row), and
// the backward pass (elementwise, from the saved log-sum-exp).

#include "common.cuh"

namespace megalith::kernels::cuda {
namespace {

constexpr int kThreads = 512;

// ---- CUDA kernels

template <typename T>
__global__ void cross_entropy_forward_kernel(const CrossEntropyParams p, bool partials) {
  const int64_t row = blockIdx.x;
  const T* xr = static_cast<const T*>(p.logits) + row * p.cols;
  float m = -INFINITY, sum = 0.0f;
  for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) {
    const float v = to_f(xr[c]);
    m = fmaxf(m, v);
    sum += v;
  }
  m = block_max(m);
  sum = block_sum(sum);
  float se = 0.0f;
  for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) se += expf(to_f(xr[c]) - m);
  se = block_sum(se);
  if (threadIdx.x != 0) return;
  const int64_t t = p.target[row];
  const bool ignored = t == p.ignore_index;
  const int64_t local = t - p.vocab_start;
  const float target_logit = (!ignored && local >= 0 && local < p.cols) ? to_f(xr[local]) : 0.0f;
  if (partials) {
    p.local_max[row] = m;
    p.local_sumexp[row] = se;
    p.target_logit[row] = target_logit;
    p.sum_logits[row] = sum;
    return;
  }
  const float lse = m + logf(se);
  p.lse[row] = lse;
  if (ignored) {
    p.loss[row] = 0.0f;
  } else if (t < 0 || t >= p.vocab_total) {
    p.loss[row] = NAN;  // an out-of-range target cannot raise from the device; it poisons the loss instead
  } else {
    const float eps = p.label_smoothing;
    p.loss[row] = (1.0f - eps) * (lse - target_logit) + eps * (lse - sum / static_cast<float>(p.vocab_total));
  }
}

template <typename T>
__global__ void cross_entropy_backward_kernel(const CrossEntropyParams p) {
  const auto* x = static_cast<const T*>(p.logits);
  auto* dx = static_cast<T*>(p.dlogits);
  const int64_t n = p.rows * p.cols;
  const float eps = p.label_smoothing, uniform = eps / static_cast<float>(p.vocab_total);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / p.cols, c = i % p.cols, t = p.target[r];
    if (t == p.ignore_index) {
      dx[i] = from_f<T>(0.0f);
      continue;
    }
    float g = expf(to_f(x[i]) - p.lse_in[r]) - uniform;
    if (c + p.vocab_start == t) g -= 1.0f - eps;
    dx[i] = from_f<T>(g * p.dloss[r]);
  }
}

void launch_forward(const CrossEntropyParams& p, void* stream, bool partials) {
  check_grid(p.rows, 2147483647, "rows");
  if (p.rows == 0) return;
  dispatch(p.dtype, [&](auto tag) {
    cross_entropy_forward_kernel<decltype(tag)>
        <<<static_cast<unsigned>(p.rows), kThreads, 0, as_stream(stream)>>>(p, partials);
  });
  MEGALITH_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

// ---- kernel launchers

void cross_entropy_forward(const CrossEntropyParams& p, void* stream) { launch_forward(p, stream, false); }

void cross_entropy_partials(const CrossEntropyParams& p, void* stream) { launch_forward(p, stream, true); }

void cross_entropy_backward(const CrossEntropyParams& p, void* stream) {
  const int64_t n = p.rows * p.cols;
  if (n == 0) return;
  dispatch(p.dtype, [&](auto tag) {
    cross_entropy_backward_kernel<decltype(tag)><<<grid_for(n, 256), 256, 0, as_stream(stream)>>>(p);
  });
  MEGALITH_CUDA_CHECK(cudaGetLastError());
}

}  // namespace megalith::kernels::cuda
