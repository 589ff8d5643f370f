// CPU FlashAttention-2 style attention with grouped-query heads over dense or packed (varlen) sequences: the
// forward pass walks key tiles with an online softmax and saves only the output and the log-sum-exp; the
// backward pass recomputes each score tile from them. No buffer larger than one kTile x kTile score tile per
// thread is ever built, whatever the sequence lengths.
#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "cpu_common.h"

namespace megalith::kernels::cpu {
namespace {

constexpr int64_t kTile = 64;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Row-major [tokens, heads, dim] addressing.
struct Rows {
  int64_t heads, dim;
  int64_t offset(int64_t token, int64_t h) const { return (token * heads + h) * dim; }
};

// Copies tokens [t0, t0 + n) of head h into a dense float tile [n, dim].
template <typename T>
void load_tile(const T* src, const Rows& l, int64_t t0, int64_t h, int64_t n, float* tile) {
  for (int64_t i = 0; i < n; ++i) {
    const T* row = src + l.offset(t0 + i, h);
    for (int64_t d = 0; d < l.dim; ++d) tile[i * l.dim + d] = to_float(row[d]);
  }
}

template <typename T>
void store_tile(const float* tile, const Rows& l, int64_t t0, int64_t h, int64_t n, T* dst) {
  for (int64_t i = 0; i < n; ++i) {
    T* row = dst + l.offset(t0 + i, h);
    for (int64_t d = 0; d < l.dim; ++d) row[d] = from_float<T>(tile[i * l.dim + d]);
  }
}

// out[i, j] = a[i] . b[j] for a [na, dim] and bT = b transposed, [dim, kTile]; the j loop is contiguous so
// the compiler vectorises it.
void matmul_bt(const float* a, int64_t na, const float* bT, int64_t nb, int64_t dim, float* out) {
  for (int64_t i = 0; i < na; ++i) {
    float* oi = out + i * kTile;
    std::fill(oi, oi + nb, 0.0f);
    for (int64_t d = 0; d < dim; ++d) {
      const float av = a[i * dim + d];
      const float* bd = bT + d * kTile;
      for (int64_t j = 0; j < nb; ++j) oi[j] += av * bd[j];
    }
  }
}

// Transposes a dense tile [n, dim] into [dim, kTile].
void transpose(const float* tile, int64_t n, int64_t dim, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t d = 0; d < dim; ++d) out[d * kTile + j] = tile[j * dim + d];
  }
}

// s[i, j] = scale * q[i] . k[j] (kT: k transposed); keys the causal mask hides become -inf. q0/k0 are the
// positions, within their sequence, of the first query and key of the tiles.
void score_tile(const float* q, int64_t nq, const float* kT, int64_t nk, const AttentionShape& p, int64_t q0,
                int64_t k0, float* s) {
  matmul_bt(q, nq, kT, nk, p.dim, s);
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t last_visible = q0 + i + p.causal_shift;
    for (int64_t j = 0; j < nk; ++j) {
      float& sij = s[i * kTile + j];
      sij = (p.causal && k0 + j > last_visible) ? kNegInf : sij * p.scale;
    }
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

// One query tile of one head: acc <- softmax(q k^T) v over the visible keys, m/l the running max and sum.
template <typename T>
void forward_tile(const AttentionParams& p, int64_t b, int64_t h, int64_t q0, int64_t nq, const float* q,
                  std::vector<float>* buf, float* acc, float* m, float* l) {
  const Rows kl{p.heads_kv, p.dim};
  const int64_t dim = p.dim, hk = h / (p.heads_q / p.heads_kv), k_first = p.k_start(b);
  float *k = buf[0].data(), *kT = buf[1].data(), *v = buf[2].data(), *s = buf[3].data();
  std::fill(acc, acc + kTile * dim, 0.0f);
  std::fill(m, m + kTile, kNegInf);
  std::fill(l, l + kTile, 0.0f);
  const int64_t k_end = p.key_end(b, q0 + nq);
  for (int64_t k0 = 0; k0 < k_end; k0 += kTile) {
    const int64_t nk = std::min(kTile, k_end - k0);
    load_tile(static_cast<const T*>(p.k), kl, k_first + k0, hk, nk, k);
    load_tile(static_cast<const T*>(p.v), kl, k_first + k0, hk, nk, v);
    transpose(k, nk, dim, kT);
    score_tile(q, nq, kT, nk, p, q0, k0, s);
    for (int64_t i = 0; i < nq; ++i) {
      float* si = s + i * kTile;
      float tile_max = kNegInf;
      for (int64_t j = 0; j < nk; ++j) tile_max = std::max(tile_max, si[j]);
      const float m_new = std::max(m[i], tile_max);
      if (m_new == kNegInf) continue;  // nothing visible yet in this row
      const float alpha = std::exp(m[i] - m_new);
      float* ai = acc + i * dim;
      float row_sum = 0.0f;
      for (int64_t d = 0; d < dim; ++d) ai[d] *= alpha;
      for (int64_t j = 0; j < nk; ++j) {
        const float pij = std::exp(si[j] - m_new);
        row_sum += pij;
        if (pij == 0.0f) continue;
        const float* vj = v + j * dim;
        for (int64_t d = 0; d < dim; ++d) ai[d] += pij * vj[d];
      }
      l[i] = l[i] * alpha + row_sum;
      m[i] = m_new;
    }
  }
}

template <typename T>
void forward_impl(const AttentionParams& p) {
  const Rows ql{p.heads_q, p.dim};
  const Tiles tiles(p, false);
  const int64_t dim = p.dim, num_tiles = tiles.size();
  parallel_for(p.heads_q * num_tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> bufs[4] = {std::vector<float>(kTile * dim), std::vector<float>(kTile * dim),
                                  std::vector<float>(kTile * dim), std::vector<float>(kTile * kTile)};
    std::vector<float> q(kTile * dim), acc(kTile * dim), m(kTile), l(kTile);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t h = task / num_tiles;
      const auto [b, q0] = tiles.at(task % num_tiles);
      const int64_t nq = std::min(kTile, p.q_len(b) - q0), q_first = p.q_start(b);
      load_tile(static_cast<const T*>(p.q), ql, q_first + q0, h, nq, q.data());
      forward_tile<T>(p, b, h, q0, nq, q.data(), bufs, acc.data(), m.data(), l.data());
      float* lse = p.lse + p.lse_offset(b, h) + q0;
      for (int64_t i = 0; i < nq; ++i) {
        const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;  // a row that sees no key gives zeros
        for (int64_t d = 0; d < dim; ++d) acc[i * dim + d] *= inv;
        lse[i] = l[i] > 0.0f ? m[i] + std::log(l[i]) : kNegInf;
      }
      store_tile(acc.data(), ql, q_first + q0, h, nq, static_cast<T*>(p.out));
    }
  });
}

