// CPU FlashAttention-2 style attention with grouped-query heads over dense or packed (varlen) sequences: the
// forward pass walks key tiles with an online softmax and saves only the output and the log-sum-exp; the
// backward pass recomputes each score tile from them. Per thread, nothing larger than a few kTile x kTile
// (or kTile x head dim) float tiles is ever held, whatever the sequence lengths.
//
// Compiled per instruction set (cpu_common.h). All products run through one register-blocked tile product,
// gemm_block: a few rows of C times a fixed-width column block, accumulated in a local array whose inner loop
// has a compile-time trip count, so that the compiler turns it into fused multiply-adds on full vector
// registers. Tiles are copied into float32 buffers whose head dimension is padded with zeros to a multiple of
// 16, so every product runs on whole column blocks.
#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "cpu_kernels.h"
// cpu_common.h comes last: from here on the code is compiled for MEGALITH_CPU_ISA.
#include "cpu_common.h"

namespace megalith::kernels::cpu::MEGALITH_CPU_ISA {
namespace {

constexpr int64_t kTile = 64;   // queries and keys per tile
constexpr int64_t kBlock = 16;  // the head dimension of the float tiles is padded to a multiple of this
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t padded_dim(int64_t dim) { return (dim + kBlock - 1) / kBlock * kBlock; }

// Row-major [tokens, heads, dim] addressing.
struct Rows {
  int64_t heads, dim;
  int64_t offset(int64_t token, int64_t h) const { return (token * heads + h) * dim; }
};

// Copies tokens [t0, t0 + n) of head h into rows [0, n) of a float tile [kTile, ld], columns past dim zero.
// Rows past n are left as they are: every product reads only the rows of the tokens it was given.
template <typename T>
void load_tile(const T* src, const Rows& l, int64_t t0, int64_t h, int64_t n, int64_t ld, float* tile) {
  for (int64_t i = 0; i < n; ++i) {
    const T* row = src + l.offset(t0 + i, h);
    float* out = tile + i * ld;
#pragma omp simd
    for (int64_t d = 0; d < l.dim; ++d) out[d] = to_float(row[d]);
    std::fill(out + l.dim, out + ld, 0.0f);
  }
}

// The same tokens transposed: tile [ld, kTile] with tile[d, i] = token i, element d for d < dim, and zero in
// the columns i >= n (a key tile's missing keys must give finite products: 0 * them is what masks them).
template <typename T>
void load_tile_t(const T* src, const Rows& l, int64_t t0, int64_t h, int64_t n, int64_t ld, float* tile) {
  for (int64_t i = 0; i < n; ++i) {
    const T* row = src + l.offset(t0 + i, h);
    for (int64_t d = 0; d < l.dim; ++d) tile[d * kTile + i] = to_float(row[d]);
  }
  if (n < kTile) {
    for (int64_t d = 0; d < l.dim; ++d) std::fill(tile + d * kTile + n, tile + (d + 1) * kTile, 0.0f);
  }
}

template <typename T>
void store_tile(const float* tile, int64_t ld, const Rows& l, int64_t t0, int64_t h, int64_t n, T* dst) {
  for (int64_t i = 0; i < n; ++i) {
    T* row = dst + l.offset(t0 + i, h);
    const float* in = tile + i * ld;
#pragma omp simd
    for (int64_t d = 0; d < l.dim; ++d) row[d] = from_float<T>(in[d]);
  }
}

// C[i, 0:kWidth] (+)= sum_k A(i, k) * B[k, 0:kWidth] for i < m, k < depth, where A(i, k) = a[i * lda + k], or
// a[k * lda + i] when kTransA. kRows rows of C are held in a local block while the depth loop runs.
template <int kWidth, bool kTransA, bool kAccumulate>
void gemm_block(const float* a, int64_t lda, int64_t m, int64_t depth, const float* b, int64_t ldb, float* c,
                int64_t ldc) {
  constexpr int kRows = 4;
  int64_t i = 0;
  for (; i + kRows <= m; i += kRows) {
    float acc[kRows][kWidth];
    for (int r = 0; r < kRows; ++r) {
#pragma omp simd
      for (int j = 0; j < kWidth; ++j) acc[r][j] = kAccumulate ? c[(i + r) * ldc + j] : 0.0f;
    }
    for (int64_t k = 0; k < depth; ++k) {
      const float* bk = b + k * ldb;
      for (int r = 0; r < kRows; ++r) {
        const float av = kTransA ? a[k * lda + i + r] : a[(i + r) * lda + k];
#pragma omp simd
        for (int j = 0; j < kWidth; ++j) acc[r][j] += av * bk[j];
      }
    }
    for (int r = 0; r < kRows; ++r) {
#pragma omp simd
      for (int j = 0; j < kWidth; ++j) c[(i + r) * ldc + j] = acc[r][j];
    }
  }
  for (; i < m; ++i) {
    float acc[kWidth];
#pragma omp simd
    for (int j = 0; j < kWidth; ++j) acc[j] = kAccumulate ? c[i * ldc + j] : 0.0f;
    for (int64_t k = 0; k < depth; ++k) {
      const float av = kTransA ? a[k * lda + i] : a[i * lda + k];
      const float* bk = b + k * ldb;
#pragma omp simd
      for (int j = 0; j < kWidth; ++j) acc[j] += av * bk[j];
    }
#pragma omp simd
    for (int j = 0; j < kWidth; ++j) c[i * ldc + j] = acc[j];
  }
}

// C[m, n] (+)= A[m, depth] B[depth, n] over n (a multiple of kBlock) in column blocks of up to kTile.
template <bool kTransA, bool kAccumulate>
void gemm_tile(const float* a, int64_t lda, int64_t m, int64_t depth, const float* b, int64_t ldb, float* c,
               int64_t ldc, int64_t n) {
  int64_t j = 0;
  for (; j + kTile <= n; j += kTile) {
    gemm_block<kTile, kTransA, kAccumulate>(a, lda, m, depth, b + j, ldb, c + j, ldc);
  }
  switch (n - j) {
    case 48:
      return gemm_block<48, kTransA, kAccumulate>(a, lda, m, depth, b + j, ldb, c + j, ldc);
    case 32:
      return gemm_block<32, kTransA, kAccumulate>(a, lda, m, depth, b + j, ldb, c + j, ldc);
    case 16:
      return gemm_block<16, kTransA, kAccumulate>(a, lda, m, depth, b + j, ldb, c + j, ldc);
    default:
      return;
  }
}

// s[i, j] = scale * q[i] . k[j] for the nq x nk visible block (kT: the key tile transposed); keys past nk or
// hidden by the causal mask become -inf. q0/k0 are the positions, within their sequence, of the first query
// and key of the tiles.
void score_tile(const float* q, int64_t ld, int64_t nq, const float* kT, int64_t nk, const AttentionShape& p,
                int64_t q0, int64_t k0, float* s) {
  gemm_tile<false, false>(q, ld, nq, p.dim, kT, kTile, s, kTile, kTile);
  const float scale = p.scale;
  for (int64_t i = 0; i < nq; ++i) {
    // Key j is visible to query i iff j < limit.
    const int64_t limit = p.causal ? std::min(nk, q0 + i + p.causal_shift - k0 + 1) : nk;
    float* si = s + i * kTile;
#pragma omp simd
    for (int64_t j = 0; j < kTile; ++j) si[j] = j < limit ? si[j] * scale : kNegInf;
  }
}

// The kTile-row tiles of every sequence, numbered one after another: tile index -> (sequence, first row).
class Tiles {
 public:
  Tiles(const AttentionShape& p, bool keys) : first_(static_cast<size_t>(p.batch) + 1, 0) {
    for (int64_t b = 0; b < p.batch; ++b) {
      const int64_t len = keys ? p.k_len(b) : p.q_len(b);
      first_[b + 1] = first_[b] + (len + kTile - 1) / kTile;
    }
  }
  int64_t size() const { return first_.back(); }
  std::pair<int64_t, int64_t> at(int64_t index) const {
    const auto b = std::upper_bound(first_.begin(), first_.end(), index) - first_.begin() - 1;
    return {b, (index - first_[b]) * kTile};
  }

