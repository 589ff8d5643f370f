// CPU rotary embedding, SwiGLU and bias-GeLU, forward and backward (float32 math).
#include <algorithm>

#include "cpu_common.h"

namespace megalith::kernels::cpu {
namespace {

constexpr int64_t kGrain = 16384;

template <typename T>
void rope_impl(const RopeParams& p) {
  const auto* x = static_cast<const T*>(p.x);
  auto* out = static_cast<T*>(p.out);
  const int64_t half = p.rot_dim / 2, dim = p.dim;
  const float sign = p.inverse ? -1.0f : 1.0f;
  // One "row" is one (batch, position, head) vector of `dim` values.
  const int64_t rows = p.batch * p.seq * p.heads;
  parallel_for(rows, std::max<int64_t>(1, kGrain / dim), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t s = (r / p.heads) % p.seq;
      const T* xr = x + r * dim;
      T* yr = out + r * dim;
      const float* cs = p.cos + s * half;
      const float* sn = p.sin + s * half;
      for (int64_t i = 0; i < half; ++i) {
        const int64_t a = p.interleaved ? 2 * i : i;
        const int64_t b = p.interleaved ? 2 * i + 1 : i + half;
        const float x1 = to_float(xr[a]), x2 = to_float(xr[b]);
        const float c = cs[i], sv = sign * sn[i];
        yr[a] = from_float<T>(x1 * c - x2 * sv);
        yr[b] = from_float<T>(x2 * c + x1 * sv);
      }
      for (int64_t i = p.rot_dim; i < dim; ++i) yr[i] = xr[i];
    }
  });
}

inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

template <typename T>
void swiglu_forward_impl(const SwigluParams& p) {
  const auto* g = static_cast<const T*>(p.gate);
  const auto* u = static_cast<const T*>(p.up);
  auto* out = static_cast<T*>(p.out);
  parallel_for(p.n, kGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float gv = to_float(g[i]);
      out[i] = from_float<T>(gv * sigmoid(gv) * to_float(u[i]));
    }
  });
}

template <typename T>
void swiglu_backward_impl(const SwigluParams& p) {
  const auto* g = static_cast<const T*>(p.gate);
  const auto* u = static_cast<const T*>(p.up);
  const auto* d = static_cast<const T*>(p.dout);
  auto* dg = static_cast<T*>(p.dgate);
  auto* du = static_cast<T*>(p.dup);
  parallel_for(p.n, kGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float gv = to_float(g[i]), uv = to_float(u[i]), dv = to_float(d[i]);
      const float sg = sigmoid(gv);
      du[i] = from_float<T>(dv * gv * sg);
      dg[i] = from_float<T>(dv * uv * sg * (1.0f + gv * (1.0f - sg)));
    }
  });
}

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

// tanh through one exp (std::tanh is several times slower); saturates cleanly for large |u|.
inline float fast_tanh(float u) {
  const float e = std::exp(-2.0f * std::fabs(u));
  return std::copysign((1.0f - e) / (1.0f + e), u);
}

// gelu(v) and its derivative, tanh approximation or exact (erf).
inline float gelu(float v, bool tanh_approx) {
  if (tanh_approx) return 0.5f * v * (1.0f + fast_tanh(kSqrt2OverPi * (v + 0.044715f * v * v * v)));
  return 0.5f * v * (1.0f + std::erf(v * kInvSqrt2));
}

inline float gelu_grad(float v, bool tanh_approx) {
  if (tanh_approx) {
    const float t = fast_tanh(kSqrt2OverPi * (v + 0.044715f * v * v * v));
    return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * 0.044715f * v * v);
  }
  return 0.5f * (1.0f + std::erf(v * kInvSqrt2)) + v * kInvSqrt2Pi * std::exp(-0.5f * v * v);
}

template <typename T>
void bias_gelu_impl(const GeluParams& p, bool backward) {
  const auto* x = static_cast<const T*>(p.x);
  const auto* b = static_cast<const T*>(p.bias);
  const auto* d = static_cast<const T*>(p.dout);
  auto* out = static_cast<T*>(p.out);
  const int64_t cols = p.cols;
  parallel_for(p.rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, cols)), [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0 * cols; i < r1 * cols; i += cols) {
      for (int64_t c = 0; c < cols; ++c) {
        float v = to_float(x[i + c]);
        if (b != nullptr) v += to_float(b[c]);
        const float g = backward ? to_float(d[i + c]) * gelu_grad(v, p.tanh_approx) : gelu(v, p.tanh_approx);
        out[i + c] = from_float<T>(g);
      }
    }
  });
}

}  // namespace

void rope(const RopeParams& p) {
  dispatch_cpu(p.dtype, "rope", [&](auto tag) { rope_impl<decltype(tag)>(p); });
}

void swiglu_forward(const SwigluParams& p) {
  dispatch_cpu(p.dtype, "swiglu", [&](auto tag) { swiglu_forward_impl<decltype(tag)>(p); });
}

void swiglu_backward(const SwigluParams& p) {
  dispatch_cpu(p.dtype, "swiglu backward", [&](auto tag) { swiglu_backward_impl<decltype(tag)>(p); });
}

void bias_gelu_forward(const GeluParams& p) {
  dispatch_cpu(p.dtype, "bias_gelu", [&](auto tag) { bias_gelu_impl<decltype(tag)>(p, false); });
}

void bias_gelu_backward(const GeluParams& p) {
  dispatch_cpu(p.dtype, "bias_gelu backward", [&](auto tag) { bias_gelu_impl<decltype(tag)>(p, true); });
}

}  // namespace megalith::kernels::cpu
