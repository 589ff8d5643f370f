// Shared helpers of the CPU kernels: bfloat16 conversion, a vectorisable exp, a dtype dispatcher, parallel_for.
//
// The vectorised kernel sources are compiled once per instruction-set level (cmake/MegalithCpuIsa.cmake sets
// MEGALITH_CPU_ISA_LEVEL). From the end of this header's own includes, the code of such a copy is compiled for
// its instruction set (`#pragma GCC target` / clang attribute) and lives in a namespace named after it
// (MEGALITH_CPU_ISA: base, avx2 or avx512), so no symbol of an AVX-512 copy can stand in for a baseline one.
// Standard and project headers must therefore come BEFORE this header: their inline code is shared by every
// copy and must stay baseline code. A source that is compiled per instruction set ends with
// MEGALITH_CPU_ISA_END. The helpers are branch-free so that loops calling them vectorise (`#pragma omp simd`
// needs -fopenmp-simd, which adds no runtime library).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>

#include "megalith/error.h"
#include "megalith/kernels.h"

#ifndef MEGALITH_CPU_ISA_LEVEL
#define MEGALITH_CPU_ISA_LEVEL 0
#endif

#if MEGALITH_CPU_ISA_LEVEL == 0
#define MEGALITH_CPU_ISA base
#define MEGALITH_CPU_ISA_END
#elif MEGALITH_CPU_ISA_LEVEL == 1
#define MEGALITH_CPU_ISA avx2
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#define MEGALITH_CPU_ISA_END _Pragma("clang attribute pop")
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define MEGALITH_CPU_ISA_END _Pragma("GCC pop_options")
#endif
#elif MEGALITH_CPU_ISA_LEVEL == 2
#define MEGALITH_CPU_ISA avx512
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#define MEGALITH_CPU_ISA_END _Pragma("clang attribute pop")
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#define MEGALITH_CPU_ISA_END _Pragma("GCC pop_options")
#endif
#else
#error "MEGALITH_CPU_ISA_LEVEL must be 0 (base), 1 (avx2) or 2 (avx512)"
#endif

namespace megalith::kernels::cpu {

// Runs fn(begin, end) over [0, n) split into contiguous chunks on up to num_threads() threads (torch's OpenMP
// team when attached, see threading.cpp); work smaller than `grain` items per thread stays on the calling
// thread. Exceptions from workers are rethrown here. Compiled once, shared by every instruction set.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

namespace MEGALITH_CPU_ISA {

// bfloat16 stored as its 16 raw bits; arithmetic is always done in float32.
struct BF16 {
  uint16_t bits;
};

inline float to_float(float v) { return v; }
inline float to_float(BF16 v) {
  const uint32_t word = static_cast<uint32_t>(v.bits) << 16;
  float out;
  std::memcpy(&out, &word, sizeof(out));
  return out;
}

template <typename T>
inline T from_float(float v);
template <>
inline float from_float<float>(float v) {
  return v;
}
// Round to nearest, ties to even; a NaN stays a (quiet) NaN. Written as a select so that it vectorises.
template <>
inline BF16 from_float<BF16>(float v) {
  uint32_t word;
  std::memcpy(&word, &v, sizeof(word));
  const uint32_t rounded = (word + 0x7FFFu + ((word >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (word >> 16) | 0x40u;
  return BF16{static_cast<uint16_t>(v != v ? quiet_nan : rounded)};
}

// exp(x) in float32 within about 2 ulp (Cephes' expf polynomial after reducing by round(x / ln 2)), without
// branches or library calls. Below -87.3 (where the result would be subnormal) it returns 0, so exp(-inf) is
// exactly 0; above 88.37 it returns +inf; NaN stays NaN.
inline float exp_approx(float x) {
  constexpr float kLo = -87.3365447505531f, kHi = 88.3762626647949f;
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low bits
  const float xc = x < kLo ? kLo : (x > kHi ? kHi : x);
  const float t = xc * 1.44269504088896341f + kShift;
  const float n = t - kShift;
  uint32_t t_bits;
  std::memcpy(&t_bits, &t, sizeof(t_bits));
  const uint32_t scale_bits = (t_bits - 0x4B400000u + 127u) << 23;  // 2^n as a float
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;  // x - n ln2, ln2 split in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * r * r + r + 1.0f) * scale;
  return x < kLo ? 0.0f : (x > kHi ? std::numeric_limits<float>::infinity() : y);
}

inline float sigmoid(float v) { return 1.0f / (1.0f + exp_approx(-v)); }

// Calls fn(T{}) with T = float or BF16 for the runtime dtype; the CPU kernels take no float16.
template <typename Fn>
void dispatch_cpu(DType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      fn(float{});
      return;
    case DType::kBFloat16:
      fn(BF16{});
      return;
    default:
      fail(op, ": the CPU kernels take float32 or bfloat16, got ", dtype_name(dtype));
  }
}

// Calls fn(row, c0, c1) for the row segments that make up items [i0, i1) of a rows x cols index space, so
// that elementwise kernels split work evenly whatever the row length (one long row included).
template <typename Fn>
inline void for_segments(int64_t i0, int64_t i1, int64_t cols, Fn&& fn) {
  for (int64_t i = i0; i < i1;) {
    const int64_t row = i / cols, c0 = i % cols;
    const int64_t c1 = c0 + (i1 - i < cols - c0 ? i1 - i : cols - c0);
    fn(row, c0, c1);
    i += c1 - c0;
  }
}

}  // namespace MEGALITH_CPU_ISA

}  // namespace megalith::kernels::cpu