// Per (query tile, key tile): P = exp(S - lse), dP = dO V^T, dS = P (dP - delta). kT/vT are the key and value
// tiles transposed. Fills p_tile and ds_tile.
void grad_tiles(const float* q, const float* dout, const float* kT, const float* vT, const float* lse,
                const float* delta, int64_t nq, int64_t nk, const AttentionBackwardParams& p, int64_t q0, int64_t k0,
                float* p_tile, float* ds_tile) {
  score_tile(q, nq, kT, nk, p, q0, k0, p_tile);
  matmul_bt(dout, nq, vT, nk, p.dim, ds_tile);  // dP
  for (int64_t i = 0; i < nq; ++i) {
    for (int64_t j = 0; j < nk; ++j) {
      float& pij = p_tile[i * kTile + j];
      pij = pij == kNegInf ? 0.0f : std::exp(pij - lse[i]);
      ds_tile[i * kTile + j] = pij * (ds_tile[i * kTile + j] - delta[i]);
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
      for (int64_t d = 0; d < dim; ++d) sum += to_float(out[at + d]) * to_float(dout[at + d]);
      p.delta[idx] = p.dlse != nullptr ? sum - p.dlse[idx] : sum;
    }
  });
}

// dK and dV of one key tile of kv head hk, summed over the query heads of its group and every query tile
// that sees it.
template <typename T>
void dkdv_tile(const AttentionBackwardParams& p, int64_t b, int64_t hk, int64_t k0, int64_t nk,
               std::vector<float>* buf) {
  const Rows ql{p.heads_q, p.dim}, kl{p.heads_kv, p.dim};
  const int64_t dim = p.dim, group = p.heads_q / p.heads_kv, len_q = p.q_len(b);
  const int64_t q_first = p.q_start(b), k_first = p.k_start(b);
  float *q = buf[0].data(), *o = buf[1].data(), *k = buf[2].data(), *v = buf[3].data(), *kT = buf[4].data();
  float *vT = buf[5].data(), *dk = buf[6].data(), *dv = buf[7].data(), *pt = buf[8].data(), *ds = buf[9].data();
  load_tile(static_cast<const T*>(p.k), kl, k_first + k0, hk, nk, k);
  load_tile(static_cast<const T*>(p.v), kl, k_first + k0, hk, nk, v);
  transpose(k, nk, dim, kT);
  transpose(v, nk, dim, vT);
  std::fill(dk, dk + kTile * dim, 0.0f);
  std::fill(dv, dv + kTile * dim, 0.0f);
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const int64_t row = p.lse_offset(b, h);
    for (int64_t q0 = p.first_query_tile(k0, kTile); q0 < len_q; q0 += kTile) {
      const int64_t nq = std::min(kTile, len_q - q0);
      load_tile(static_cast<const T*>(p.q), ql, q_first + q0, h, nq, q);
      load_tile(static_cast<const T*>(p.dout), ql, q_first + q0, h, nq, o);
      grad_tiles(q, o, kT, vT, p.lse + row + q0, p.delta + row + q0, nq, nk, p, q0, k0, pt, ds);
      for (int64_t i = 0; i < nq; ++i) {
        for (int64_t j = 0; j < nk; ++j) {
          const float pij = pt[i * kTile + j], dsij = ds[i * kTile + j] * p.scale;
          if (pij == 0.0f && dsij == 0.0f) continue;
          for (int64_t d = 0; d < dim; ++d) {
            dv[j * dim + d] += pij * o[i * dim + d];
            dk[j * dim + d] += dsij * q[i * dim + d];
          }
        }
      }
    }
  }
  store_tile(dk, kl, k_first + k0, hk, nk, static_cast<T*>(p.dk));
  store_tile(dv, kl, k_first + k0, hk, nk, static_cast<T*>(p.dv));
}

