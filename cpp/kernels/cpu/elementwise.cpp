// CPU rotary embedding, SwiGLU and bias-GeLU, forward and backward (float32 math); compiled per instruction
// set (cpu_common.h). Inputs may be strided views (the halves of a fused projection); outputs are dense.
#include <algorithm>

#include "cpu_kernels.h"
// cpu_common.h comes last: from here on the code is compiled for MEGALITH_CPU_ISA.
#include "cpu_common.h"

namespace megalith::kernels::cpu::MEGALITH_CPU_ISA {
namespace {

constexpr int64_t kGrain = 16384;

inline int64_t stride_or(int64_t stride, int64_t dense) { return stride != 0 ? stride : dense; }

template <typename T>
void rope_impl(const RopeParams& p) {
  const auto* x = static_cast<const T*>(p.x);
  auto* out = static_cast<T*>(p.out);
  const int64_t half = p.rot_dim / 2, dim = p.dim;
  const int64_t sh = stride_or(p.x_strides[2], dim), ss = stride_or(p.x_strides[1], p.heads * sh);
  const int64_t sb = stride_or(p.x_strides[0], p.seq * ss);
  const float sign = p.inverse ? -1.0f : 1.0f;
  // One "row" is one (batch, position, head) vector of `dim` values.
  const int64_t rows = p.batch * p.seq * p.heads;
  parallel_for(rows, std::max<int64_t>(1, kGrain / dim), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r % p.heads, s = (r / p.heads) % p.seq, b = r / (p.heads * p.seq);
      const T* xr = x + b * sb + s * ss + h * sh;
      T* yr = out + r * dim;
      const float* cs = p.cos + s * half;
      const float* sn = p.sin + s * half;
      if (p.interleaved) {  // pairs (2i, 2i + 1)
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = to_float(xr[2 * i]), x2 = to_float(xr[2 * i + 1]);
          yr[2 * i] = from_float<T>(x1 * cs[i] - x2 * sign * sn[i]);
          yr[2 * i + 1] = from_float<T>(x2 * cs[i] + x1 * sign * sn[i]);
        }
      } else {  // pairs (i, i + half)
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = to_float(xr[i]), x2 = to_float(xr[i + half]);
          yr[i] = from_float<T>(x1 * cs[i] - x2 * sign * sn[i]);
          yr[i + half] = from_float<T>(x2 * cs[i] + x1 * sign * sn[i]);
        }
      }
      for (int64_t i = p.rot_dim; i < dim; ++i) yr[i] = xr[i];
    }
  });
}

template <typename T>
void swiglu_forward_impl(const SwigluParams& p) {
  const auto* g = static_cast<const T*>(p.gate);
  const auto* u = static_cast<const T*>(p.up);
  auto* out = static_cast<T*>(p.out);
  const int64_t cols = p.cols, gs = stride_or(p.gate_stride, cols), us = stride_or(p.up_stride, cols);
  parallel_for(p.rows * cols, kGrain, [&](int64_t i0, int64_t i1) {
    for_segments(i0, i1, cols, [&](int64_t r, int64_t c0, int64_t c1) {
      const T* gr = g + r * gs;
      const T* ur = u + r * us;
      T* yr = out + r * cols;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) {
        const float gv = to_float(gr[c]);
        yr[c] = from_float<T>(gv * sigmoid(gv) * to_float(ur[c]));
      }
    });
  });
}

// d silu(g) * u: du = d * g * s, dg = d * u * s * (1 + g * (1 - s)) with s = sigmoid(g).
template <typename T>
void swiglu_backward_impl(const SwigluParams& p) {
  const auto* g = static_cast<const T*>(p.gate);
  const auto* u = static_cast<const T*>(p.up);
  const auto* d = static_cast<const T*>(p.dout);
  auto* dg = static_cast<T*>(p.dgate);
  auto* du = static_cast<T*>(p.dup);
  const int64_t cols = p.cols, gs = stride_or(p.gate_stride, cols), us = stride_or(p.up_stride, cols);
  const int64_t ds = stride_or(p.dout_stride, cols);
  parallel_for(p.rows * cols, kGrain, [&](int64_t i0, int64_t i1) {
    for_segments(i0, i1, cols, [&](int64_t r, int64_t c0, int64_t c1) {
      const T* gr = g + r * gs;
      const T* ur = u + r * us;
      const T* dr = d + r * ds;
      T* dgr = dg + r * cols;
      T* dur = du + r * cols;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) {
        const float gv = to_float(gr[c]), uv = to_float(ur[c]), dv = to_float(dr[c]);
        const float sg = sigmoid(gv);
        dur[c] = from_float<T>(dv * gv * sg);
        dgr[c] = from_float<T>(dv * uv * sg * (1.0f + gv * (1.0f - sg)));
      }
    });
  });
}

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

