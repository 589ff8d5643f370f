// CPU scaled, masked softmax over the last dimension of [batch, heads, sq, sk] scores (float32 math).
#include <algorithm>
#include <limits>
#include <vector>

#include "cpu_common.h"

namespace megalith::kernels::cpu {
namespace {

// True when key j of query row i (of batch b, head h) is masked out.
inline bool masked(const SoftmaxParams& p, int64_t b, int64_t h, int64_t i, int64_t j) {
  if (p.causal && j > i + (p.sk - p.sq)) return true;
  if (p.mask == nullptr) return false;
  const int64_t at = b * p.mask_strides[0] + h * p.mask_strides[1] + i * p.mask_strides[2] + j * p.mask_strides[3];
  return p.mask[at] != 0;
}

template <typename T>
void softmax_forward_impl(const SoftmaxParams& p) {
  const auto* x = static_cast<const T*>(p.x);
  auto* y = static_cast<T*>(p.out);
  const int64_t rows = p.batch * p.heads * p.sq, sk = p.sk;
  parallel_for(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, sk)), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(static_cast<size_t>(sk));
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r % p.sq, h = (r / p.sq) % p.heads, b = r / (p.sq * p.heads);
      const T* xr = x + r * sk;
      float row_max = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < sk; ++j) {
        buf[j] = masked(p, b, h, i, j) ? -std::numeric_limits<float>::infinity() : to_float(xr[j]) * p.scale;
        row_max = std::max(row_max, buf[j]);
      }
      T* yr = y + r * sk;
      if (row_max == -std::numeric_limits<float>::infinity()) {  // every key masked: zeros, not NaN
        for (int64_t j = 0; j < sk; ++j) yr[j] = from_float<T>(0.0f);
        continue;
      }
      float sum = 0.0f;
      for (int64_t j = 0; j < sk; ++j) {
        buf[j] = std::exp(buf[j] - row_max);
        sum += buf[j];
      }
      const float inv = 1.0f / sum;
      for (int64_t j = 0; j < sk; ++j) yr[j] = from_float<T>(buf[j] * inv);
    }
  });
}

// dx = scale * y * (dy - sum(dy * y)); masked entries have y = 0 and so get no gradient.
template <typename T>
void softmax_backward_impl(const SoftmaxParams& p) {
  const auto* y = static_cast<const T*>(p.x);
  const auto* dy = static_cast<const T*>(p.dy);
  auto* dx = static_cast<T*>(p.out);
  const int64_t rows = p.batch * p.heads * p.sq, sk = p.sk;
  parallel_for(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, sk)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* yr = y + r * sk;
      const T* dyr = dy + r * sk;
      float dot = 0.0f;
      for (int64_t j = 0; j < sk; ++j) dot += to_float(yr[j]) * to_float(dyr[j]);
      T* dxr = dx + r * sk;
      for (int64_t j = 0; j < sk; ++j) dxr[j] = from_float<T>(p.scale * to_float(yr[j]) * (to_float(dyr[j]) - dot));
    }
  });
}

}  // namespace

void softmax_forward(const SoftmaxParams& p) {
  dispatch_cpu(p.dtype, "scaled_softmax", [&](auto tag) { softmax_forward_impl<decltype(tag)>(p); });
}

void softmax_backward(const SoftmaxParams& p) {
  dispatch_cpu(p.dtype, "scaled_softmax backward", [&](auto tag) { softmax_backward_impl<decltype(tag)>(p); });
}

}  // namespace megalith::kernels::cpu
