// CPU RMSNorm and LayerNorm over the last dimension, forward and backward, float32 accumulation.
#include <algorithm>
#include <vector>

#include "cpu_common.h"

namespace megalith::kernels::cpu {
namespace {

template <typename T>
void norm_forward_impl(const NormParams& p) {
  const auto* x = static_cast<const T*>(p.x);
  const auto* w = static_cast<const T*>(p.weight);
  const auto* b = static_cast<const T*>(p.bias);
  auto* out = static_cast<T*>(p.out);
  const int64_t cols = p.cols;
  const float shift = p.zero_centered ? 1.0f : 0.0f;
  parallel_for(p.rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * cols;
      T* yr = out + r * cols;
      float mean = 0.0f;
      if (!p.rms) {
        double sum = 0.0;
        for (int64_t c = 0; c < cols; ++c) sum += to_float(xr[c]);
        mean = static_cast<float>(sum / cols);
      }
      double sq = 0.0;
      for (int64_t c = 0; c < cols; ++c) {
        const float d = to_float(xr[c]) - mean;
        sq += static_cast<double>(d) * d;
      }
      const float rstd = 1.0f / std::sqrt(static_cast<float>(sq / cols) + p.eps);
      for (int64_t c = 0; c < cols; ++c) {
        float y = (to_float(xr[c]) - mean) * rstd * (to_float(w[c]) + shift);
        if (b != nullptr) y += to_float(b[c]);
        yr[c] = from_float<T>(y);
      }
      p.rstd[r] = rstd;
      if (p.mean != nullptr) p.mean[r] = mean;
    }
  });
}

template <typename T>
void norm_backward_impl(const NormBackwardParams& p) {
  const auto* x = static_cast<const T*>(p.x);
  const auto* dy = static_cast<const T*>(p.dy);
  const auto* w = static_cast<const T*>(p.weight);
  auto* dx = static_cast<T*>(p.dx);
  const int64_t rows = p.rows, cols = p.cols;
  const float shift = p.zero_centered ? 1.0f : 0.0f;
  // Each chunk of kRowsPerChunk rows accumulates its own dweight/dbias partials; they are summed in a fixed
  // order afterwards, so the result does not depend on the thread count or timing.
  constexpr int64_t kRowsPerChunk = 32;
  const int64_t per_chunk = kRowsPerChunk;
  const int64_t num_chunks = (rows + per_chunk - 1) / per_chunk;
  std::vector<float> partial_w(static_cast<size_t>(num_chunks * cols), 0.0f);
  std::vector<float> partial_b(p.dbias != nullptr ? partial_w.size() : 0, 0.0f);
  parallel_for(num_chunks, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols * per_chunk)), [&](int64_t c0, int64_t c1) {
    std::vector<float> xhat(static_cast<size_t>(cols));
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      float* pw = partial_w.data() + chunk * cols;
      float* pb = partial_b.empty() ? nullptr : partial_b.data() + chunk * cols;
      const int64_t r_end = std::min(rows, (chunk + 1) * per_chunk);
      for (int64_t r = chunk * per_chunk; r < r_end; ++r) {
        const T* xr = x + r * cols;
        const T* dyr = dy + r * cols;
        const float mean = p.rms ? 0.0f : p.mean[r];
        const float rstd = p.rstd[r];
        // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * scale; LayerNorm keeps the mean(g) term.
        double sum_g = 0.0, sum_gx = 0.0;
        for (int64_t c = 0; c < cols; ++c) {
          const float xh = (to_float(xr[c]) - mean) * rstd;
          const float d = to_float(dyr[c]);
          const float g = d * (to_float(w[c]) + shift);
          xhat[c] = xh;
          sum_g += g;
          sum_gx += static_cast<double>(g) * xh;
          pw[c] += d * xh;
          if (pb != nullptr) pb[c] += d;
        }
        const float mean_g = p.rms ? 0.0f : static_cast<float>(sum_g / cols);
        const float mean_gx = static_cast<float>(sum_gx / cols);
        T* dxr = dx + r * cols;
        for (int64_t c = 0; c < cols; ++c) {
          const float g = to_float(dyr[c]) * (to_float(w[c]) + shift);
          dxr[c] = from_float<T>(rstd * (g - mean_g - xhat[c] * mean_gx));
        }
      }
    }
  });
  for (int64_t c = 0; c < cols; ++c) {
    float sw = 0.0f, sb = 0.0f;
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      sw += partial_w[chunk * cols + c];
      if (p.dbias != nullptr) sb += partial_b[chunk * cols + c];
    }
    p.dweight[c] = sw;
    if (p.dbias != nullptr) p.dbias[c] = sb;
  }
}

}  // namespace

void norm_forward(const NormParams& p) {
  dispatch_cpu(p.dtype, p.rms ? "rms_norm" : "layer_norm", [&](auto tag) { norm_forward_impl<decltype(tag)>(p); });
}

void norm_backward(const NormBackwardParams& p) {
  dispatch_cpu(p.dtype, p.rms ? "rms_norm backward" : "layer_norm backward",
               [&](auto tag) { norm_backward_impl<decltype(tag)>(p); });
}

}  // namespace megalith::kernels::cpu
