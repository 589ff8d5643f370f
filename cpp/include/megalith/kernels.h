// Torch-free interface of the fused kernels: a dtype enum, one plain parameter struct per op, and the CPU and
// CUDA entry points that take them. Tensors are row-major buffers described by raw pointers and sizes; the
// binding layer (cpp/bindings/kernel_bindings.cpp) checks shapes, strides and dtypes first.
//
// Conventions: "rows" is the product of all leading dimensions, "cols" the last one. Statistics saved for the
// backward pass (mean, rstd, log-sum-exp) and gradients of parameters (dweight, dbias) are always float32.
// Inputs marked "strided" may have rows spaced by a stride (in elements, the last dimension stays dense): views
// such as the halves of a fused projection need no copy. A stride of 0 means dense. The CPU kernels honour
// these strides; the CUDA kernels take dense inputs only (the binding layer refuses others on CUDA).
#pragma once

#include <cstdint>

namespace megalith::kernels {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

const char* dtype_name(DType dtype);

// ---- normalisation over the last dimension (RMSNorm when `rms`, LayerNorm otherwise)
struct NormParams {
  const void* x = nullptr;       // [rows, cols], strided (x_stride)
  const void* weight = nullptr;  // [cols]; the scale is weight + 1 when zero_centered
  const void* bias = nullptr;    // [cols] or null (LayerNorm only)
  void* out = nullptr;           // [rows, cols]
  float* mean = nullptr;         // [rows] (LayerNorm only)
  float* rstd = nullptr;         // [rows]
  int64_t rows = 0, cols = 0;
  int64_t x_stride = 0;
  float eps = 1e-5f;
  bool rms = true, zero_centered = false;
  DType dtype = DType::kFloat32;
};

struct NormBackwardParams {
  const void* dy = nullptr;      // [rows, cols], strided (dy_stride)
  const void* x = nullptr;       // [rows, cols], strided (x_stride)
  const void* weight = nullptr;  // [cols]
  const float* mean = nullptr;   // [rows] (LayerNorm only)
  const float* rstd = nullptr;   // [rows]
  void* dx = nullptr;            // [rows, cols]
  float* dweight = nullptr;      // [cols]
  float* dbias = nullptr;        // [cols] or null
  int64_t rows = 0, cols = 0;
  int64_t dy_stride = 0, x_stride = 0;
  bool rms = true, zero_centered = false;
  DType dtype = DType::kFloat32;
};

// ---- softmax(scale * x) over the last dimension of [batch, heads, sq, sk] scores
struct SoftmaxParams {
  const void* x = nullptr;      // [batch, heads, sq, sk] (forward input) or y (backward: saved output)
  const void* dy = nullptr;     // backward only: gradient of the output
  void* out = nullptr;          // forward: y; backward: dx
  const uint8_t* mask = nullptr;  // optional, nonzero = masked; element (b,h,i,j) at mask_strides . (b,h,i,j)
  int64_t mask_strides[4] = {0, 0, 0, 0};
  int64_t batch = 0, heads = 0, sq = 0, sk = 0;
  float scale = 1.0f;
  bool causal = false;  // masks key j > i + (sk - sq) (bottom-right aligned, the usual for sq == sk)
  DType dtype = DType::kFloat32;
};

// ---- rotary position embedding on x [batch, seq, heads, dim]; cos/sin float32 [seq, rot_dim / 2]
struct RopeParams {
  const void* x = nullptr;  // strided: x_strides = (batch, seq, head) strides, all 0 = dense
  const float* cos = nullptr;
  const float* sin = nullptr;
  void* out = nullptr;
  int64_t batch = 0, seq = 0, heads = 0, dim = 0, rot_dim = 0;
  int64_t x_strides[3] = {0, 0, 0};
  bool interleaved = false;  // pairs (2i, 2i+1) instead of (i, i + rot_dim/2)
  bool inverse = false;      // rotate by -angle (the backward pass)
  DType dtype = DType::kFloat32;
};

// ---- elementwise activations
struct SwigluParams {
  const void* gate = nullptr;  // [rows, cols], strided
  const void* up = nullptr;    // [rows, cols], strided
  const void* dout = nullptr;  // backward only, strided
  void* out = nullptr;         // forward output, dense
  void* dgate = nullptr;       // backward outputs, dense
  void* dup = nullptr;
  int64_t n = 0;               // rows * cols
  int64_t rows = 0, cols = 0;
  int64_t gate_stride = 0, up_stride = 0, dout_stride = 0;
  DType dtype = DType::kFloat32;
};

struct GeluParams {
  const void* x = nullptr;     // [rows, cols], strided (x_stride)
  const void* bias = nullptr;  // [cols] or null
  const void* dout = nullptr;  // backward only, strided (dout_stride)
  void* out = nullptr;         // forward: gelu(x + bias); backward: dx (= dbias rows)
  int64_t rows = 0, cols = 0;
  int64_t x_stride = 0, dout_stride = 0;
  bool tanh_approx = true;
  DType dtype = DType::kFloat32;
};

// ---- cross-entropy over a (possibly vocab-sharded) last dimension
struct CrossEntropyParams {
  const void* logits = nullptr;  // [rows, cols] (cols = local vocabulary), strided (logits_stride)
  const int64_t* target = nullptr;  // [rows], global vocabulary ids
  int64_t rows = 0, cols = 0;
  int64_t logits_stride = 0;
  int64_t vocab_start = 0;   // global id of local column 0
  int64_t vocab_total = 0;   // global vocabulary size (label smoothing spreads over it)
  int64_t ignore_index = -100;
  float label_smoothing = 0.0f;
  // forward (full vocabulary): per-row loss and log-sum-exp
  float* loss = nullptr;
  float* lse = nullptr;
  // partials (local shard): max, sum exp(x - max), target logit (0 when not local), sum of logits
  float* local_max = nullptr;
  float* local_sumexp = nullptr;
  float* target_logit = nullptr;
  float* sum_logits = nullptr;
  // backward: dlogits = dloss * (softmax(x; lse) - (1 - eps) onehot - eps / vocab_total)
  const float* dloss = nullptr;
  const float* lse_in = nullptr;
  void* dlogits = nullptr;  // dense
  DType dtype = DType::kFloat32;
};

// ---- FlashAttention-2 style attention with grouped-query heads, dense or variable-length (packed).
//
// Tokens: q/out/dq are [total_q, heads_q, dim] and k/v/dk/dv [total_k, heads_kv, dim] row-major; a dense batch
// [batch, seq, heads, dim] is the same buffer with total = batch * seq and sequence b at rows b * seq. Packed
// (varlen) inputs give cu_seqlens_q/k, int32 [batch + 1] on the device of q: sequence b holds rows
// [cu[b], cu[b + 1]) and attends only within itself. Query head h reads kv head h / (heads_q / heads_kv).
// lse (and the backward workspace delta) are float32: [batch, heads_q, seq_q] dense, [heads_q, total_q] varlen.
#if defined(__CUDACC__)
#define MEGALITH_HOST_DEVICE __host__ __device__
#else
#define MEGALITH_HOST_DEVICE
#endif

struct AttentionShape {
  const int32_t* cu_seqlens_q = nullptr;  // varlen only; null means dense
  const int32_t* cu_seqlens_k = nullptr;
  int64_t batch = 0;                 // sequences
  int64_t seq_q = 0, seq_k = 0;      // dense: every sequence's length; varlen: the longest one (max_seqlen)
  int64_t total_q = 0, total_k = 0;  // rows of the token dimension
  int64_t heads_q = 0, heads_kv = 0, dim = 0;
  // Causal: query i of a sequence sees key j of the same sequence iff j <= i + causal_shift, i.e.
  // q_offset - k_offset when the query block starts at global position q_offset and the key block at k_offset.
  int64_t causal_shift = 0;
  float scale = 1.0f;
  bool causal = true;
  DType dtype = DType::kFloat32;