 private:
  std::vector<int64_t> first_;
};

// Tile tasks per thread below which a call stays on the calling thread: a task costs about kTile x (keys seen)
// x dim multiply-adds per product, and waking the other threads costs as much as some 2^17 of them.
int64_t grain(const AttentionShape& p) {
  const int64_t work = std::min(kTile, std::max<int64_t>(1, p.seq_q)) * std::max<int64_t>(1, p.seq_k) * p.dim;
  return std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(1, work));
}

// The float tiles of one thread.
struct Buffers {
  explicit Buffers(int64_t dim) : ld(padded_dim(dim)) {
    for (auto& t : wide) t.assign(static_cast<size_t>(kTile * ld), 0.0f);
    for (auto& t : square) t.assign(static_cast<size_t>(kTile * kTile), 0.0f);
    for (auto& t : rows) t.assign(static_cast<size_t>(kTile), 0.0f);
  }
  int64_t ld;                    // padded head dimension
  std::vector<float> wide[7];    // [kTile, ld] or [ld, kTile]
  std::vector<float> square[2];  // [kTile, kTile]
  std::vector<float> rows[2];    // [kTile]
};

// One query tile of one head (q: buf.wide[0]): acc <- softmax(q k^T) v over the visible keys, m/l the running
// max and sum.
template <typename T>
void forward_tile(const AttentionParams& p, int64_t b, int64_t h, int64_t q0, int64_t nq, Buffers& buf) {
  const Rows kl{p.heads_kv, p.dim};
  const int64_t ld = buf.ld, hk = h / (p.heads_q / p.heads_kv), k_first = p.k_start(b);
  const float* q = buf.wide[0].data();
  float *kT = buf.wide[1].data(), *v = buf.wide[2].data(), *acc = buf.wide[3].data();
  float *s = buf.square[0].data(), *m = buf.rows[0].data(), *l = buf.rows[1].data();
  std::fill(acc, acc + kTile * ld, 0.0f);
  std::fill(m, m + kTile, kNegInf);
  std::fill(l, l + kTile, 0.0f);
  const int64_t k_end = p.key_end(b, q0 + nq);
  for (int64_t k0 = 0; k0 < k_end; k0 += kTile) {
    const int64_t nk = std::min(kTile, k_end - k0);
    load_tile_t(static_cast<const T*>(p.k), kl, k_first + k0, hk, nk, ld, kT);
    load_tile(static_cast<const T*>(p.v), kl, k_first + k0, hk, nk, ld, v);
    score_tile(q, ld, nq, kT, nk, p, q0, k0, s);
    for (int64_t i = 0; i < nq; ++i) {
      float* si = s + i * kTile;
      float tile_max = kNegInf;
#pragma omp simd reduction(max : tile_max)
      for (int64_t j = 0; j < kTile; ++j) tile_max = std::max(tile_max, si[j]);
      const float m_new = std::max(m[i], tile_max);
      // A row that sees nothing yet keeps p = exp(-inf - 0) = 0 and its zero accumulator.
      const float shift = m_new == kNegInf ? 0.0f : m_new;
      const float alpha = exp_approx(m[i] - shift);
      float row_sum = 0.0f;
#pragma omp simd reduction(+ : row_sum)
      for (int64_t j = 0; j < kTile; ++j) {
        si[j] = exp_approx(si[j] - shift);
        row_sum += si[j];
      }
      float* ai = acc + i * ld;
#pragma omp simd
      for (int64_t d = 0; d < ld; ++d) ai[d] *= alpha;
      l[i] = l[i] * alpha + row_sum;
      m[i] = m_new;
    }
    gemm_tile<false, true>(s, kTile, nq, nk, v, ld, acc, ld, ld);  // acc += P V
  }
}

template <typename T>
void forward_impl(const AttentionParams& p) {
  const Rows ql{p.heads_q, p.dim};
  const Tiles tiles(p, false);
  const int64_t num_tiles = tiles.size();
  parallel_for(p.heads_q * num_tiles, grain(p), [&](int64_t t0, int64_t t1) {
    Buffers buf(p.dim);
    const int64_t ld = buf.ld;
    float *acc = buf.wide[3].data(), *m = buf.rows[0].data(), *l = buf.rows[1].data();
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t h = task / num_tiles;
      const auto [b, q0] = tiles.at(task % num_tiles);
      const int64_t nq = std::min(kTile, p.q_len(b) - q0), q_first = p.q_start(b);
      load_tile(static_cast<const T*>(p.q), ql, q_first + q0, h, nq, ld, buf.wide[0].data());
      forward_tile<T>(p, b, h, q0, nq, buf);
      float* lse = p.lse + p.lse_offset(b, h) + q0;
      for (int64_t i = 0; i < nq; ++i) {
        const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;  // a row that sees no key gives zeros
#pragma omp simd
        for (int64_t d = 0; d < ld; ++d) acc[i * ld + d] *= inv;
        lse[i] = l[i] > 0.0f ? m[i] + std::log(l[i]) : kNegInf;
      }
      store_tile(acc, ld, ql, q_first + q0, h, nq, static_cast<T*>(p.out));
    }
  });
}

