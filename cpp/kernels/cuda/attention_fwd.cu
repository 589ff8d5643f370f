// CUDA attention forward: the float32 (scalar) kernel and the launcher that picks the float32 or the
// tensor-core path (float16/bfloat16, attention_mma_fwd.cu). In the float32 kernel a block owns kRows query
// rows of one (sequence, query head) and walks 32-key tiles of its kv head with an online softmax; each warp
// owns kRows / 4 query rows, and within a tile lane j scores key j. Only out and the log-sum-exp are written.

#include "attention.cuh"

namespace megalith::kernels::cuda {
namespace {

constexpr int kRows = 16;
constexpr int kRowsPerWarp = kRows / kAttnWarps;

// ---- CUDA kernels

template <int D>
__global__ void __launch_bounds__(kAttnThreads) attention_forward_f32_kernel(const AttentionParams p) {
  constexpr int kPerLane = D / kWarp;
  __shared__ float q_tile[kRows * D];
  __shared__ float k_tile[kKeyTile * (D + 1)];  // padded: lanes read different rows of it
  __shared__ float v_tile[kKeyTile * D];
  const int64_t b = blockIdx.z, h = blockIdx.y, q0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t len_q = p.q_len(b);
  if (q0 >= len_q) return;  // block-uniform: this sequence is shorter than the longest one
  const int64_t hk = h / (p.heads_q / p.heads_kv), tq = p.q_start(b), tk = p.k_start(b);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const auto* k = static_cast<const float*>(p.k);
  const auto* v = static_cast<const float*>(p.v);
  load_rows<float, D>(static_cast<const float*>(p.q), tq + q0, len_q - q0, p.heads_q, h, kRows, q_tile, D);

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kPerLane];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = -INFINITY, l[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) acc[r][e] = 0.0f;
  }
  const int64_t k_end = p.key_end(b, min(len_q, q0 + kRows));
  for (int64_t k0 = 0; k0 < k_end; k0 += kKeyTile) {
    __syncthreads();  // the previous tile is no longer read (and q_tile is complete on the first pass)
    load_rows<float, D>(k, tk + k0, k_end - k0, p.heads_kv, hk, kKeyTile, k_tile, D + 1);
    load_rows<float, D>(v, tk + k0, k_end - k0, p.heads_kv, hk, kKeyTile, v_tile, D);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r;
      const int64_t qi = q0 + row, kj = k0 + lane;
      if (qi >= len_q) continue;  // warp-uniform
      const bool visible = kj < k_end && (!p.causal || kj <= qi + p.causal_shift);
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
    if (qi >= len_q) continue;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;  // a row that sees no key gives zeros
    float* out = static_cast<float*>(p.out) + ((tq + qi) * p.heads_q + h) * D;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) out[lane + e * kWarp] = acc[r][e] * inv;
    if (lane == 0) p.lse[p.lse_offset(b, h) + qi] = l[r] > 0.0f ? m[r] + logf(l[r]) : -INFINITY;
  }
}

template <int D>
void launch_f32(const AttentionParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.seq_q + kRows - 1) / kRows), static_cast<unsigned>(p.heads_q),
                  static_cast<unsigned>(p.batch));
  attention_forward_f32_kernel<D><<<grid, kAttnThreads, 0, stream>>>(p);
}

}  // namespace

// ---- kernel launchers

void attention_forward(const AttentionParams& p, void* stream) {
  check_attention_shape(p, "attention");
  check_grid((p.seq_q + kRows - 1) / kRows, 2147483647, "seq_q / 16");
  if (p.batch == 0 || p.seq_q == 0 || p.total_q == 0) return;
  if (p.dtype != DType::kFloat32) {
    attention_forward_mma(p, as_stream(stream));
  } else if (p.dim == 64) {
    launch_f32<64>(p, as_stream(stream));
  } else {
    launch_f32<128>(p, as_stream(stream));
  }
  MEGALITH_CUDA_CHECK(cudaGetLastError());
}

}  // namespace megalith::kernels::cuda