  // First row and length of sequence b. Varlen offsets are clamped to [0, total] so that unchecked (device)
  // cu_seqlens can never move an access outside the tensors.
  MEGALITH_HOST_DEVICE int64_t q_start(int64_t b) const { return start(cu_seqlens_q, b, seq_q, total_q); }
  MEGALITH_HOST_DEVICE int64_t k_start(int64_t b) const { return start(cu_seqlens_k, b, seq_k, total_k); }
  MEGALITH_HOST_DEVICE int64_t q_len(int64_t b) const {
    const int64_t n = start(cu_seqlens_q, b + 1, seq_q, total_q) - q_start(b);
    return n > 0 ? n : 0;
  }
  MEGALITH_HOST_DEVICE int64_t k_len(int64_t b) const {
    const int64_t n = start(cu_seqlens_k, b + 1, seq_k, total_k) - k_start(b);
    return n > 0 ? n : 0;
  }
  // Index in lse/delta of query 0 of sequence b, head h (queries of one (sequence, head) are contiguous).
  MEGALITH_HOST_DEVICE int64_t lse_offset(int64_t b, int64_t h) const {
    return cu_seqlens_q != nullptr ? h * total_q + q_start(b) : (b * heads_q + h) * seq_q;
  }
  // Index in lse/delta of token row t, head h.
  MEGALITH_HOST_DEVICE int64_t lse_index(int64_t t, int64_t h) const {
    return cu_seqlens_q != nullptr ? h * total_q + t : ((t / seq_q) * heads_q + h) * seq_q + t % seq_q;
  }
  // Number of keys of sequence b visible to queries [0, rows_end): every key of the sequence, or causally up
  // to key rows_end - 1 + causal_shift (0 when negative).
  MEGALITH_HOST_DEVICE int64_t key_end(int64_t b, int64_t rows_end) const {
    const int64_t len = k_len(b);
    if (!causal) return len;
    const int64_t end = rows_end + causal_shift;
    return end < 0 ? 0 : (end < len ? end : len);
  }
  // First query of sequence b that sees key `key` (causal), rounded down to a multiple of `tile`.
  MEGALITH_HOST_DEVICE int64_t first_query_tile(int64_t key, int64_t tile) const {
    if (!causal) return 0;
    const int64_t first = key - causal_shift;
    return first <= 0 ? 0 : first / tile * tile;
  }