// Per (query tile, key tile): P = exp(S - lse) and dS = scale * P (dP - delta), with dP = dO V^T (vT: the value
// tile transposed). Entries outside the nq x nk block, or masked, are 0 in both.
void grad_tiles(const float* q, const float* dout, int64_t ld, const float* kT, const float* vT, const float* lse,
                const float* delta, int64_t nq, int64_t nk, const AttentionBackwardParams& p, int64_t q0, int64_t k0,
                float* p_tile, float* ds_tile) {
  score_tile(q, ld, nq, kT, nk, p, q0, k0, p_tile);
  gemm_tile<false, false>(dout, ld, nq, p.dim, vT, kTile, ds_tile, kTile, kTile);  // dP
  const float scale = p.scale;
  for (int64_t i = 0; i < nq; ++i) {
    float* pi = p_tile + i * kTile;
    float* dsi = ds_tile + i * kTile;
    // lse = -inf only where the row sees no key, and then every score is -inf too: p = exp(-inf - 0) = 0.
    const float lse_i = lse[i] == kNegInf ? 0.0f : lse[i], delta_i = delta[i];
#pragma omp simd
    for (int64_t j = 0; j < kTile; ++j) {
      pi[j] = exp_approx(pi[j] - lse_i);
      dsi[j] = scale * pi[j] * (dsi[j] - delta_i);
    }
  }
}

