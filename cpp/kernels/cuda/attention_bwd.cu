// CUDA attention backward: delta = rowsum(dout * out) - dlse for every path, the float32 (scalar) dq and dk/dv
// kernels, and the launcher that picks the float32 or the tensor-core path (float16/bfloat16,
// attention_mma_bwd.cu). Probabilities are recomputed from the saved log-sum-exp. In the float32 kernels lane
// j handles key j of a 32-key tile (dq, per query block) or query j of a 32-query tile (dk/dv, per key block,
// over every query head of the group). The two passes write disjoint rows, so no atomics are needed.

#include "attention.cuh"

namespace megalith::kernels::cuda {
namespace {

// Rows per block of the float32 dq and dk/dv kernels: 8 for D = 128 keeps the float tiles under 48 KiB.
template <int D>
constexpr int rows_per_block() {
  return D == 128 ? 8 : 16;
}

// ---- CUDA kernels

// One warp per (token, head) row: delta = dout . out - dlse, stored at the row's lse index.
template <typename T, int D>
__global__ void __launch_bounds__(kAttnThreads) attention_delta_kernel(const AttentionBackwardParams p, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kAttnWarps + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;  // warp-uniform
  const int64_t at = row * D;
  float sum = 0.0f;
  for (int d = lane; d < D; d += kWarp) {
    sum += to_f(static_cast<const T*>(p.out)[at + d]) * to_f(static_cast<const T*>(p.dout)[at + d]);
  }
  sum = warp_sum(sum);
  if (lane == 0) {
    const int64_t idx = p.lse_index(row / p.heads_q, row % p.heads_q);
    p.delta[idx] = p.dlse != nullptr ? sum - p.dlse[idx] : sum;
  }
}

template <int D>
__global__ void __launch_bounds__(kAttnThreads) attention_dq_f32_kernel(const AttentionBackwardParams p) {
  constexpr int kRows = rows_per_block<D>(), kRowsPerWarp = kRows / kAttnWarps, kPerLane = D / kWarp;
  __shared__ float q_tile[kRows * D];
  __shared__ float do_tile[kRows * D];
  __shared__ float k_tile[kKeyTile * (D + 1)];
  __shared__ float v_tile[kKeyTile * (D + 1)];
  const int64_t b = blockIdx.z, h = blockIdx.y, q0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t len_q = p.q_len(b);
  if (q0 >= len_q) return;  // block-uniform
  const int64_t hk = h / (p.heads_q / p.heads_kv), tq = p.q_start(b), tk = p.k_start(b);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const auto* k = static_cast<const float*>(p.k);
  const auto* v = static_cast<const float*>(p.v);
  load_rows<float, D>(static_cast<const float*>(p.q), tq + q0, len_q - q0, p.heads_q, h, kRows, q_tile, D);
  load_rows<float, D>(static_cast<const float*>(p.dout), tq + q0, len_q - q0, p.heads_q, h, kRows, do_tile, D);
  const float* lse_row = p.lse + p.lse_offset(b, h);
  const float* delta_row = p.delta + p.lse_offset(b, h);
  float lse[kRowsPerWarp], delta[kRowsPerWarp], acc[kRowsPerWarp][kPerLane];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t qi = min(q0 + warp * kRowsPerWarp + r, len_q - 1);  // clamped rows are never written
    lse[r] = lse_row[qi];
    delta[r] = delta_row[qi];
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) acc[r][e] = 0.0f;
  }
  const int64_t k_end = p.key_end(b, min(len_q, q0 + kRows));
  for (int64_t k0 = 0; k0 < k_end; k0 += kKeyTile) {
    __syncthreads();
    load_rows<float, D>(k, tk + k0, k_end - k0, p.heads_kv, hk, kKeyTile, k_tile, D + 1);
    load_rows<float, D>(v, tk + k0, k_end - k0, p.heads_kv, hk, kKeyTile, v_tile, D + 1);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r;
      const int64_t qi = q0 + row, kj = k0 + lane;
      if (qi >= len_q) continue;  // warp-uniform
      const bool visible = kj < k_end && (!p.causal || kj <= qi + p.causal_shift);
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
    if (qi >= len_q) continue;
    float* dq = static_cast<float*>(p.dq) + ((tq + qi) * p.heads_q + h) * D;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) dq[lane + e * kWarp] = acc[r][e];
  }
}

