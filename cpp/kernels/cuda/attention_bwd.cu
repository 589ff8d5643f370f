// CUDA FlashAttention-2 style backward pass with grouped-query heads, recomputing each probability from the
// saved log-sum-exp: delta = rowsum(dout * out); then dq per query block (lane j handles key j of a 32-key
// tile) and dk/dv per key block (lane i handles query i of a 32-query tile, over every query head of the
// group). The two passes write disjoint rows, so no atomics are needed.

#include "attention.cuh"

namespace megalith::kernels::cuda {
namespace {

// Rows per block of the dq and dk/dv kernels: 8 for D = 128 keeps the float tiles under 48 KiB.
template <int D>
constexpr int rows_per_block() {
  return D == 128 ? 8 : 16;
}

// ---- CUDA kernels

// One warp per (batch, head, query) row: delta = dout . out.
template <typename T, int D>
__global__ void __launch_bounds__(kAttnThreads) attention_delta_kernel(const AttentionBackwardParams p, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kAttnWarps + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;  // warp-uniform
  const int64_t i = row % p.seq, h = (row / p.seq) % p.heads_q, b = row / (p.seq * p.heads_q);
  const int64_t at = bshd(b, i, h, p.seq, p.heads_q, D);
  float sum = 0.0f;
  for (int d = lane; d < D; d += kWarp) {
    sum += to_f(static_cast<const T*>(p.out)[at + d]) * to_f(static_cast<const T*>(p.dout)[at + d]);
  }
  sum = warp_sum(sum);
  if (lane == 0) p.delta[row] = sum;
}

template <typename T, int D>
__global__ void __launch_bounds__(kAttnThreads) attention_dq_kernel(const AttentionBackwardParams p) {
  constexpr int kRows = rows_per_block<D>(), kRowsPerWarp = kRows / kAttnWarps, kPerLane = D / kWarp;
  __shared__ float q_tile[kRows * D];
  __shared__ float do_tile[kRows * D];
  __shared__ float k_tile[kKeyTile * (D + 1)];
  __shared__ float v_tile[kKeyTile * (D + 1)];
  const int64_t b = blockIdx.z, h = blockIdx.y, q0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t hk = h / (p.heads_q / p.heads_kv);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  load_rows<T, D>(static_cast<const T*>(p.q), b, h, q0, kRows, p.seq, p.heads_q, q_tile, D);
  load_rows<T, D>(static_cast<const T*>(p.dout), b, h, q0, kRows, p.seq, p.heads_q, do_tile, D);
  float lse[kRowsPerWarp], delta[kRowsPerWarp], acc[kRowsPerWarp][kPerLane];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t qi = min(q0 + warp * kRowsPerWarp + r, p.seq - 1);  // clamped rows are never written
    lse[r] = p.lse[(b * p.heads_q + h) * p.seq + qi];
    delta[r] = p.delta[(b * p.heads_q + h) * p.seq + qi];
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) acc[r][e] = 0.0f;
  }
  const int64_t k_end = p.causal ? min(p.seq, q0 + kRows) : p.seq;
  for (int64_t k0 = 0; k0 < k_end; k0 += kKeyTile) {
    __syncthreads();
    load_rows<T, D>(static_cast<const T*>(p.k), b, hk, k0, kKeyTile, p.seq, p.heads_kv, k_tile, D + 1);
    load_rows<T, D>(static_cast<const T*>(p.v), b, hk, k0, kKeyTile, p.seq, p.heads_kv, v_tile, D + 1);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r;
      const int64_t qi = q0 + row, kj = k0 + lane;
      if (qi >= p.seq) continue;  // warp-uniform
      const bool visible = kj < p.seq && (!p.causal || kj <= qi);
      float ds = 0.0f;
      if (visible) {
        const float prob = expf(dot_rows<D>(q_tile + row * D, k_tile + lane * (D + 1)) * p.scale - lse[r]);
        const float dp = dot_rows<D>(do_tile + row * D, v_tile + lane * (D + 1));
        ds = prob * (dp - delta[r]) * p.scale;
      }
      for (int j = 0; j < kKeyTile; ++j) {
        const float dsj = __shfl_sync(0xffffffffu, ds, j);
#pragma unroll
        for (int e = 0; e < kPerLane; ++e) acc[r][e] += dsj * k_tile[j * (D + 1) + lane + e * kWarp];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t qi = q0 + warp * kRowsPerWarp + r;
    if (qi >= p.seq) continue;
    T* dq = static_cast<T*>(p.dq) + bshd(b, qi, h, p.seq, p.heads_q, D);
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) dq[lane + e * kWarp] = from_f<T>(acc[r][e]);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kAttnThreads) attention_dkdv_kernel(const AttentionBackwardParams p) {
  constexpr int kRows = rows_per_block<D>(), kRowsPerWarp = kRows / kAttnWarps, kPerLane = D / kWarp;
  __shared__ float k_tile[kRows * D];
  __shared__ float v_tile[kRows * D];
  __shared__ float q_tile[kKeyTile * (D + 1)];
  __shared__ float do_tile[kKeyTile * (D + 1)];
  const int64_t b = blockIdx.z, hk = blockIdx.y, k0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t group = p.heads_q / p.heads_kv;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  load_rows<T, D>(static_cast<const T*>(p.k), b, hk, k0, kRows, p.seq, p.heads_kv, k_tile, D);
  load_rows<T, D>(static_cast<const T*>(p.v), b, hk, k0, kRows, p.seq, p.heads_kv, v_tile, D);
  float dk[kRowsPerWarp][kPerLane], dv[kRowsPerWarp][kPerLane];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) dk[r][e] = 0.0f, dv[r][e] = 0.0f;
  }
  // Causal: queries before k0 see none of these keys; start at the 32-aligned tile holding query k0.
  const int64_t q_begin = p.causal ? (k0 / kKeyTile) * kKeyTile : 0;
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const float* lse = p.lse + (b * p.heads_q + h) * p.seq;
    const float* delta = p.delta + (b * p.heads_q + h) * p.seq;
    for (int64_t q0 = q_begin; q0 < p.seq; q0 += kKeyTile) {
      __syncthreads();
      load_rows<T, D>(static_cast<const T*>(p.q), b, h, q0, kKeyTile, p.seq, p.heads_q, q_tile, D + 1);
      load_rows<T, D>(static_cast<const T*>(p.dout), b, h, q0, kKeyTile, p.seq, p.heads_q, do_tile, D + 1);
      __syncthreads();
      const int64_t qi = q0 + lane;
      const float lse_i = qi < p.seq ? lse[qi] : 0.0f, delta_i = qi < p.seq ? delta[qi] : 0.0f;
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int row = warp * kRowsPerWarp + r;
        const int64_t kj = k0 + row;
        if (kj >= p.seq) continue;  // warp-uniform
        const bool visible = qi < p.seq && (!p.causal || kj <= qi);
        float prob = 0.0f, ds = 0.0f;
        if (visible) {
          prob = expf(dot_rows<D>(q_tile + lane * (D + 1), k_tile + row * D) * p.scale - lse_i);
          const float dp = dot_rows<D>(do_tile + lane * (D + 1), v_tile + row * D);
          ds = prob * (dp - delta_i) * p.scale;
        }
        for (int i = 0; i < kKeyTile; ++i) {
          const float pi = __shfl_sync(0xffffffffu, prob, i), dsi = __shfl_sync(0xffffffffu, ds, i);
#pragma unroll
          for (int e = 0; e < kPerLane; ++e) {
            dv[r][e] += pi * do_tile[i * (D + 1) + lane + e * kWarp];
            dk[r][e] += dsi * q_tile[i * (D + 1) + lane + e * kWarp];
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t kj = k0 + warp * kRowsPerWarp + r;
    if (kj >= p.seq) continue;
    const int64_t at = bshd(b, kj, hk, p.seq, p.heads_kv, D);
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      static_cast<T*>(p.dk)[at + lane + e * kWarp] = from_f<T>(dk[r][e]);
      static_cast<T*>(p.dv)[at + lane + e * kWarp] = from_f<T>(dv[r][e]);
    }
  }
}

