// CPU FlashAttention-2 style attention with grouped-query heads: the forward pass walks key tiles with an
// online softmax and saves only the output and the log-sum-exp; the backward pass recomputes each score
// tile from them. No buffer larger than one kTile x kTile score tile per thread is ever built.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_common.h"

namespace megalith::kernels::cpu {
namespace {

constexpr int64_t kTile = 64;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Layout of one [batch, seq, heads, dim] tensor.
struct Bshd {
  int64_t seq, heads, dim;
  int64_t offset(int64_t b, int64_t s, int64_t h) const { return ((b * seq + s) * heads + h) * dim; }
};

// Copies rows [s0, s0 + n) of head h into a dense float tile [n, dim].
template <typename T>
void load_tile(const T* src, const Bshd& l, int64_t b, int64_t h, int64_t s0, int64_t n, float* tile) {
  for (int64_t i = 0; i < n; ++i) {
    const T* row = src + l.offset(b, s0 + i, h);
    for (int64_t d = 0; d < l.dim; ++d) tile[i * l.dim + d] = to_float(row[d]);
  }
}

template <typename T>
void store_tile(const float* tile, const Bshd& l, int64_t b, int64_t h, int64_t s0, int64_t n, T* dst) {
  for (int64_t i = 0; i < n; ++i) {
    T* row = dst + l.offset(b, s0 + i, h);
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

// s[i, j] = scale * q[i] . k[j] (kT: k transposed); causally masked entries (key after query) become -inf.
// q0/k0 are the sequence positions of the first rows.
void score_tile(const float* q, int64_t nq, const float* kT, int64_t nk, int64_t dim, float scale, bool causal,
                int64_t q0, int64_t k0, float* s) {
  matmul_bt(q, nq, kT, nk, dim, s);
  for (int64_t i = 0; i < nq; ++i) {
    for (int64_t j = 0; j < nk; ++j) {
      float& sij = s[i * kTile + j];
      sij = (causal && k0 + j > q0 + i) ? kNegInf : sij * scale;
    }
  }
}

template <typename T>
void forward_impl(const AttentionParams& p) {
  const Bshd ql{p.seq, p.heads_q, p.dim}, kl{p.seq, p.heads_kv, p.dim};
  const int64_t group = p.heads_q / p.heads_kv, dim = p.dim;
  const int64_t num_tiles = (p.seq + kTile - 1) / kTile;
  parallel_for(p.batch * p.heads_q * num_tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> q(kTile * dim), k(kTile * dim), kT(kTile * dim), v(kTile * dim), acc(kTile * dim);
    std::vector<float> s(kTile * kTile), m(kTile), l(kTile);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t qt = task % num_tiles, h = (task / num_tiles) % p.heads_q, b = task / (num_tiles * p.heads_q);
      const int64_t q0 = qt * kTile, nq = std::min(kTile, p.seq - q0), hk = h / group;
      load_tile(static_cast<const T*>(p.q), ql, b, h, q0, nq, q.data());
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.0f);
      const int64_t k_end = p.causal ? q0 + nq : p.seq;
      for (int64_t k0 = 0; k0 < k_end; k0 += kTile) {
        const int64_t nk = std::min(kTile, k_end - k0);
        load_tile(static_cast<const T*>(p.k), kl, b, hk, k0, nk, k.data());
        load_tile(static_cast<const T*>(p.v), kl, b, hk, k0, nk, v.data());
        transpose(k.data(), nk, dim, kT.data());
        score_tile(q.data(), nq, kT.data(), nk, dim, p.scale, p.causal, q0, k0, s.data());
        for (int64_t i = 0; i < nq; ++i) {
          float* si = s.data() + i * kTile;
          float tile_max = kNegInf;
          for (int64_t j = 0; j < nk; ++j) tile_max = std::max(tile_max, si[j]);
          const float m_new = std::max(m[i], tile_max);
          if (m_new == kNegInf) continue;  // nothing visible yet in this row
          const float alpha = std::exp(m[i] - m_new);
          float* ai = acc.data() + i * dim;
          float row_sum = 0.0f;
          for (int64_t d = 0; d < dim; ++d) ai[d] *= alpha;
          for (int64_t j = 0; j < nk; ++j) {
            const float pij = std::exp(si[j] - m_new);
            row_sum += pij;
            if (pij == 0.0f) continue;
            const float* vj = v.data() + j * dim;
            for (int64_t d = 0; d < dim; ++d) ai[d] += pij * vj[d];
          }
          l[i] = l[i] * alpha + row_sum;
          m[i] = m_new;
        }
      }
      for (int64_t i = 0; i < nq; ++i) {
        const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
        for (int64_t d = 0; d < dim; ++d) acc[i * dim + d] *= inv;
        p.lse[(b * p.heads_q + h) * p.seq + q0 + i] = l[i] > 0.0f ? m[i] + std::log(l[i]) : kNegInf;
      }
      store_tile(acc.data(), ql, b, h, q0, nq, static_cast<T*>(p.out));
    }
  });
}

// Per (query tile, key tile): P = exp(S - lse), dP = dO V^T, dS = P (dP - delta). kT/vT are the key and value
// tiles transposed. Fills p_tile and ds_tile.
void grad_tiles(const float* q, const float* dout, const float* kT, const float* vT, const float* lse,
                const float* delta, int64_t nq, int64_t nk, int64_t dim, const AttentionBackwardParams& p,
                int64_t q0, int64_t k0, float* p_tile, float* ds_tile) {
  score_tile(q, nq, kT, nk, dim, p.scale, p.causal, q0, k0, p_tile);
  matmul_bt(dout, nq, vT, nk, dim, ds_tile);  // dP
  for (int64_t i = 0; i < nq; ++i) {
    for (int64_t j = 0; j < nk; ++j) {
      float& pij = p_tile[i * kTile + j];
      pij = pij == kNegInf ? 0.0f : std::exp(pij - lse[i]);
      ds_tile[i * kTile + j] = pij * (ds_tile[i * kTile + j] - delta[i]);
    }
  }
}

template <typename T>
void backward_impl(const AttentionBackwardParams& p) {
  const Bshd ql{p.seq, p.heads_q, p.dim}, kl{p.seq, p.heads_kv, p.dim};
  const int64_t group = p.heads_q / p.heads_kv, dim = p.dim, seq = p.seq;
  const int64_t num_tiles = (seq + kTile - 1) / kTile;
  const auto* out = static_cast<const T*>(p.out);
  const auto* dout = static_cast<const T*>(p.dout);
  // delta[b, h, i] = dO_i . O_i, the row term of the softmax gradient.
  parallel_for(p.batch * p.heads_q * seq, 4096 / std::max<int64_t>(1, dim), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r % seq, h = (r / seq) % p.heads_q, b = r / (seq * p.heads_q);
      const int64_t at = ql.offset(b, i, h);
      float sum = 0.0f;
      for (int64_t d = 0; d < dim; ++d) sum += to_float(out[at + d]) * to_float(dout[at + d]);
      p.delta[r] = sum;
    }
  });
  auto lse_at = [&](int64_t b, int64_t h, int64_t s0) { return p.lse + (b * p.heads_q + h) * seq + s0; };
  auto delta_at = [&](int64_t b, int64_t h, int64_t s0) { return p.delta + (b * p.heads_q + h) * seq + s0; };
  // Pass 1: dK and dV per (batch, kv head, key tile), summing over the query heads of the group.
  parallel_for(p.batch * p.heads_kv * num_tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> q(kTile * dim), o(kTile * dim), k(kTile * dim), v(kTile * dim), kT(kTile * dim);
    std::vector<float> vT(kTile * dim), dk(kTile * dim), dv(kTile * dim), pt(kTile * kTile), ds(kTile * kTile);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t kt = task % num_tiles, hk = (task / num_tiles) % p.heads_kv, b = task / (num_tiles * p.heads_kv);
      const int64_t k0 = kt * kTile, nk = std::min(kTile, seq - k0);
      load_tile(static_cast<const T*>(p.k), kl, b, hk, k0, nk, k.data());
      load_tile(static_cast<const T*>(p.v), kl, b, hk, k0, nk, v.data());
      transpose(k.data(), nk, dim, kT.data());
      transpose(v.data(), nk, dim, vT.data());
      std::fill(dk.begin(), dk.end(), 0.0f);
      std::fill(dv.begin(), dv.end(), 0.0f);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t q0 = p.causal ? k0 - k0 % kTile : 0; q0 < seq; q0 += kTile) {
          const int64_t nq = std::min(kTile, seq - q0);
          load_tile(static_cast<const T*>(p.q), ql, b, h, q0, nq, q.data());
          load_tile(dout, ql, b, h, q0, nq, o.data());
          grad_tiles(q.data(), o.data(), kT.data(), vT.data(), lse_at(b, h, q0), delta_at(b, h, q0), nq, nk, dim,
                     p, q0, k0, pt.data(), ds.data());
          for (int64_t i = 0; i < nq; ++i) {
            for (int64_t j = 0; j < nk; ++j) {
              const float pij = pt[i * kTile + j], dsij = ds[i * kTile + j] * p.scale;
              for (int64_t d = 0; d < dim; ++d) {
                dv[j * dim + d] += pij * o[i * dim + d];
                dk[j * dim + d] += dsij * q[i * dim + d];
              }
            }
          }
        }
      }
      store_tile(dk.data(), kl, b, hk, k0, nk, static_cast<T*>(p.dk));
      store_tile(dv.data(), kl, b, hk, k0, nk, static_cast<T*>(p.dv));
    }
  });
  // Pass 2: dQ per (batch, query head, query tile); kept separate so no two threads write the same row.
  parallel_for(p.batch * p.heads_q * num_tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> q(kTile * dim), o(kTile * dim), k(kTile * dim), v(kTile * dim), dq(kTile * dim);
    std::vector<float> kT(kTile * dim), vT(kTile * dim), pt(kTile * kTile), ds(kTile * kTile);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t qt = task % num_tiles, h = (task / num_tiles) % p.heads_q, b = task / (num_tiles * p.heads_q);
      const int64_t q0 = qt * kTile, nq = std::min(kTile, seq - q0), hk = h / group;
      load_tile(static_cast<const T*>(p.q), ql, b, h, q0, nq, q.data());
      load_tile(dout, ql, b, h, q0, nq, o.data());
      std::fill(dq.begin(), dq.end(), 0.0f);
      const int64_t k_end = p.causal ? q0 + nq : seq;
      for (int64_t k0 = 0; k0 < k_end; k0 += kTile) {
        const int64_t nk = std::min(kTile, k_end - k0);
        load_tile(static_cast<const T*>(p.k), kl, b, hk, k0, nk, k.data());
        load_tile(static_cast<const T*>(p.v), kl, b, hk, k0, nk, v.data());
        transpose(k.data(), nk, dim, kT.data());
        transpose(v.data(), nk, dim, vT.data());
        grad_tiles(q.data(), o.data(), kT.data(), vT.data(), lse_at(b, h, q0), delta_at(b, h, q0), nq, nk, dim, p,
                   q0, k0, pt.data(), ds.data());
        for (int64_t i = 0; i < nq; ++i) {
          for (int64_t j = 0; j < nk; ++j) {
            const float dsij = ds[i * kTile + j] * p.scale;
            if (dsij == 0.0f) continue;
            for (int64_t d = 0; d < dim; ++d) dq[i * dim + d] += dsij * k[j * dim + d];
          }
        }
      }
      store_tile(dq.data(), ql, b, h, q0, nq, static_cast<T*>(p.dq));
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
