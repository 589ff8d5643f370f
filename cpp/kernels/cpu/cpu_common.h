// Shared helpers of the CPU kernels: bfloat16 conversion, a dtype dispatcher and a std::thread parallel_for.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>

#include "megalith/error.h"
#include "megalith/kernels.h"

namespace megalith::kernels::cpu {

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
template <>
inline BF16 from_float<BF16>(float v) {
  uint32_t word;
  std::memcpy(&word, &v, sizeof(word));
  if (std::isnan(v)) return BF16{static_cast<uint16_t>((word >> 16) | 0x40)};  // keep it a (quiet) NaN
  word += 0x7FFFu + ((word >> 16) & 1u);  // round to nearest, ties to even
  return BF16{static_cast<uint16_t>(word >> 16)};
}

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

// Runs fn(begin, end) over [0, n) split into contiguous chunks on up to num_threads() threads; work smaller
// than `grain` items per thread stays on the calling thread. Exceptions from workers are rethrown here.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace megalith::kernels::cpu