// tanh(u) = sign(u) (1 - e) / (1 + e) with e = exp(-2|u|): one exp, exact limits for large |u|.
inline float tanh_approx(float u) {
  const float e = exp_approx(-2.0f * std::fabs(u));
  return std::copysign((1.0f - e) / (1.0f + e), u);
}

// gelu(v) and its derivative, tanh approximation (vectorised) or exact erf (std::erf, not vectorised).
inline float gelu_tanh(float v) { return 0.5f * v * (1.0f + tanh_approx(kSqrt2OverPi * (v + 0.044715f * v * v * v))); }

inline float gelu_tanh_grad(float v) {
  const float t = tanh_approx(kSqrt2OverPi * (v + 0.044715f * v * v * v));
  return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * 0.044715f * v * v);
}

inline float gelu_erf(float v) { return 0.5f * v * (1.0f + std::erf(v * kInvSqrt2)); }

inline float gelu_erf_grad(float v) {
  return 0.5f * (1.0f + std::erf(v * kInvSqrt2)) + v * kInvSqrt2Pi * std::exp(-0.5f * v * v);
}

// out = f(x + bias) (forward) or dout * f'(x + bias) (backward) on one row segment [c0, c1). Every choice is
// a template argument so that the loop has no branch left to stop it from vectorising.
template <typename T, bool kBackward, bool kTanh, bool kBias>
void gelu_segment(const T* xr, const T* b, const T* dr, T* yr, int64_t c0, int64_t c1) {
#pragma omp simd
  for (int64_t c = c0; c < c1; ++c) {
    float v = to_float(xr[c]);
    if constexpr (kBias) v += to_float(b[c]);
    float y;
    if constexpr (kBackward) {
      y = to_float(dr[c]) * (kTanh ? gelu_tanh_grad(v) : gelu_erf_grad(v));
    } else {
      y = kTanh ? gelu_tanh(v) : gelu_erf(v);
    }
    yr[c] = from_float<T>(y);
  }
}

template <typename T, bool kBackward>
void bias_gelu_impl(const GeluParams& p) {
  const auto* x = static_cast<const T*>(p.x);
  const auto* b = static_cast<const T*>(p.bias);
  const auto* d = static_cast<const T*>(p.dout);
  auto* out = static_cast<T*>(p.out);
  const int64_t cols = p.cols, xs = stride_or(p.x_stride, cols), ds = stride_or(p.dout_stride, cols);
  const auto segment = p.tanh_approx ? (b != nullptr ? &gelu_segment<T, kBackward, true, true>
                                                     : &gelu_segment<T, kBackward, true, false>)
                                     : (b != nullptr ? &gelu_segment<T, kBackward, false, true>
                                                     : &gelu_segment<T, kBackward, false, false>);
  parallel_for(p.rows * cols, kGrain, [&](int64_t i0, int64_t i1) {
    for_segments(i0, i1, cols, [&](int64_t r, int64_t c0, int64_t c1) {
      segment(x + r * xs, b, kBackward ? d + r * ds : nullptr, out + r * cols, c0, c1);
    });
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
  dispatch_cpu(p.dtype, "bias_gelu", [&](auto tag) { bias_gelu_impl<decltype(tag), false>(p); });
}

void bias_gelu_backward(const GeluParams& p) {
  dispatch_cpu(p.dtype, "bias_gelu backward", [&](auto tag) { bias_gelu_impl<decltype(tag), true>(p); });
}

}  // namespace megalith::kernels::cpu::MEGALITH_CPU_ISA
MEGALITH_CPU_ISA_END
