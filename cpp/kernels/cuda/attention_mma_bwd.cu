// CUDA FlashAttention-2 backward on tensor cores (float16/bfloat16, sm80+), dense or varlen, with grouped-query
// heads. Probabilities are recomputed from the saved log-sum-exp; delta (rowsum(dout * out) - dlse) is filled
// beforehand by attention_bwd.cu. Two kernels write disjoint outputs, so nothing is accumulated atomically and
// results are deterministic:
//   dq:   a block owns 64 query rows (16 per warp) and walks key tiles: S = Q K^T, dP = dO V^T,
//         dS = P (dP - delta), dQ += dS K;
//   dkdv: a block owns 64 keys (16 per warp) of one kv head and walks the query tiles of every query head of
//         its group: S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q.
// Both double-buffer the tiles they walk through cp.async. This recomputes S and dP in both kernels (seven
// matmuls instead of FlashAttention-2's five) in exchange for no float32 dq buffer and no atomics.

#include <utility>

#include "attention_mma.cuh"

namespace megalith::kernels::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kBlock = 64;  // rows a block owns: query rows (dq) or keys (dkdv), 16 per warp

// Rows of the tiles a block walks: keys (dq) or queries (dkdv). 32 for D = 128 keeps the float32 S and dP
// fragments, next to the D-wide accumulators, within the register budget.
template <int D>
constexpr int walk_tile() {
  return D == 128 ? 32 : 64;
}

template <typename T, int D>
constexpr size_t dq_smem_bytes() {
  return static_cast<size_t>(2 * kBlock + 4 * walk_tile<D>()) * D * sizeof(T);  // Q, dO, 2 x K, 2 x V
}

template <typename T, int D>
constexpr size_t dkdv_smem_bytes() {
  // K, V, 2 x Q, 2 x dO, then 2 x (lse, delta) float rows
  return static_cast<size_t>(2 * kBlock + 4 * walk_tile<D>()) * D * sizeof(T) + 4 * walk_tile<D>() * sizeof(float);
}

// Saved statistics of query qi in log2 units; rows past the sequence (or that saw no key) get lse = +inf, so
// every probability recomputed for them is exp2(-inf) = 0.
__device__ __forceinline__ void row_stats(const AttentionBackwardParams& p, int64_t b, int64_t h, int64_t qi,
                                          int64_t len_q, float* lse2, float* delta) {
  *lse2 = INFINITY, *delta = 0.0f;
  if (qi >= len_q) return;
  const float lse = p.lse[p.lse_offset(b, h) + qi];
  if (lse != -INFINITY) *lse2 = lse * kLog2e;
  *delta = p.delta[p.lse_offset(b, h) + qi];
}

