// CUDA FlashAttention-2 style forward pass with grouped-query heads. A block owns kRows query rows of one
// (batch, query head) and walks 32-key tiles of its kv head with an online softmax; each warp owns
// kRows / 4 query rows, and within a tile lane j scores key j. Only out and the log-sum-exp are written.

#include "attention.cuh"

namespace megalith::kernels::cuda {
namespace {

constexpr int kRows = 16;
constexpr int kRowsPerWarp = kRows / kAttnWarps;

// ---- CUDA kernels

template <typename T, int D>
__global__ void __launch_bounds__(kAttnThreads) attention_forward_kernel(const AttentionParams p) {
  constexpr int kPerLane = D / kWarp;
  __shared__ float q_tile[kRows * D];
  __shared__ float k_tile[kKeyTile * (D + 1)];  // padded: lanes read different rows of it
  __shared__ float v_tile[kKeyTile * D];
  const int64_t b = blockIdx.z, h = blockIdx.y, q0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t hk = h / (p.heads_q / p.heads_kv);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  load_rows<T, D>(static_cast<const T*>(p.q), b, h, q0, kRows, p.seq, p.heads_q, q_tile, D);

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kPerLane];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = -INFINITY, l[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) acc[r][e] = 0.0f;
  }
  const int64_t last_row = min(p.seq, q0 + kRows);
  const int64_t k_end = p.causal ? last_row : p.seq;
  for (int64_t k0 = 0; k0 < k_end; k0 += kKeyTile) {
    __syncthreads();  // the previous tile is no longer read (and q_tile is complete on the first pass)
    load_rows<T, D>(static_cast<const T*>(p.k), b, hk, k0, kKeyTile, p.seq, p.heads_kv, k_tile, D + 1);
    load_rows<T, D>(static_cast<const T*>(p.v), b, hk, k0, kKeyTile, p.seq, p.heads_kv, v_tile, D);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r;
      const int64_t qi = q0 + row, kj = k0 + lane;
      if (qi >= p.seq) continue;  // warp-uniform
      const bool visible = kj < p.seq && (!p.causal || kj <= qi);
      const float s = visible ? dot_rows<D>(q_tile + row * D, k_tile + lane * (D + 1)) * p.scale : -INFINITY;
      const float m_new = fmaxf(m[r], warp_max(s));
      if (m_new == -INFINITY) continue;  // nothing visible yet (warp-uniform)
      const float prob = visible ? expf(s - m_new) : 0.0f;
      const float alpha = expf(m[r] - m_new);  // 0 on the first visible tile (m = -inf)
      l[r] = l[r] * alpha + warp_sum(prob);
      m[r] = m_new;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) acc[r][e] *= alpha;
      for (int j = 0; j < kKeyTile; ++j) {
        const float pj = __shfl_sync(0xffffffffu, prob, j);
#pragma unroll
        for (int e = 0; e < kPerLane; ++e) acc[r][e] += pj * v_tile[j * D + lane + e * kWarp];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t qi = q0 + warp * kRowsPerWarp + r;
    if (qi >= p.seq) continue;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    T* out = static_cast<T*>(p.out) + bshd(b, qi, h, p.seq, p.heads_q, D);
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) out[lane + e * kWarp] = from_f<T>(acc[r][e] * inv);
    if (lane == 0) p.lse[(b * p.heads_q + h) * p.seq + qi] = l[r] > 0.0f ? m[r] + logf(l[r]) : -INFINITY;
  }
}

template <int D>
void launch(const AttentionParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.seq + kRows - 1) / kRows), static_cast<unsigned>(p.heads_q),
                  static_cast<unsigned>(p.batch));
  dispatch(p.dtype, [&](auto tag) { attention_forward_kernel<decltype(tag), D><<<grid, kAttnThreads, 0, stream>>>(p); });
}

}  // namespace

// ---- kernel launchers

void attention_forward(const AttentionParams& p, void* stream) {
  MEGALITH_CHECK(p.dim == 64 || p.dim == 128, "attention: the CUDA kernel takes head_dim 64 or 128, got ", p.dim);
  MEGALITH_CHECK(p.heads_kv > 0 && p.heads_q % p.heads_kv == 0, "attention: heads_kv (", p.heads_kv,
                 ") must divide heads_q (", p.heads_q, ")");
  check_grid(p.heads_q, 65535, "heads_q");
  check_grid(p.batch, 65535, "batch");
  if (p.batch == 0 || p.seq == 0) return;
  if (p.dim == 64) {
    launch<64>(p, as_stream(stream));
  } else {
    launch<128>(p, as_stream(stream));
  }
  MEGALITH_CUDA_CHECK(cudaGetLastError());
}

}  // namespace megalith::kernels::cuda
