// CPU cross-entropy: per-token loss with ignore_index and label smoothing, the vocab-parallel partials, and
// the backward pass, in two passes over each row (no second vocabulary-sized buffer). Compiled per
// instruction set (cpu_common.h); logits rows may be strided (a slice of a padded vocabulary).
#include <algorithm>

#include "cpu_kernels.h"
// cpu_common.h comes last: from here on the code is compiled for MEGALITH_CPU_ISA.
#include "cpu_common.h"

namespace megalith::kernels::cpu::MEGALITH_CPU_ISA {
namespace {

// Per-row statistics of one (local) slice of the vocabulary.
struct RowStats {
  float max, sumexp, target_logit, sum_logits;
};

template <typename T>
RowStats row_stats(const T* row, int64_t cols, int64_t local_target) {
  float m = -std::numeric_limits<float>::infinity(), sum = 0.0f;
#pragma omp simd reduction(max : m) reduction(+ : sum)
  for (int64_t c = 0; c < cols; ++c) {
    const float v = to_float(row[c]);
    m = v > m ? v : m;
    sum += v;
  }
  float se = 0.0f;
#pragma omp simd reduction(+ : se)
  for (int64_t c = 0; c < cols; ++c) se += exp_approx(to_float(row[c]) - m);
  const bool local = local_target >= 0 && local_target < cols;
  return RowStats{m, se, local ? to_float(row[local_target]) : 0.0f, sum};
}

int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols)); }

template <typename T>
void forward_impl(const CrossEntropyParams& p, bool partials) {
  const auto* logits = static_cast<const T*>(p.logits);
  const int64_t cols = p.cols, stride = p.logits_stride != 0 ? p.logits_stride : cols;
  parallel_for(p.rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = p.target[r];
      const bool ignored = t == p.ignore_index;
      if (!partials && !ignored && (t < 0 || t >= p.vocab_total)) {
        fail("cross_entropy: target[", r, "] = ", t, " is outside [0, ", p.vocab_total, ") and is not ignore_index");
      }
      const RowStats s = row_stats(logits + r * stride, cols, ignored ? -1 : t - p.vocab_start);
      if (partials) {
        p.local_max[r] = s.max;
        p.local_sumexp[r] = s.sumexp;
        p.target_logit[r] = s.target_logit;
        p.sum_logits[r] = s.sum_logits;
        continue;
      }
      const float lse = s.max + std::log(s.sumexp);
      p.lse[r] = lse;
      if (ignored) {
        p.loss[r] = 0.0f;
        continue;
      }
      // Without smoothing the mean logit is not read: a -inf logit (a masked column) would make it -inf and
      // the loss 0 * inf = NaN.
      const float eps = p.label_smoothing;
      const float smooth = eps > 0.0f ? eps * (lse - s.sum_logits / static_cast<float>(p.vocab_total)) : 0.0f;
      p.loss[r] = (1.0f - eps) * (lse - s.target_logit) + smooth;
    }
  });
}

// dlogits = dloss * (exp(x - lse) - eps / V), minus dloss * (1 - eps) at the target's column.
template <typename T>
void backward_impl(const CrossEntropyParams& p) {
  const auto* logits = static_cast<const T*>(p.logits);
  auto* dlogits = static_cast<T*>(p.dlogits);
  const int64_t cols = p.cols, stride = p.logits_stride != 0 ? p.logits_stride : cols;
  const float eps = p.label_smoothing;
  const float uniform = eps / static_cast<float>(p.vocab_total);
  parallel_for(p.rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = logits + r * stride;
      T* dr = dlogits + r * cols;
      const int64_t t = p.target[r];
      if (t == p.ignore_index) {
        std::fill(dr, dr + cols, from_float<T>(0.0f));
        continue;
      }
      const float lse = p.lse_in[r], scale = p.dloss[r];
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) dr[c] = from_float<T>((exp_approx(to_float(xr[c]) - lse) - uniform) * scale);
      const int64_t local = t - p.vocab_start;
      if (local >= 0 && local < cols) {
        const float g = exp_approx(to_float(xr[local]) - lse) - uniform - (1.0f - eps);
        dr[local] = from_float<T>(g * scale);
      }
    }
  });
}

}  // namespace

void cross_entropy_forward(const CrossEntropyParams& p) {
  dispatch_cpu(p.dtype, "cross_entropy", [&](auto tag) { forward_impl<decltype(tag)>(p, false); });
}

void cross_entropy_partials(const CrossEntropyParams& p) {
  dispatch_cpu(p.dtype, "cross_entropy_partials", [&](auto tag) { forward_impl<decltype(tag)>(p, true); });
}

void cross_entropy_backward(const CrossEntropyParams& p) {
  dispatch_cpu(p.dtype, "cross_entropy backward", [&](auto tag) { backward_impl<decltype(tag)>(p); });
}

}  // namespace megalith::kernels::cpu::MEGALITH_CPU_ISA
MEGALITH_CPU_ISA_END
