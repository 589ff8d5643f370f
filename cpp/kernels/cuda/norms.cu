// CUDA RMSNorm and LayerNorm over the last dimension: one block per row, float32 statistics.

#include "common.cuh"

namespace megalith::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWeightRowSplits = 64;  // row slabs summed with atomics into dweight/dbias

// ---- CUDA kernels

template <typename T>
__global__ void norm_forward_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                                    T* __restrict__ out, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                    int64_t cols, float eps, bool rms, float shift) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * cols;
  float mean = 0.0f;
  if (!rms) {
    float sum = 0.0f;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) sum += to_f(xr[c]);
    mean = block_sum(sum) / static_cast<float>(cols);
  }
  float sq = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float d = to_f(xr[c]) - mean;
    sq += d * d;
  }
  const float rstd = rsqrtf(block_sum(sq) / static_cast<float>(cols) + eps);
  T* yr = out + row * cols;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    float y = (to_f(xr[c]) - mean) * rstd * (to_f(w[c]) + shift);
    if (b != nullptr) y += to_f(b[c]);
    yr[c] = from_f<T>(y);
  }
  if (threadIdx.x == 0) {
    rstd_out[row] = rstd;
    if (mean_out != nullptr) mean_out[row] = mean;
  }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * scale (RMSNorm drops the mean(g) term).
template <typename T>
__global__ void norm_backward_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                        const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                        T* __restrict__ dx, int64_t cols, bool rms, float shift) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * cols;
  const T* dyr = dy + row * cols;
  const float mean = rms ? 0.0f : mean_in[row], rstd = rstd_in[row];
  float sum_g = 0.0f, sum_gx = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float g = to_f(dyr[c]) * (to_f(w[c]) + shift);
    sum_g += g;
    sum_gx += g * (to_f(xr[c]) - mean) * rstd;
  }
  const float mean_g = rms ? 0.0f : block_sum(sum_g) / static_cast<float>(cols);
  const float mean_gx = block_sum(sum_gx) / static_cast<float>(cols);
  T* dxr = dx + row * cols;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float g = to_f(dyr[c]) * (to_f(w[c]) + shift);
    const float xhat = (to_f(xr[c]) - mean) * rstd;
    dxr[c] = from_f<T>(rstd * (g - mean_g - xhat * mean_gx));
  }
}

// dweight[c] += sum over a slab of rows of dy * xhat, dbias[c] += sum of dy. Grid: (column blocks, slabs).
template <typename T>
__global__ void norm_backward_dw_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                        const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                        float* __restrict__ dw, float* __restrict__ db, int64_t rows, int64_t cols,
                                        bool rms) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  const int64_t per_slab = (rows + gridDim.y - 1) / gridDim.y;
  const int64_t r0 = blockIdx.y * per_slab, r1 = min(rows, r0 + per_slab);
  float sw = 0.0f, sb = 0.0f;
  for (int64_t r = r0; r < r1; ++r) {
    const float d = to_f(dy[r * cols + c]);
    const float mean = rms ? 0.0f : mean_in[r];
    sw += d * (to_f(x[r * cols + c]) - mean) * rstd_in[r];
    sb += d;
  }
  if (r0 < r1) {
    atomicAdd(dw + c, sw);
    if (db != nullptr) atomicAdd(db + c, sb);
  }
}

}  // namespace

// ---- kernel launchers

void norm_forward(const NormParams& p, void* stream) {
  check_grid(p.rows, 2147483647, "rows");
  if (p.rows == 0) return;
  dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    norm_forward_kernel<T><<<static_cast<unsigned>(p.rows), kThreads, 0, as_stream(stream)>>>(
        static_cast<const T*>(p.x), static_cast<const T*>(p.weight), static_cast<const T*>(p.bias),
        static_cast<T*>(p.out), p.mean, p.rstd, p.cols, p.eps, p.rms, p.zero_centered ? 1.0f : 0.0f);
  });
  MEGALITH_CUDA_CHECK(cudaGetLastError());
}

void norm_backward(const NormBackwardParams& p, void* stream) {
  check_grid(p.rows, 2147483647, "rows");
  const cudaStream_t s = as_stream(stream);
  MEGALITH_CUDA_CHECK(cudaMemsetAsync(p.dweight, 0, sizeof(float) * p.cols, s));
  if (p.dbias != nullptr) MEGALITH_CUDA_CHECK(cudaMemsetAsync(p.dbias, 0, sizeof(float) * p.cols, s));
  if (p.rows == 0) return;
  const float shift = p.zero_centered ? 1.0f : 0.0f;
  const dim3 dw_grid(static_cast<unsigned>((p.cols + kThreads - 1) / kThreads),
                     static_cast<unsigned>(p.rows < kWeightRowSplits ? p.rows : kWeightRowSplits));
  dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto* dy = static_cast<const T*>(p.dy);
    const auto* x = static_cast<const T*>(p.x);
    norm_backward_dx_kernel<T><<<static_cast<unsigned>(p.rows), kThreads, 0, s>>>(
        dy, x, static_cast<const T*>(p.weight), p.mean, p.rstd, static_cast<T*>(p.dx), p.cols, p.rms, shift);
    MEGALITH_CUDA_CHECK(cudaGetLastError());
    norm_backward_dw_kernel<T><<<dw_grid, kThreads, 0, s>>>(dy, x, p.mean, p.rstd, p.dweight, p.dbias, p.rows,
                                                            p.cols, p.rms);
  });
  MEGALITH_CUDA_CHECK(cudaGetLastError());
}

}  // namespace megalith::kernels::cuda