// dQ of one query tile of head h, over every key tile it sees.
template <typename T>
void dq_tile(const AttentionBackwardParams& p, int64_t b, int64_t h, int64_t q0, int64_t nq, std::vector<float>* buf) {
  const Rows ql{p.heads_q, p.dim}, kl{p.heads_kv, p.dim};
  const int64_t dim = p.dim, hk = h / (p.heads_q / p.heads_kv), q_first = p.q_start(b), k_first = p.k_start(b);
  float *q = buf[0].data(), *o = buf[1].data(), *k = buf[2].data(), *v = buf[3].data(), *kT = buf[4].data();
  float *vT = buf[5].data(), *dq = buf[6].data(), *pt = buf[8].data(), *ds = buf[9].data();
  load_tile(static_cast<const T*>(p.q), ql, q_first + q0, h, nq, q);
  load_tile(static_cast<const T*>(p.dout), ql, q_first + q0, h, nq, o);
  std::fill(dq, dq + kTile * dim, 0.0f);
  const int64_t row = p.lse_offset(b, h) + q0, k_end = p.key_end(b, q0 + nq);
  for (int64_t k0 = 0; k0 < k_end; k0 += kTile) {
    const int64_t nk = std::min(kTile, k_end - k0);
    load_tile(static_cast<const T*>(p.k), kl, k_first + k0, hk, nk, k);
    load_tile(static_cast<const T*>(p.v), kl, k_first + k0, hk, nk, v);
    transpose(k, nk, dim, kT);
    transpose(v, nk, dim, vT);
    grad_tiles(q, o, kT, vT, p.lse + row, p.delta + row, nq, nk, p, q0, k0, pt, ds);
    for (int64_t i = 0; i < nq; ++i) {
      for (int64_t j = 0; j < nk; ++j) {
        const float dsij = ds[i * kTile + j] * p.scale;
        if (dsij == 0.0f) continue;
        for (int64_t d = 0; d < dim; ++d) dq[i * dim + d] += dsij * k[j * dim + d];
      }
    }
  }
  store_tile(dq, ql, q_first + q0, h, nq, static_cast<T*>(p.dq));
}

std::vector<std::vector<float>> backward_buffers(int64_t dim) {
  std::vector<std::vector<float>> bufs(10, std::vector<float>(kTile * dim));
  bufs[8].assign(kTile * kTile, 0.0f);
  bufs[9].assign(kTile * kTile, 0.0f);
  return bufs;
}

template <typename T>
void backward_impl(const AttentionBackwardParams& p) {
  delta_impl<T>(p);
  // Pass 1: dK and dV per (kv head, key tile). Pass 2: dQ per (query head, query tile). The passes write
  // disjoint rows, so no two threads ever write the same output.
  const Tiles key_tiles(p, true), query_tiles(p, false);
  const int64_t num_k = key_tiles.size(), num_q = query_tiles.size();
  parallel_for(p.heads_kv * num_k, 1, [&](int64_t t0, int64_t t1) {
    auto bufs = backward_buffers(p.dim);
    for (int64_t task = t0; task < t1; ++task) {
      const auto [b, k0] = key_tiles.at(task % num_k);
      dkdv_tile<T>(p, b, task / num_k, k0, std::min(kTile, p.k_len(b) - k0), bufs.data());
    }
  });
  parallel_for(p.heads_q * num_q, 1, [&](int64_t t0, int64_t t1) {
    auto bufs = backward_buffers(p.dim);
    for (int64_t task = t0; task < t1; ++task) {
      const auto [b, q0] = query_tiles.at(task % num_q);
      dq_tile<T>(p, b, task / num_q, q0, std::min(kTile, p.q_len(b) - q0), bufs.data());
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

}  // namespace megalith::kernels::cpu
