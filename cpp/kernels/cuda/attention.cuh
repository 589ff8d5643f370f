// Shared layout helpers of the CUDA attention kernels (forward in attention_fwd.cu, backward in
// attention_bwd.cu). q/out/dq are [batch, seq, heads_q, D], k/v/dk/dv [batch, seq, heads_kv, D], lse and delta
// [batch, heads_q, seq] float32. Tiles are staged in shared memory as float32.
#pragma once

#include "common.cuh"

namespace megalith::kernels::cuda {

constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = kAttnWarps * kWarp;
constexpr int kKeyTile = kWarp;  // one key (forward, dq) or one query (dk/dv) per lane

// Element offset of row `s` of head `h` in a [batch, seq, heads, D] tensor.
__device__ __forceinline__ int64_t bshd(int64_t b, int64_t s, int64_t h, int64_t seq, int64_t heads, int D) {
  return ((b * seq + s) * heads + h) * D;
}

// Block-cooperative copy of rows [s0, s0 + rows) of head h into tile[rows][stride] (float32); rows past the
// end of the sequence are zero-filled.
template <typename T, int D>
__device__ void load_rows(const T* __restrict__ src, int64_t b, int64_t h, int64_t s0, int rows, int64_t seq,
                          int64_t heads, float* tile, int stride) {
  for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    const int64_t s = s0 + r;
    tile[r * stride + d] = s < seq ? to_f(src[bshd(b, s, h, seq, heads, D) + d]) : 0.0f;
  }
}

// Dot product of two float rows of length D held in shared memory.
template <int D>
__device__ __forceinline__ float dot_rows(const float* a, const float* b) {
  float acc = 0.0f;
#pragma unroll 8
  for (int d = 0; d < D; ++d) acc += a[d] * b[d];
  return acc;
}

}  // namespace megalith::kernels::cuda