// delta = rowsum(dout * out) - dlse for every (token, head).
template <typename T>
void delta_impl(const AttentionBackwardParams& p) {
  const auto* out = static_cast<const T*>(p.out);
  const auto* dout = static_cast<const T*>(p.dout);
  const int64_t dim = p.dim;
  parallel_for(p.total_q * p.heads_q, 4096 / std::max<int64_t>(1, dim), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / p.heads_q, h = r % p.heads_q, at = r * dim, idx = p.lse_index(t, h);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t d = 0; d < dim; ++d) sum += to_float(out[at + d]) * to_float(dout[at + d]);
      p.delta[idx] = p.dlse != nullptr ? sum - p.dlse[idx] : sum;
    }
  });
}

// One (query tile of head h, key tile) pair: P and dS from grad_tiles, then dV += P^T dO and dK += dS^T Q into
// buf's dK/dV tiles, and dQ += dS K into `dq` when it is given. The caller loaded the key tile (transposed: kT
// in buf.wide[2], and as rows in buf.wide[6] when dq is given) and the value tile transposed (buf.wide[3]).
template <typename T>
void pair_grads(const AttentionBackwardParams& p, int64_t b, int64_t h, int64_t q0, int64_t nq, int64_t k0,
                int64_t nk, Buffers& buf, float* dq) {
  const Rows ql{p.heads_q, p.dim};
  const int64_t ld = buf.ld, q_first = p.q_start(b), row = p.lse_offset(b, h) + q0;
  float *q = buf.wide[0].data(), *o = buf.wide[1].data(), *kT = buf.wide[2].data(), *vT = buf.wide[3].data();
  float *dk = buf.wide[4].data(), *dv = buf.wide[5].data(), *k = buf.wide[6].data();
  float *pt = buf.square[0].data(), *ds = buf.square[1].data();
  load_tile(static_cast<const T*>(p.q), ql, q_first + q0, h, nq, ld, q);
  load_tile(static_cast<const T*>(p.dout), ql, q_first + q0, h, nq, ld, o);
  grad_tiles(q, o, ld, kT, vT, p.lse + row, p.delta + row, nq, nk, p, q0, k0, pt, ds);
  gemm_tile<true, true>(pt, kTile, nk, nq, o, ld, dv, ld, ld);  // dV += P^T dO
  gemm_tile<true, true>(ds, kTile, nk, nq, q, ld, dk, ld, ld);  // dK += dS^T Q
  if (dq != nullptr) gemm_tile<false, true>(ds, kTile, nq, nk, k, ld, dq, ld, ld);  // dQ += dS K
}

// Loads key tile k0 of kv head hk for pair_grads (as rows too when `rows`) and zeroes its dK/dV tiles.
template <typename T>
void begin_key_tile(const AttentionBackwardParams& p, int64_t b, int64_t hk, int64_t k0, int64_t nk, bool rows,
                    Buffers& buf) {
  const Rows kl{p.heads_kv, p.dim};
  const int64_t ld = buf.ld, k_first = p.k_start(b);
  load_tile_t(static_cast<const T*>(p.k), kl, k_first + k0, hk, nk, ld, buf.wide[2].data());
  load_tile_t(static_cast<const T*>(p.v), kl, k_first + k0, hk, nk, ld, buf.wide[3].data());
  if (rows) load_tile(static_cast<const T*>(p.k), kl, k_first + k0, hk, nk, ld, buf.wide[6].data());
  std::fill(buf.wide[4].begin(), buf.wide[4].end(), 0.0f);
  std::fill(buf.wide[5].begin(), buf.wide[5].end(), 0.0f);
}

