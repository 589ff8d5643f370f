// Torch-free interface of the fused kernels: a dtype enum, one plain parameter struct per op, and the CPU and
// CUDA entry points that take them. Tensors are contiguous row-major buffers described by raw pointers and
// sizes; the binding layer (cpp/bindings/kernel_bindings.cpp) checks shapes, strides and dtypes first.
//
// Conventions: "rows" is the product of all leading dimensions, "cols" the last one. Statistics saved for the
// backward pass (mean, rstd, log-sum-exp) and gradients of parameters (dweight, dbias) are always float32.
#pragma once

#include <cstdint>

namespace megalith::kernels {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

const char* dtype_name(DType dtype);

// ---- normalisation over the last dimension (RMSNorm when `rms`, LayerNorm otherwise)
struct NormParams {
  const void* x = nullptr;       // [rows, cols]
  const void* weight = nullptr;  // [cols]; the scale is weight + 1 when zero_centered
  const void* bias = nullptr;    // [cols] or null (LayerNorm only)
  void* out = nullptr;           // [rows, cols]
  float* mean = nullptr;         // [rows] (LayerNorm only)
  float* rstd = nullptr;         // [rows]
  int64_t rows = 0, cols = 0;
  float eps = 1e-5f;
  bool rms = true, zero_centered = false;
  DType dtype = DType::kFloat32;
};

struct NormBackwardParams {
  const void* dy = nullptr;      // [rows, cols]
  const void* x = nullptr;       // [rows, cols]
  const void* weight = nullptr;  // [cols]
  const float* mean = nullptr;   // [rows] (LayerNorm only)
  const float* rstd = nullptr;   // [rows]
  void* dx = nullptr;            // [rows, cols]
  float* dweight = nullptr;      // [cols]
  float* dbias = nullptr;        // [cols] or null
  int64_t rows = 0, cols = 0;
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
  const void* x = nullptr;
  const float* cos = nullptr;
  const float* sin = nullptr;
  void* out = nullptr;
  int64_t batch = 0, seq = 0, heads = 0, dim = 0, rot_dim = 0;
  bool interleaved = false;  // pairs (2i, 2i+1) instead of (i, i + rot_dim/2)
  bool inverse = false;      // rotate by -angle (the backward pass)
  DType dtype = DType::kFloat32;
};

// ---- elementwise activations
struct SwigluParams {
  const void* gate = nullptr;  // [n]
  const void* up = nullptr;    // [n]
  const void* dout = nullptr;  // backward only
  void* out = nullptr;         // forward output
  void* dgate = nullptr;       // backward outputs
  void* dup = nullptr;
  int64_t n = 0;
  DType dtype = DType::kFloat32;
};

struct GeluParams {
  const void* x = nullptr;     // [rows, cols]
  const void* bias = nullptr;  // [cols] or null
  const void* dout = nullptr;  // backward only
  void* out = nullptr;         // forward: gelu(x + bias); backward: dx (= dbias rows)
  int64_t rows = 0, cols = 0;
  bool tanh_approx = true;
  DType dtype = DType::kFloat32;
};

// ---- cross-entropy over a (possibly vocab-sharded) last dimension
struct CrossEntropyParams {
  const void* logits = nullptr;  // [rows, cols] (cols = local vocabulary)
  const int64_t* target = nullptr;  // [rows], global vocabulary ids
  int64_t rows = 0, cols = 0;
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
  void* dlogits = nullptr;
  DType dtype = DType::kFloat32;
};

// ---- FlashAttention-2 style attention; q [b, s, hq, d], k/v [b, s, hkv, d], lse [b, hq, s] float32
struct AttentionParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  int64_t batch = 0, seq = 0, heads_q = 0, heads_kv = 0, dim = 0;
  float scale = 1.0f;
  bool causal = true;
  DType dtype = DType::kFloat32;
};

struct AttentionBackwardParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* out = nullptr;
  const void* dout = nullptr;
  const float* lse = nullptr;
  float* delta = nullptr;  // workspace [b, hq, s]: rowsum(dout * out)
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t batch = 0, seq = 0, heads_q = 0, heads_kv = 0, dim = 0;
  float scale = 1.0f;
  bool causal = true;
  DType dtype = DType::kFloat32;
};

namespace cpu {
// Number of worker threads the CPU kernels use (default: hardware concurrency).
void set_num_threads(int num_threads);
int num_threads();

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
