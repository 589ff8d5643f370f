// Shared pieces of the CUDA attention kernels. Layouts are those of AttentionShape (megalith/kernels.h):
// q/out/dq [total_q, heads_q, D], k/v/dk/dv [total_k, heads_kv, D], lse/delta float32. Two paths exist:
// a scalar float32 one (attention_fwd.cu, attention_bwd.cu: tiles staged in shared memory as float32, one
// key or query per lane) and a tensor-core one for float16/bfloat16 (attention_mma_*.cu, mma.sync on sm80+).
#pragma once

#include "common.cuh"

namespace megalith::kernels::cuda {

constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = kAttnWarps * kWarp;
constexpr int kKeyTile = kWarp;  // scalar path: one key (forward, dq) or one query (dk/dv) per lane
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Block-cooperative copy of `rows` token rows t0, t0 + 1, ... of head h of a [tokens, heads, D] tensor into
// tile[rows][stride] (float32); rows at or past `valid` are zero-filled.
template <typename T, int D>
__device__ void load_rows(const T* __restrict__ src, int64_t t0, int64_t valid, int64_t heads, int64_t h, int rows,
                          float* tile, int stride) {
  for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    tile[r * stride + d] = r < valid ? to_f(src[((t0 + r) * heads + h) * D + d]) : 0.0f;
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

// Checks shared by the forward and backward launchers (head_dim, heads, grid limits).
inline void check_attention_shape(const AttentionShape& p, const char* what) {
  MEGALITH_CHECK(p.dim == 64 || p.dim == 128, what, ": the CUDA kernels take head_dim 64 or 128, got ", p.dim);
  MEGALITH_CHECK(p.heads_kv > 0 && p.heads_q % p.heads_kv == 0, what, ": heads_kv (", p.heads_kv,
                 ") must divide heads_q (", p.heads_q, ")");
  MEGALITH_CHECK(p.seq_q >= 0 && p.seq_k >= 0, what, ": negative sequence length");
  check_grid(p.heads_q, 65535, "heads_q");
  check_grid(p.batch, 65535, "the number of sequences");
}

// Tensor-core path for float16/bfloat16 (attention_mma_fwd.cu, attention_mma_bwd.cu). The backward entry
// expects p.delta to be filled already.
void attention_forward_mma(const AttentionParams& p, cudaStream_t stream);
void attention_backward_mma(const AttentionBackwardParams& p, cudaStream_t stream);

}  // namespace megalith::kernels::cuda