template <int D>
void launch(const AttentionBackwardParams& p, cudaStream_t stream) {
  constexpr int kRows = rows_per_block<D>();
  const int64_t rows = p.batch * p.heads_q * p.seq;
  check_grid((rows + kAttnWarps - 1) / kAttnWarps, 2147483647, "batch * heads_q * seq / 4");
  const auto blocks = [](int64_t n) { return static_cast<unsigned>((n + kRows - 1) / kRows); };
  const dim3 dq_grid(blocks(p.seq), static_cast<unsigned>(p.heads_q), static_cast<unsigned>(p.batch));
  const dim3 dkdv_grid(blocks(p.seq), static_cast<unsigned>(p.heads_kv), static_cast<unsigned>(p.batch));
  dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto delta_blocks = static_cast<unsigned>((rows + kAttnWarps - 1) / kAttnWarps);
    attention_delta_kernel<T, D><<<delta_blocks, kAttnThreads, 0, stream>>>(p, rows);
    MEGALITH_CUDA_CHECK(cudaGetLastError());
    attention_dq_kernel<T, D><<<dq_grid, kAttnThreads, 0, stream>>>(p);
    MEGALITH_CUDA_CHECK(cudaGetLastError());
    attention_dkdv_kernel<T, D><<<dkdv_grid, kAttnThreads, 0, stream>>>(p);
  });
}

}  // namespace

// ---- kernel launchers

void attention_backward(const AttentionBackwardParams& p, void* stream) {
  MEGALITH_CHECK(p.dim == 64 || p.dim == 128, "attention backward: the CUDA kernel takes head_dim 64 or 128, got ",
                 p.dim);
  MEGALITH_CHECK(p.heads_kv > 0 && p.heads_q % p.heads_kv == 0, "attention backward: heads_kv (", p.heads_kv,
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
