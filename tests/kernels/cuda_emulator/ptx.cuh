// Emulated stand-in for cpp/kernels/cuda/ptx.cuh: the same functions, implemented by the SIMT emulator
// (emulator.h) from the PTX ISA semantics instead of inline PTX. The test build copies it over the real one.
#pragma once

#include <cstdint>
#include <cstring>

#include "emulator.h"

namespace megalith::kernels::cuda::mma {

template <typename T>
inline uint32_t pack2(float lo, float hi);
template <>
inline uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  return __float2bfloat16_rn(lo).bits | (static_cast<uint32_t>(__float2bfloat16_rn(hi).bits) << 16);
}
template <>
inline uint32_t pack2<__half>(float lo, float hi) {
  return __float2half_rn(lo).bits | (static_cast<uint32_t>(__float2half_rn(hi).bits) << 16);
}

template <typename T>
inline void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::mma16816<T>(c, a, b0, b1);
}

inline uint32_t smem_addr(const void* p) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < emu::dynamic_smem() || c > emu::dynamic_smem() + emu::g_block.smem.size()) {
    emu::fault("shared-memory address outside the dynamic allocation");
  }
  return static_cast<uint32_t>(c - emu::dynamic_smem());
}

inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { emu::ldmatrix(r, addr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { emu::ldmatrix(r, addr, true); }

inline void cp_async_16(uint32_t dst, const void* src, bool valid) { emu::cp_async(dst, src, valid); }
inline void cp_async_commit() { emu::cp_commit(); }
template <int kPending>
inline void cp_async_wait() {
  emu::cp_wait(kPending);
}

}  // namespace megalith::kernels::cuda::mma