 private:
  MEGALITH_HOST_DEVICE static int64_t start(const int32_t* cu, int64_t b, int64_t seq, int64_t total) {
    if (cu == nullptr) return b * seq;
    const int64_t at = cu[b];
    return at < 0 ? 0 : (at > total ? total : at);
  }
};

struct AttentionParams : AttentionShape {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
};

struct AttentionBackwardParams : AttentionShape {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* out = nullptr;
  const void* dout = nullptr;
  const float* lse = nullptr;
  const float* dlse = nullptr;  // gradient of lse (same layout) or null; it enters as delta -= dlse
  float* delta = nullptr;       // workspace: rowsum(dout * out) - dlse
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
};

namespace cpu {
// Number of threads the CPU kernels use: num_threads >= 1 fixes it; 0 (the default) follows the OpenMP
// runtime's thread count when use_openmp is on (torch's intra-op threads), else the hardware concurrency.
void set_num_threads(int num_threads);
int num_threads();
// Runs the kernels' parallel loops on the OpenMP runtime already loaded into the process (torch's, found with
// dlsym; nothing is loaded) instead of on threads of their own. Returns whether that runtime is in use.
bool use_openmp(bool enable);
const char* thread_backend();  // "openmp" or "std::thread"

// Instruction set of the vectorised CPU kernels: "base", "avx2" or "avx512" (or "auto": the best available).
bool isa_available(const char* name);
void set_isa(const char* name);
const char* isa_name();

void norm_forward(const NormParams& p);
void norm_backward(const NormBackwardParams& p);
void softmax_forward(const SoftmaxParams& p);
void softmax_backward(const SoftmaxParams& p);
void rope(const RopeParams& p);
void swiglu_forward(const SwigluParams& p);
void swiglu_backward(const SwigluParams& p);
void bias_gelu_forward(const GeluParams& p);
void bias_gelu_backward(const GeluParams& p);
void cross_entropy_forward(const CrossEntropyParams& p);
void cross_entropy_partials(const CrossEntropyParams& p);
void cross_entropy_backward(const CrossEntropyParams& p);
void attention_forward(const AttentionParams& p);
void attention_backward(const AttentionBackwardParams& p);
}  // namespace cpu

namespace cuda {
// Every launcher runs on `stream` (a cudaStream_t) of the current device and throws megalith::Error when a
// shape assumption or the launch fails.
void set_device(int device);
void norm_forward(const NormParams& p, void* stream);
void norm_backward(const NormBackwardParams& p, void* stream);
void softmax_forward(const SoftmaxParams& p, void* stream);
void softmax_backward(const SoftmaxParams& p, void* stream);
void rope(const RopeParams& p, void* stream);
void swiglu_forward(const SwigluParams& p, void* stream);
void swiglu_backward(const SwigluParams& p, void* stream);
void bias_gelu_forward(const GeluParams& p, void* stream);
void bias_gelu_backward(const GeluParams& p, void* stream);
void cross_entropy_forward(const CrossEntropyParams& p, void* stream);
void cross_entropy_partials(const CrossEntropyParams& p, void* stream);
void cross_entropy_backward(const CrossEntropyParams& p, void* stream);
void attention_forward(const AttentionParams& p, void* stream);
void attention_backward(const AttentionBackwardParams& p, void* stream);
}  // namespace cuda

}  // namespace megalith::kernels
