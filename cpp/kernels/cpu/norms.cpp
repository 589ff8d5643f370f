// CPU RMSNorm and LayerNorm over the last dimension, forward and backward, float32 math; compiled per
// instruction set (cpu_common.h), rows may be strided.
#include <algorithm>
#include <vector>

#include "cpu_kernels.h"
// cpu_common.h comes last: from here on the code is compiled for MEGALITH_CPU_ISA.
#include "cpu_common.h"

namespace megalith::kernels::cpu::MEGALITH_CPU_ISA {
namespace {

// Row sums run in kLanes float lanes: 4 independent vector accumulators with AVX-512 (8 with AVX2), so that
// consecutive adds do not wait on each other's latency (one accumulator makes a 512-wide row's sum take 4x
// longer). The lanes are then added in a fixed order, so a row's result does not depend on threads.
constexpr int kLanes = 64;

// The lanes' total by halving (a tree of vector adds: 64 scalar adds in a chain would cost as much as the
// row itself). Overwrites `acc`.
float add_lanes(float* acc) {
  for (int half = kLanes / 2; half >= 1; half /= 2) {
#pragma omp simd
    for (int l = 0; l < half; ++l) acc[l] += acc[l + half];
  }
  return acc[0];
}

// Sum of term(c) over c in [0, cols).
template <typename Term>
float lane_sum(int64_t cols, Term&& term) {
  float acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= cols; c += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) acc[l] += term(c + l);
  }
  float tail = 0.0f;  // kept apart so that `acc` can live in registers
  for (; c < cols; ++c) tail += term(c);
  return add_lanes(acc) + tail;
}

// Mean and 1/sqrt(variance + eps) of one row (the mean is 0 for RMSNorm): the variance from a second pass
// over the (cache-resident) row, not from E[x^2] - mean^2, which cancels badly when |mean| >> std.
template <typename T>
void row_stats(const T* xr, int64_t cols, bool rms, float eps, float& mean, float& rstd) {
  const float n = static_cast<float>(cols);
  const float m = rms ? 0.0f : lane_sum(cols, [&](int64_t c) { return to_float(xr[c]); }) / n;
  const float sq = lane_sum(cols, [&](int64_t c) {
    const float d = to_float(xr[c]) - m;
    return d * d;
  });
  mean = m;
  rstd = 1.0f / std::sqrt(sq / n + eps);
}

template <typename T>
void norm_forward_impl(const NormParams& p) {
  const auto* x = static_cast<const T*>(p.x);
  const auto* w = static_cast<const T*>(p.weight);
  const auto* b = static_cast<const T*>(p.bias);
  auto* out = static_cast<T*>(p.out);
  const int64_t cols = p.cols, xs = p.x_stride != 0 ? p.x_stride : cols;
  const float shift = p.zero_centered ? 1.0f : 0.0f;
  parallel_for(p.rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * xs;
      T* yr = out + r * cols;
      float mean, rstd;
      row_stats(xr, cols, p.rms, p.eps, mean, rstd);
      if (b != nullptr) {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
          yr[c] = from_float<T>((to_float(xr[c]) - mean) * rstd * (to_float(w[c]) + shift) + to_float(b[c]));
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
          yr[c] = from_float<T>((to_float(xr[c]) - mean) * rstd * (to_float(w[c]) + shift));
        }
      }
      p.rstd[r] = rstd;
      if (p.mean != nullptr) p.mean[r] = mean;
    }
  });
}

// dx of one row and its contribution to the dweight / dbias partials pw, pb:
// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * scale (RMSNorm has no mean(g) term).
template <typename T>
void norm_backward_row(const T* xr, const T* dyr, const T* w, float shift, float mean, float rstd, int64_t cols,
                       bool rms, float* pw, float* pb, T* dxr) {
  float acc_g[kLanes] = {}, acc_gx[kLanes] = {};
  auto step = [&](int64_t c, int l) {
    const float xh = (to_float(xr[c]) - mean) * rstd;
    const float d = to_float(dyr[c]);
    const float g = d * (to_float(w[c]) + shift);
    acc_g[l] += g;
    acc_gx[l] += g * xh;
    pw[c] += d * xh;
  };
  int64_t c0 = 0;
  for (; c0 + kLanes <= cols; c0 += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) step(c0 + l, l);
  }
  float tail_g = 0.0f, tail_gx = 0.0f;
  for (; c0 < cols; ++c0) {
    const float xh = (to_float(xr[c0]) - mean) * rstd;
    const float d = to_float(dyr[c0]);
    const float g = d * (to_float(w[c0]) + shift);
    tail_g += g;
    tail_gx += g * xh;
    pw[c0] += d * xh;
  }
  const float sum_g = add_lanes(acc_g) + tail_g, sum_gx = add_lanes(acc_gx) + tail_gx;
  if (pb != nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) pb[c] += to_float(dyr[c]);
  }
  const float mean_g = rms ? 0.0f : sum_g / static_cast<float>(cols);
  const float mean_gx = sum_gx / static_cast<float>(cols);
#pragma omp simd
  for (int64_t c = 0; c < cols; ++c) {
    const float xh = (to_float(xr[c]) - mean) * rstd;
    const float g = to_float(dyr[c]) * (to_float(w[c]) + shift);
    dxr[c] = from_float<T>(rstd * (g - mean_g - xh * mean_gx));
  }
}

template <typename T>
void norm_backward_impl(const NormBackwardParams& p) {
  const auto* x = static_cast<const T*>(p.x);
  const auto* dy = static_cast<const T*>(p.dy);
  const auto* w = static_cast<const T*>(p.weight);
  auto* dx = static_cast<T*>(p.dx);
  const int64_t rows = p.rows, cols = p.cols;
  const int64_t xs = p.x_stride != 0 ? p.x_stride : cols, dys = p.dy_stride != 0 ? p.dy_stride : cols;
  const float shift = p.zero_centered ? 1.0f : 0.0f;
  // Each chunk of kRowsPerChunk rows accumulates its own dweight/dbias partials; they are summed in a fixed
  // order afterwards, so the result does not depend on the thread count or timing.
  constexpr int64_t kRowsPerChunk = 32;
  const int64_t num_chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<float> partial_w(static_cast<size_t>(num_chunks * cols), 0.0f);
  std::vector<float> partial_b(p.dbias != nullptr ? partial_w.size() : 0, 0.0f);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols * kRowsPerChunk));
  parallel_for(num_chunks, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      float* pw = partial_w.data() + chunk * cols;
      float* pb = partial_b.empty() ? nullptr : partial_b.data() + chunk * cols;
      const int64_t r_end = std::min(rows, (chunk + 1) * kRowsPerChunk);
      for (int64_t r = chunk * kRowsPerChunk; r < r_end; ++r) {
        norm_backward_row(x + r * xs, dy + r * dys, w, shift, p.rms ? 0.0f : p.mean[r], p.rstd[r], cols, p.rms, pw,
                          pb, dx + r * cols);
      }
    }
  });
  std::fill(p.dweight, p.dweight + cols, 0.0f);
  if (p.dbias != nullptr) std::fill(p.dbias, p.dbias + cols, 0.0f);
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    const float* pw = partial_w.data() + chunk * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) p.dweight[c] += pw[c];
    if (p.dbias != nullptr) {
      const float* pb = partial_b.data() + chunk * cols;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) p.dbias[c] += pb[c];
    }
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

}  // namespace megalith::kernels::cpu::MEGALITH_CPU_ISA
MEGALITH_CPU_ISA_END