// ---- CUDA kernels

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_dq_mma_kernel(const AttentionBackwardParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace mma;
  constexpr int kTile = walk_tile<D>();
  extern __shared__ __align__(128) unsigned char smem[];
  T* q_tile = reinterpret_cast<T*>(smem);
  T* do_tile = q_tile + kBlock * D;
  T* k_tiles = do_tile + kBlock * D;  // two buffers of [kTile][D]
  T* v_tiles = k_tiles + 2 * kTile * D;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t m0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kBlock;  // causal: longest first
  const int64_t len_q = p.q_len(b);
  if (m0 >= len_q) return;  // block-uniform
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t hk = h / (p.heads_q / p.heads_kv), tq = p.q_start(b), tk = p.k_start(b);
  const int64_t rows = min(static_cast<int64_t>(kBlock), len_q - m0);
  const int64_t k_end = p.key_end(b, m0 + rows);
  const int num_tiles = static_cast<int>((k_end + kTile - 1) / kTile);
  const auto* k = static_cast<const T*>(p.k);
  const auto* v = static_cast<const T*>(p.v);
  const int64_t qi = m0 + warp * 16 + lane / 4;  // this thread's rows: qi and qi + 8
  const float scale_log2 = p.scale * kLog2e;
  float lse2[2], delta[2];
  row_stats(p, b, h, qi, len_q, &lse2[0], &delta[0]);
  row_stats(p, b, h, qi + 8, len_q, &lse2[1], &delta[1]);

  float dq[D / 8][4];
  zero(dq);
  if (num_tiles > 0) {
    cp_tile<T, D, kBlock, kThreads>(q_tile, static_cast<const T*>(p.q), tq + m0, rows, p.heads_q, h);
    cp_tile<T, D, kBlock, kThreads>(do_tile, static_cast<const T*>(p.dout), tq + m0, rows, p.heads_q, h);
    cp_tile<T, D, kTile, kThreads>(k_tiles, k, tk, k_end, p.heads_kv, hk);
    cp_tile<T, D, kTile, kThreads>(v_tiles, v, tk, k_end, p.heads_kv, hk);
    cp_async_commit();
  }
  for (int t = 0; t < num_tiles; ++t) {
    const int64_t n0 = static_cast<int64_t>(t) * kTile;
    const T* k_tile = k_tiles + (t & 1) * kTile * D;
    const T* v_tile = v_tiles + (t & 1) * kTile * D;
    if (t + 1 < num_tiles) {
      const int64_t n1 = n0 + kTile;
      cp_tile<T, D, kTile, kThreads>(k_tiles + ((t + 1) & 1) * kTile * D, k, tk + n1, k_end - n1, p.heads_kv, hk);
      cp_tile<T, D, kTile, kThreads>(v_tiles + ((t + 1) & 1) * kTile * D, v, tk + n1, k_end - n1, p.heads_kv, hk);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    float s[kTile / 8][4], dp[kTile / 8][4];
    zero(s);
    zero(dp);
    gemm_abt<T, D, kTile>(s, q_tile, warp * 16, k_tile, lane);
    gemm_abt<T, D, kTile>(dp, do_tile, warp * 16, v_tile, lane);
    const bool mask = n0 + kTile > k_end || (p.causal && n0 + kTile - 1 > m0 + p.causal_shift);
    scale_mask(s, scale_log2, mask, n0, k_end, qi, p, lane);
#pragma unroll
    for (int nt = 0; nt < kTile / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = exp2f(s[nt][e] - lse2[e >> 1]) * (dp[nt][e] - delta[e >> 1]);  // dS
    }
    gemm_pb<T, D, kTile>(dq, s, k_tile, lane);
    __syncthreads();
  }
  T* out = static_cast<T*>(p.dq);
  T* row_lo = qi < len_q ? out + ((tq + qi) * p.heads_q + h) * D : nullptr;
  T* row_hi = qi + 8 < len_q ? out + ((tq + qi + 8) * p.heads_q + h) * D : nullptr;
  store_rows<T, D>(dq, p.scale, p.scale, row_lo, row_hi, lane);
#endif
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_dkdv_mma_kernel(const AttentionBackwardParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace mma;
  constexpr int kTile = walk_tile<D>();
  extern __shared__ __align__(128) unsigned char smem[];
  T* k_tile = reinterpret_cast<T*>(smem);
  T* v_tile = k_tile + kBlock * D;
  T* q_tiles = v_tile + kBlock * D;  // two buffers of [kTile][D]
  T* do_tiles = q_tiles + 2 * kTile * D;
  float* lse_tiles = reinterpret_cast<float*>(do_tiles + 2 * kTile * D);  // two buffers of [kTile]
  float* delta_tiles = lse_tiles + 2 * kTile;
  const int64_t b = blockIdx.z, hk = blockIdx.y, n0 = static_cast<int64_t>(blockIdx.x) * kBlock;
  const int64_t len_k = p.k_len(b), len_q = p.q_len(b);
  if (n0 >= len_k) return;  // block-uniform
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t group = p.heads_q / p.heads_kv, tq = p.q_start(b), tk = p.k_start(b);
  const int64_t keys = min(static_cast<int64_t>(kBlock), len_k - n0);
  // Causal: the first query tile holding a query that sees key n0; earlier tiles see none of this block.
  const int64_t q_begin = p.first_query_tile(n0, kTile);
  const int64_t q_tiles_per_head = q_begin < len_q ? (len_q - q_begin + kTile - 1) / kTile : 0;
  const int iters = static_cast<int>(group * q_tiles_per_head);
  const int64_t kj = n0 + warp * 16 + lane / 4;  // this thread's keys: kj and kj + 8
  const float scale_log2 = p.scale * kLog2e;
  const auto* q = static_cast<const T*>(p.q);
  const auto* dout = static_cast<const T*>(p.dout);

  // Issues the loads of walk step `it` (query head, query tile) into buffer `buf`.
  auto issue = [&](int it, int buf) {
    const int64_t h = hk * group + it / q_tiles_per_head, q0 = q_begin + (it % q_tiles_per_head) * kTile;
    cp_tile<T, D, kTile, kThreads>(q_tiles + buf * kTile * D, q, tq + q0, len_q - q0, p.heads_q, h);
    cp_tile<T, D, kTile, kThreads>(do_tiles + buf * kTile * D, dout, tq + q0, len_q - q0, p.heads_q, h);
    for (int i = threadIdx.x; i < kTile; i += kThreads) {
      row_stats(p, b, h, q0 + i, len_q, lse_tiles + buf * kTile + i, delta_tiles + buf * kTile + i);
    }
  };
  float dk[D / 8][4], dv[D / 8][4];
  zero(dk);
  zero(dv);
  if (iters > 0) {
    cp_tile<T, D, kBlock, kThreads>(k_tile, static_cast<const T*>(p.k), tk + n0, keys, p.heads_kv, hk);
    cp_tile<T, D, kBlock, kThreads>(v_tile, static_cast<const T*>(p.v), tk + n0, keys, p.heads_kv, hk);
    issue(0, 0);
    cp_async_commit();
  }
  for (int it = 0; it < iters; ++it) {
    const int buf = it & 1;
    const int64_t q0 = q_begin + (it % q_tiles_per_head) * kTile;
    if (it + 1 < iters) issue(it + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* q_tile = q_tiles + buf * kTile * D;
    const T* do_tile = do_tiles + buf * kTile * D;
    const float* lse2 = lse_tiles + buf * kTile;
    const float* delta = delta_tiles + buf * kTile;
    float s[kTile / 8][4], dp[kTile / 8][4];  // rows: this warp's keys; columns: the tile's queries
    zero(s);
    zero(dp);
    gemm_abt<T, D, kTile>(s, k_tile, warp * 16, q_tile, lane);
    gemm_abt<T, D, kTile>(dp, v_tile, warp * 16, do_tile, lane);
    const bool mask = n0 + kBlock > len_k || (p.causal && n0 + kBlock - 1 > q0 + p.causal_shift);
#pragma unroll
    for (int nt = 0; nt < kTile / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * (lane % 4) + (e & 1);
        const int64_t key = kj + (e >> 1) * 8;
        const bool hidden = mask && (key >= len_k || (p.causal && key > q0 + col + p.causal_shift));
        const float prob = hidden ? 0.0f : exp2f(s[nt][e] * scale_log2 - lse2[col]);
        s[nt][e] = prob;
        dp[nt][e] = prob * (dp[nt][e] - delta[col]);  // dS^T
      }
    }
    gemm_pb<T, D, kTile>(dv, s, do_tile, lane);
    gemm_pb<T, D, kTile>(dk, dp, q_tile, lane);
    __syncthreads();
  }
  const int64_t stride = p.heads_kv * D;
  const int64_t at = (tk + kj) * stride + hk * D;
  const bool lo = kj < len_k, hi = kj + 8 < len_k;
  store_rows<T, D>(dk, p.scale, p.scale, lo ? static_cast<T*>(p.dk) + at : nullptr,
                   hi ? static_cast<T*>(p.dk) + at + 8 * stride : nullptr, lane);
  store_rows<T, D>(dv, 1.0f, 1.0f, lo ? static_cast<T*>(p.dv) + at : nullptr,
                   hi ? static_cast<T*>(p.dv) + at + 8 * stride : nullptr, lane);
#endif
}

template <typename T, int D>
void launch(const AttentionBackwardParams& p, cudaStream_t stream) {
  const auto blocks = [](int64_t n) { return static_cast<unsigned>((n + kBlock - 1) / kBlock); };
  if (p.seq_q > 0) {
    const dim3 grid(blocks(p.seq_q), static_cast<unsigned>(p.heads_q), static_cast<unsigned>(p.batch));
    mma::launch_with_smem(attention_dq_mma_kernel<T, D>, grid, kThreads, dq_smem_bytes<T, D>(), stream, p);
  }
  if (p.seq_k > 0) {
    const dim3 grid(blocks(p.seq_k), static_cast<unsigned>(p.heads_kv), static_cast<unsigned>(p.batch));
    mma::launch_with_smem(attention_dkdv_mma_kernel<T, D>, grid, kThreads, dkdv_smem_bytes<T, D>(), stream, p);
  }
}

}  // namespace

// ---- kernel launchers

void attention_backward_mma(const AttentionBackwardParams& p, cudaStream_t stream) {
  const char* what = "attention backward";
  mma::check_tensor_cores(what);
  const std::pair<const void*, const char*> inputs[] = {{p.q, "q"},       {p.k, "k"},        {p.v, "v"},
                                                        {p.dout, "grad_out"}, {p.dq, "grad_q"}, {p.dk, "grad_k"},
                                                        {p.dv, "grad_v"}};
  for (const auto& [ptr, name] : inputs) mma::check_aligned(ptr, name, what);
  check_grid((p.seq_q + kBlock - 1) / kBlock, 2147483647, "seq_q / 64");
  check_grid((p.seq_k + kBlock - 1) / kBlock, 2147483647, "seq_k / 64");
  mma::dispatch_16bit(p.dtype, what, [&](auto tag) {
    if (p.dim == 64) {
      launch<decltype(tag), 64>(p, stream);
    } else {
      launch<decltype(tag), 128>(p, stream);
    }
  });
}

}  // namespace megalith::kernels::cuda
