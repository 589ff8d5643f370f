// CPU scaled, masked softmax over the last dimension of [batch, heads, sq, sk] scores (float32 math); compiled
// per instruction set (cpu_common.h).
#include <algorithm>
#include <vector>

#include "cpu_kernels.h"
// cpu_common.h comes last: from here on the code is compiled for MEGALITH_CPU_ISA.
#include "cpu_common.h"

namespace megalith::kernels::cpu::MEGALITH_CPU_ISA {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Fills buf[j] = scale * x[j] for the keys row i may see and -inf for the others (causally hidden keys, the
// ones after i + sk - sq, and keys the padding mask hides).
template <typename T>
void masked_scores(const SoftmaxParams& p, const T* xr, int64_t b, int64_t h, int64_t i, float* buf) {
  const int64_t sk = p.sk;
  const int64_t visible = p.causal ? std::clamp<int64_t>(i + (sk - p.sq) + 1, 0, sk) : sk;
  const float scale = p.scale;
#pragma omp simd
  for (int64_t j = 0; j < visible; ++j) buf[j] = to_float(xr[j]) * scale;
  std::fill(buf + visible, buf + sk, kNegInf);
  if (p.mask == nullptr) return;
  const uint8_t* mr = p.mask + b * p.mask_strides[0] + h * p.mask_strides[1] + i * p.mask_strides[2];
  const int64_t mj = p.mask_strides[3];
  for (int64_t j = 0; j < visible; ++j) buf[j] = mr[j * mj] != 0 ? kNegInf : buf[j];
}

template <typename T>
void softmax_forward_impl(const SoftmaxParams& p) {
  const auto* x = static_cast<const T*>(p.x);
  auto* y = static_cast<T*>(p.out);
  const int64_t rows = p.batch * p.heads * p.sq, sk = p.sk;
  parallel_for(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, sk)), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(static_cast<size_t>(sk));
    float* bf = buf.data();
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r % p.sq, h = (r / p.sq) % p.heads, b = r / (p.sq * p.heads);
      masked_scores(p, x + r * sk, b, h, i, bf);
      float row_max = kNegInf;
#pragma omp simd reduction(max : row_max)
      for (int64_t j = 0; j < sk; ++j) row_max = bf[j] > row_max ? bf[j] : row_max;
      T* yr = y + r * sk;
      if (row_max == kNegInf) {  // every key masked: zeros, not NaN
        std::fill(yr, yr + sk, from_float<T>(0.0f));
        continue;
      }
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < sk; ++j) {
        bf[j] = exp_approx(bf[j] - row_max);
        sum += bf[j];
      }
      const float inv = 1.0f / sum;
#pragma omp simd
      for (int64_t j = 0; j < sk; ++j) yr[j] = from_float<T>(bf[j] * inv);
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
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < sk; ++j) dot += to_float(yr[j]) * to_float(dyr[j]);
      T* dxr = dx + r * sk;
#pragma omp simd
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

}  // namespace megalith::kernels::cpu::MEGALITH_CPU_ISA
MEGALITH_CPU_ISA_END
