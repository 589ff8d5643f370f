// CUDA FlashAttention-2 forward on tensor cores (float16/bfloat16, sm80+), dense or varlen, with grouped-query
// heads. A block of 4 warps owns 64 query rows of one (sequence, query head), 16 rows per warp, and walks
// 64-key tiles of its kv head: S = Q K^T and O += P V with mma.sync, the online softmax in float32 registers,
// K/V tiles double-buffered in shared memory through cp.async (the next tile loads while this one computes).
// Only out and the log-sum-exp are written.

#include "attention_mma.cuh"

namespace megalith::kernels::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kBlockM = 64;  // query rows per block (16 per warp)
constexpr int kBlockN = 64;  // keys per tile

template <typename T, int D>
constexpr size_t smem_bytes() {
  return static_cast<size_t>(kBlockM + 4 * kBlockN) * D * sizeof(T);  // Q, 2 x K, 2 x V
}

// ---- CUDA kernels

// One online-softmax step for this thread's two rows: s (log2 units) becomes P = exp2(s - m_new), the running
// max m and sum l are updated and the output accumulator o is rescaled. l stays a per-thread partial sum (the
// four lanes of a row are added at the end); m is the row's max across those lanes.
template <int D>
__device__ __forceinline__ void softmax_step(float (&s)[kBlockN / 8][4], float (&m)[2], float (&l)[2],
                                             float (&o)[D / 8][4]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = m[r];
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float base = mx == -INFINITY ? 0.0f : mx;  // a row with nothing visible yet: keep every term 0
    const float alpha = exp2f(m[r] - base);
    m[r] = mx;
    float sum = 0.0f;
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
      s[nt][2 * r] = exp2f(s[nt][2 * r] - base);
      s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - base);
      sum += s[nt][2 * r] + s[nt][2 * r + 1];
    }
    l[r] = l[r] * alpha + sum;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) o[dt][2 * r] *= alpha, o[dt][2 * r + 1] *= alpha;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_forward_mma_kernel(const AttentionParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace mma;
  extern __shared__ __align__(128) unsigned char smem[];
  T* q_tile = reinterpret_cast<T*>(smem);
  T* k_tiles = q_tile + kBlockM * D;  // two buffers of [kBlockN][D]
  T* v_tiles = k_tiles + 2 * kBlockN * D;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  // Highest query blocks first: under the causal mask they see the most keys and should not start last.
  const int64_t m0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kBlockM;
  const int64_t len_q = p.q_len(b);
  if (m0 >= len_q) return;  // block-uniform: this sequence is shorter than the longest one
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t hk = h / (p.heads_q / p.heads_kv), tq = p.q_start(b), tk = p.k_start(b);
  const int64_t rows = min(static_cast<int64_t>(kBlockM), len_q - m0);
  const int64_t k_end = p.key_end(b, m0 + rows);
  const int num_tiles = static_cast<int>((k_end + kBlockN - 1) / kBlockN);
  const auto* k = static_cast<const T*>(p.k);
  const auto* v = static_cast<const T*>(p.v);
  const int64_t qi = m0 + warp * 16 + lane / 4;  // this thread's rows: qi and qi + 8
  const float scale_log2 = p.scale * kLog2e;

  float o[D / 8][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  zero(o);
  if (num_tiles > 0) {
    cp_tile<T, D, kBlockM, kThreads>(q_tile, static_cast<const T*>(p.q), tq + m0, rows, p.heads_q, h);
    cp_tile<T, D, kBlockN, kThreads>(k_tiles, k, tk, k_end, p.heads_kv, hk);
    cp_tile<T, D, kBlockN, kThreads>(v_tiles, v, tk, k_end, p.heads_kv, hk);
    cp_async_commit();
  }
  for (int t = 0; t < num_tiles; ++t) {
    const int64_t n0 = static_cast<int64_t>(t) * kBlockN;
    const T* k_tile = k_tiles + (t & 1) * kBlockN * D;
    const T* v_tile = v_tiles + (t & 1) * kBlockN * D;
    if (t + 1 < num_tiles) {  // the other buffer was released by the __syncthreads ending iteration t - 1
      const int64_t n1 = n0 + kBlockN;
      cp_tile<T, D, kBlockN, kThreads>(k_tiles + ((t + 1) & 1) * kBlockN * D, k, tk + n1, k_end - n1, p.heads_kv, hk);
      cp_tile<T, D, kBlockN, kThreads>(v_tiles + ((t + 1) & 1) * kBlockN * D, v, tk + n1, k_end - n1, p.heads_kv, hk);
    }
    cp_async_commit();
    cp_async_wait<1>();  // everything but the prefetch just issued has landed
    __syncthreads();
    float s[kBlockN / 8][4];
    zero(s);
    gemm_abt<T, D, kBlockN>(s, q_tile, warp * 16, k_tile, lane);
    const bool mask = n0 + kBlockN > k_end || (p.causal && n0 + kBlockN - 1 > m0 + p.causal_shift);
    scale_mask(s, scale_log2, mask, n0, k_end, qi, p, lane);
    softmax_step<D>(s, m, l, o);
    gemm_pb<T, D, kBlockN>(o, s, v_tile, lane);
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  T* out = static_cast<T*>(p.out);
  T* row_lo = qi < len_q ? out + ((tq + qi) * p.heads_q + h) * D : nullptr;
  T* row_hi = qi + 8 < len_q ? out + ((tq + qi + 8) * p.heads_q + h) * D : nullptr;
  // A row that sees no key (l = 0) gives zeros and lse = -inf.
  store_rows<T, D>(o, l[0] > 0.0f ? 1.0f / l[0] : 0.0f, l[1] > 0.0f ? 1.0f / l[1] : 0.0f, row_lo, row_hi, lane);
  if (lane % 4 == 0) {
    float* lse = p.lse + p.lse_offset(b, h);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (qi + 8 * r < len_q) lse[qi + 8 * r] = l[r] > 0.0f ? (m[r] + log2f(l[r])) * kLn2 : -INFINITY;
    }
  }
#endif
}

template <typename T, int D>
void launch(const AttentionParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.seq_q + kBlockM - 1) / kBlockM), static_cast<unsigned>(p.heads_q),
                  static_cast<unsigned>(p.batch));
  mma::launch_with_smem(attention_forward_mma_kernel<T, D>, grid, kThreads, smem_bytes<T, D>(), stream, p);
}

}  // namespace

// ---- kernel launchers

void attention_forward_mma(const AttentionParams& p, cudaStream_t stream) {
  mma::check_tensor_cores("attention");
  mma::check_aligned(p.q, "q", "attention");
  mma::check_aligned(p.k, "k", "attention");
  mma::check_aligned(p.v, "v", "attention");
  mma::check_aligned(p.out, "out", "attention");
  check_grid((p.seq_q + kBlockM - 1) / kBlockM, 2147483647, "seq_q / 64");
  mma::dispatch_16bit(p.dtype, "attention", [&](auto tag) {
    if (p.dim == 64) {
      launch<decltype(tag), 64>(p, stream);
    } else {
      launch<decltype(tag), 128>(p, stream);
    }
  });
}

}  // namespace megalith::kernels::cuda
