// CPU cross-entropy: per-token loss with ignore_index and label smoothing, the vocab-parallel partials, and
// the backward pass, in two passes over each row (no second vocabulary-sized buffer).
#include <algorithm>
#include <limits>

#include "cpu_common.h"

namespace megalith::kernels::cpu {
namespace {

// Per-row statistics of one (local) slice of the vocabulary.
struct RowStats {
  float max, sumexp, target_logit, sum_logits;
  bool target_local;
};

template <typename T>
RowStats row_stats(const T* row, int64_t cols, int64_t local_target) {
  float m = -std::numeric_limits<float>::infinity();
  double sum = 0.0;
  for (int64_t c = 0; c < cols; ++c) {
    const float v = to_float(row[c]);
    m = std::max(m, v);
    sum += v;
  }
  float se = 0.0f;
  for (int64_t c = 0; c < cols; ++c) se += std::exp(to_float(row[c]) - m);
  const bool local = local_target >= 0 && local_target < cols;
  return RowStats{m, se, local ? to_float(row[local_target]) : 0.0f, static_cast<float>(sum), local};
}

template <typename T>
void forward_impl(const CrossEntropyParams& p, bool partials) {
  const auto* logits = static_cast<const T*>(p.logits);
  const int64_t cols = p.cols;
  parallel_for(p.rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = p.target[r];
      const bool ignored = t == p.ignore_index;
      if (!partials && !ignored && (t < 0 || t >= p.vocab_total)) {
        fail("cross_entropy: target[", r, "] = ", t, " is outside [0, ", p.vocab_total, ") and is not ignore_index");
      }
      const RowStats s = row_stats(logits + r * cols, cols, ignored ? -1 : t - p.vocab_start);
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
      const float eps = p.label_smoothing;
      const float smooth = lse - s.sum_logits / static_cast<float>(p.vocab_total);
      p.loss[r] = (1.0f - eps) * (lse - s.target_logit) + eps * smooth;
    }
  });
}

template <typename T>
void backward_impl(const CrossEntropyParams& p) {
  const auto* logits = static_cast<const T*>(p.logits);
  auto* dlogits = static_cast<T*>(p.dlogits);
  const int64_t cols = p.cols;
  const float eps = p.label_smoothing;
  const float uniform = eps / static_cast<float>(p.vocab_total);
  parallel_for(p.rows * cols, 16384, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / cols, c = i % cols;
      const int64_t t = p.target[r];
      if (t == p.ignore_index) {
        dlogits[i] = from_float<T>(0.0f);
        continue;
      }
      float g = std::exp(to_float(logits[i]) - p.lse_in[r]) - uniform;
      if (c + p.vocab_start == t) g -= 1.0f - eps;
      dlogits[i] = from_float<T>(g * p.dloss[r]);
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

}  // namespace megalith::kernels::cpu