template <int D>
__global__ void __launch_bounds__(kAttnThreads) attention_dkdv_f32_kernel(const AttentionBackwardParams p) {
  constexpr int kRows = rows_per_block<D>(), kRowsPerWarp = kRows / kAttnWarps, kPerLane = D / kWarp;
  __shared__ float k_tile[kRows * D];
  __shared__ float v_tile[kRows * D];
  __shared__ float q_tile[kKeyTile * (D + 1)];
  __shared__ float do_tile[kKeyTile * (D + 1)];
  const int64_t b = blockIdx.z, hk = blockIdx.y, k0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t len_k = p.k_len(b), len_q = p.q_len(b);
  if (k0 >= len_k) return;  // block-uniform
  const int64_t group = p.heads_q / p.heads_kv, tq = p.q_start(b), tk = p.k_start(b);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const auto* q = static_cast<const float*>(p.q);
  const auto* dout = static_cast<const float*>(p.dout);
  load_rows<float, D>(static_cast<const float*>(p.k), tk + k0, len_k - k0, p.heads_kv, hk, kRows, k_tile, D);
  load_rows<float, D>(static_cast<const float*>(p.v), tk + k0, len_k - k0, p.heads_kv, hk, kRows, v_tile, D);
  float dk[kRowsPerWarp][kPerLane], dv[kRowsPerWarp][kPerLane];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) dk[r][e] = 0.0f, dv[r][e] = 0.0f;
  }
  // Causal: queries before k0 - shift see none of these keys.
  const int64_t q_begin = p.first_query_tile(k0, kKeyTile);
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const float* lse = p.lse + p.lse_offset(b, h);
    const float* delta = p.delta + p.lse_offset(b, h);
    for (int64_t q0 = q_begin; q0 < len_q; q0 += kKeyTile) {
      __syncthreads();
      load_rows<float, D>(q, tq + q0, len_q - q0, p.heads_q, h, kKeyTile, q_tile, D + 1);
      load_rows<float, D>(dout, tq + q0, len_q - q0, p.heads_q, h, kKeyTile, do_tile, D + 1);
      __syncthreads();
      const int64_t qi = q0 + lane;
      const float lse_i = qi < len_q ? lse[qi] : 0.0f, delta_i = qi < len_q ? delta[qi] : 0.0f;
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int row = warp * kRowsPerWarp + r;
        const int64_t kj = k0 + row;
        if (kj >= len_k) continue;  // warp-uniform
        const bool visible = qi < len_q && (!p.causal || kj <= qi + p.causal_shift);
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
    if (kj >= len_k) continue;
    const int64_t at = ((tk + kj) * p.heads_kv + hk) * D;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      static_cast<float*>(p.dk)[at + lane + e * kWarp] = dk[r][e];
      static_cast<float*>(p.dv)[at + lane + e * kWarp] = dv[r][e];
    }
  }
}

template <int D>
void launch_delta(const AttentionBackwardParams& p, cudaStream_t stream) {
  const int64_t rows = p.total_q * p.heads_q;
  check_grid((rows + kAttnWarps - 1) / kAttnWarps, 2147483647, "tokens * heads_q / 4");
  const auto blocks = static_cast<unsigned>((rows + kAttnWarps - 1) / kAttnWarps);
  dispatch(p.dtype, [&](auto tag) {
    attention_delta_kernel<decltype(tag), D><<<blocks, kAttnThreads, 0, stream>>>(p, rows);
  });
  MEGALITH_CUDA_CHECK(cudaGetLastError());
}

template <int D>
void launch_f32(const AttentionBackwardParams& p, cudaStream_t stream) {
  constexpr int kRows = rows_per_block<D>();
  const auto blocks = [](int64_t n) { return static_cast<unsigned>((n + kRows - 1) / kRows); };
  check_grid(blocks(p.seq_q), 2147483647, "seq_q / rows per block");
  check_grid(blocks(p.seq_k), 2147483647, "seq_k / rows per block");
  const dim3 dq_grid(blocks(p.seq_q), static_cast<unsigned>(p.heads_q), static_cast<unsigned>(p.batch));
  const dim3 dkdv_grid(blocks(p.seq_k), static_cast<unsigned>(p.heads_kv), static_cast<unsigned>(p.batch));
  if (p.seq_q > 0) {
    attention_dq_f32_kernel<D><<<dq_grid, kAttnThreads, 0, stream>>>(p);
    MEGALITH_CUDA_CHECK(cudaGetLastError());
  }
  if (p.seq_k > 0) {
    attention_dkdv_f32_kernel<D><<<dkdv_grid, kAttnThreads, 0, stream>>>(p);
  }
}

}  // namespace

// ---- kernel launchers

void attention_backward(const AttentionBackwardParams& p, void* stream) {
  check_attention_shape(p, "attention backward");
  if (p.batch == 0 || (p.total_q == 0 && p.total_k == 0)) return;
  // Keys that no query sees still get a gradient (zero), so the dk/dv pass runs even without queries.
  if (p.total_q > 0) {
    if (p.dim == 64) {
      launch_delta<64>(p, as_stream(stream));
    } else {
      launch_delta<128>(p, as_stream(stream));
    }
  }
  if (p.dtype != DType::kFloat32) {
    attention_backward_mma(p, as_stream(stream));
  } else if (p.dim == 64) {
    launch_f32<64>(p, as_stream(stream));
  } else {
    launch_f32<128>(p, as_stream(stream));
  }
  MEGALITH_CUDA_CHECK(cudaGetLastError());
}

}  // namespace megalith::kernels::cuda