// Stores the dK/dV tiles pair_grads accumulated for key tile k0 of kv head hk.
template <typename T>
void end_key_tile(const AttentionBackwardParams& p, int64_t b, int64_t hk, int64_t k0, int64_t nk, Buffers& buf) {
  const Rows kl{p.heads_kv, p.dim};
  const int64_t k_first = p.k_start(b);
  store_tile(buf.wide[4].data(), buf.ld, kl, k_first + k0, hk, nk, static_cast<T*>(p.dk));
  store_tile(buf.wide[5].data(), buf.ld, kl, k_first + k0, hk, nk, static_cast<T*>(p.dv));
}

// dK and dV of one key tile of kv head hk, summed over the query heads of its group and every query tile
// that sees it.
template <typename T>
void dkdv_tile(const AttentionBackwardParams& p, int64_t b, int64_t hk, int64_t k0, int64_t nk, Buffers& buf) {
  const int64_t group = p.heads_q / p.heads_kv, len_q = p.q_len(b);
  begin_key_tile<T>(p, b, hk, k0, nk, false, buf);
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    for (int64_t q0 = p.first_query_tile(k0, kTile); q0 < len_q; q0 += kTile) {
      pair_grads<T>(p, b, h, q0, std::min(kTile, len_q - q0), k0, nk, buf, nullptr);
    }
  }
  end_key_tile<T>(p, b, hk, k0, nk, buf);
}

// dQ of one query tile of head h, over every key tile it sees.
template <typename T>
void dq_tile(const AttentionBackwardParams& p, int64_t b, int64_t h, int64_t q0, int64_t nq, Buffers& buf) {
  const Rows ql{p.heads_q, p.dim}, kl{p.heads_kv, p.dim};
  const int64_t ld = buf.ld, hk = h / (p.heads_q / p.heads_kv), q_first = p.q_start(b), k_first = p.k_start(b);
  float *q = buf.wide[0].data(), *o = buf.wide[1].data(), *kT = buf.wide[2].data(), *vT = buf.wide[3].data();
  float *k = buf.wide[4].data(), *dq = buf.wide[5].data(), *pt = buf.square[0].data(), *ds = buf.square[1].data();
  load_tile(static_cast<const T*>(p.q), ql, q_first + q0, h, nq, ld, q);
  load_tile(static_cast<const T*>(p.dout), ql, q_first + q0, h, nq, ld, o);
  std::fill(dq, dq + kTile * ld, 0.0f);
  const int64_t row = p.lse_offset(b, h) + q0, k_end = p.key_end(b, q0 + nq);
  for (int64_t k0 = 0; k0 < k_end; k0 += kTile) {
    const int64_t nk = std::min(kTile, k_end - k0);
    load_tile(static_cast<const T*>(p.k), kl, k_first + k0, hk, nk, ld, k);
    load_tile_t(static_cast<const T*>(p.k), kl, k_first + k0, hk, nk, ld, kT);
    load_tile_t(static_cast<const T*>(p.v), kl, k_first + k0, hk, nk, ld, vT);
    grad_tiles(q, o, ld, kT, vT, p.lse + row, p.delta + row, nq, nk, p, q0, k0, pt, ds);
    gemm_tile<false, true>(ds, kTile, nq, nk, k, ld, dq, ld, ld);  // dQ += dS K
  }
  store_tile(dq, ld, ql, q_first + q0, h, nq, static_cast<T*>(p.dq));
}

