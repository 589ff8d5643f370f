// C entry points of the emulated CUDA attention (loaded with ctypes by tests/kernels/test_attention_emulated.py).
// They fill the same param structs as cpp/bindings/kernel_bindings.cpp and call the CUDA launchers.
#include <cstring>
#include <exception>
#include <string>

#include "emulator.h"
#include "megalith/kernels.h"

namespace k = megalith::kernels;

// Defined in cpp/kernels/cpu/threading.cpp in the real module; the emulated build links only the CUDA sources.
const char* megalith::kernels::dtype_name(DType dtype) {
  return dtype == DType::kFloat32 ? "float32" : dtype == DType::kFloat16 ? "float16" : "bfloat16";
}

namespace {

// sizes: batch, seq_q, seq_k, total_q, total_k, heads_q, heads_kv, dim, causal_shift
void fill_shape(k::AttentionShape& s, const int32_t* cu_q, const int32_t* cu_k, const int64_t* sizes, float scale,
                int causal, int dtype) {
  s.cu_seqlens_q = cu_q, s.cu_seqlens_k = cu_k;
  s.batch = sizes[0], s.seq_q = sizes[1], s.seq_k = sizes[2], s.total_q = sizes[3], s.total_k = sizes[4];
  s.heads_q = sizes[5], s.heads_kv = sizes[6], s.dim = sizes[7], s.causal_shift = sizes[8];
  s.scale = scale, s.causal = causal != 0, s.dtype = static_cast<k::DType>(dtype);
}

template <typename Fn>
int guarded(char* err, int err_len, Fn&& fn) {
  try {
    fn();
    return 0;
  } catch (const std::exception& e) {
    std::strncpy(err, e.what(), static_cast<size_t>(err_len) - 1);
    err[err_len - 1] = '\0';
    return 1;
  }
}

}  // namespace

extern "C" {

void emu_add_buffer(const void* p, size_t bytes) { emu::g_buffers.emplace_back(static_cast<const char*>(p), bytes); }
void emu_clear_buffers() { emu::g_buffers.clear(); }

int emu_attention_forward(const void* q, const void* kk, const void* v, void* out, float* lse, const int32_t* cu_q,
                          const int32_t* cu_k, const int64_t* sizes, float scale, int causal, int dtype, char* err,
                          int err_len) {
  k::AttentionParams p;
  fill_shape(p, cu_q, cu_k, sizes, scale, causal, dtype);
  p.q = q, p.k = kk, p.v = v, p.out = out, p.lse = lse;
  return guarded(err, err_len, [&] { k::cuda::attention_forward(p, nullptr); });
}

int emu_attention_backward(const void* q, const void* kk, const void* v, const void* out, const void* dout,
                           const float* lse, const float* dlse, float* delta, void* dq, void* dk, void* dv,
                           const int32_t* cu_q, const int32_t* cu_k, const int64_t* sizes, float scale, int causal,
                           int dtype, char* err, int err_len) {
  k::AttentionBackwardParams p;
  fill_shape(p, cu_q, cu_k, sizes, scale, causal, dtype);
  p.q = q, p.k = kk, p.v = v, p.out = out, p.dout = dout, p.lse = lse, p.dlse = dlse, p.delta = delta;
  p.dq = dq, p.dk = dk, p.dv = dv;
  return guarded(err, err_len, [&] { k::cuda::attention_backward(p, nullptr); });
}

}  // extern "C"