// Every gradient of sequence b and kv head hk in one pass, key tiles outermost: dK and dV as in dkdv_tile, and
// dQ of the group's query heads accumulated in `dq_acc` ([group, len_q rounded up to kTile, ld] floats) as
// each key tile goes by. Each dQ element receives its key tiles in the same ascending order as dq_tile, so
// both schedules give the same bits.
template <typename T>
void sequence_grads(const AttentionBackwardParams& p, int64_t b, int64_t hk, Buffers& buf, std::vector<float>& dq_acc) {
  const Rows ql{p.heads_q, p.dim};
  const int64_t ld = buf.ld, group = p.heads_q / p.heads_kv, len_q = p.q_len(b), len_k = p.k_len(b);
  const int64_t rows = (len_q + kTile - 1) / kTile * kTile;
  dq_acc.assign(static_cast<size_t>(group * rows * ld), 0.0f);
  for (int64_t k0 = 0; k0 < len_k; k0 += kTile) {
    const int64_t nk = std::min(kTile, len_k - k0);
    begin_key_tile<T>(p, b, hk, k0, nk, true, buf);
    for (int64_t g = 0; g < group; ++g) {
      for (int64_t q0 = p.first_query_tile(k0, kTile); q0 < len_q; q0 += kTile) {
        const int64_t nq = std::min(kTile, len_q - q0);
        // dq_tile visits only the key tiles below key_end; a tile past it adds exact zeros, skipped alike.
        float* dq = p.key_end(b, q0 + nq) > k0 ? dq_acc.data() + (g * rows + q0) * ld : nullptr;
        pair_grads<T>(p, b, hk * group + g, q0, nq, k0, nk, buf, dq);
      }
    }
    end_key_tile<T>(p, b, hk, k0, nk, buf);
  }
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t q0 = 0; q0 < len_q; q0 += kTile) {
      store_tile(dq_acc.data() + (g * rows + q0) * ld, ld, ql, p.q_start(b) + q0, hk * group + g,
                 std::min(kTile, len_q - q0), static_cast<T*>(p.dq));
    }
  }
}

// Above this many floats of dQ accumulator per thread (64 MiB), the backward pass keeps to tile-sized buffers.
constexpr int64_t kMaxSequenceFloats = int64_t{1} << 24;

template <typename T>
void backward_impl(const AttentionBackwardParams& p) {
  delta_impl<T>(p);
  // Two schedules, with the same result bits. With enough (sequence, kv head) pairs to keep every thread busy
  // (4 per thread) and sequences short enough, one pass per pair computes each score tile once. Otherwise
  // pass 1 computes dK and dV per (kv head, key tile) and pass 2 dQ per (query head, query tile), recomputing
  // the score tiles but spreading finer tasks over the threads. No two threads ever write the same output.
  const int64_t pairs = p.batch * p.heads_kv, group = p.heads_q / p.heads_kv;
  const int64_t longest = (std::max(p.seq_q, int64_t{1}) + kTile - 1) / kTile * kTile;
  const bool enough_pairs = pairs >= 4 * static_cast<int64_t>(num_threads());
  if (enough_pairs && group * longest * padded_dim(p.dim) <= kMaxSequenceFloats) {
    const int64_t pair_grain = std::max<int64_t>(1, grain(p) / (longest / kTile));  // a pair runs every tile
    parallel_for(pairs, pair_grain, [&](int64_t t0, int64_t t1) {
      Buffers buf(p.dim);
      std::vector<float> dq_acc;
      for (int64_t task = t0; task < t1; ++task) {
        sequence_grads<T>(p, task / p.heads_kv, task % p.heads_kv, buf, dq_acc);
      }
    });
    return;
  }
  const Tiles key_tiles(p, true), query_tiles(p, false);
  const int64_t num_k = key_tiles.size(), num_q = query_tiles.size();
  parallel_for(p.heads_kv * num_k, grain(p), [&](int64_t t0, int64_t t1) {
    Buffers buf(p.dim);
    for (int64_t task = t0; task < t1; ++task) {
      const auto [b, k0] = key_tiles.at(task % num_k);
      dkdv_tile<T>(p, b, task / num_k, k0, std::min(kTile, p.k_len(b) - k0), buf);
    }
  });
  parallel_for(p.heads_q * num_q, grain(p), [&](int64_t t0, int64_t t1) {
    Buffers buf(p.dim);
    for (int64_t task = t0; task < t1; ++task) {
      const auto [b, q0] = query_tiles.at(task % num_q);
      dq_tile<T>(p, b, task / num_q, q0, std::min(kTile, p.q_len(b) - q0), buf);
    }
  });
}

}  // namespace

void attention_forward(const AttentionParams& p) {
  dispatch_cpu(p.dtype, "attention", [&](auto tag) { forward_impl<decltype(tag)>(p); });
}

void attention_backward(const AttentionBackwardParams& p) {
  dispatch_cpu(p.dtype, "attention backward", [&](auto tag) { backward_impl<decltype(tag)>(p); });
}

}  // namespace megalith::kernels::cpu::MEGALITH_CPU_ISA
MEGALITH_CPU_ISA_END
