// A small SIMT emulator that compiles Megalith's CUDA attention sources with a host C++ compiler, so that their
// indexing, masking, pipelining and tensor-core fragment logic can be checked on a machine without a GPU.
//
// Every CUDA thread of a block is a std::thread; blocks run one after another (so `__shared__` arrays can be
// function statics). __syncthreads is a block barrier; shuffles, ldmatrix and mma.sync are warp collectives
// that exchange operands through a per-warp buffer between two warp barriers. The PTX semantics implemented
// here (ptx.cuh next to this file) follow the PTX ISA fragment layouts independently of the kernels, which is
// what makes this a check of the kernels rather than a copy of them. It is not a performance model, and it
// does not replace running the `cuda`-marked tests on a GPU.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

// ---- language surface

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static  // blocks run one at a time, so a function static is per-block shared memory

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx;
inline dim3 blockIdx, blockDim, gridDim;

using std::max;
using std::min;

// ---- 16-bit float types (storage only, converted through float)

struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
struct __half2 {
  __half x, y;
};

inline float __bfloat162float(__nv_bfloat16 v) {
  const uint32_t word = static_cast<uint32_t>(v.bits) << 16;
  float out;
  std::memcpy(&out, &word, 4);
  return out;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t word;
  std::memcpy(&word, &v, 4);
  if (std::isnan(v)) return {static_cast<uint16_t>((word >> 16) | 0x40)};
  word += 0x7FFFu + ((word >> 16) & 1u);
  return {static_cast<uint16_t>(word >> 16)};
}
inline float __half2float(__half v) {
  _Float16 h;
  std::memcpy(&h, &v.bits, 2);
  return static_cast<float>(h);
}
inline __half __float2half_rn(float v) {
  const _Float16 h = static_cast<_Float16>(v);  // round to nearest even
  __half out;
  std::memcpy(&out.bits, &h, 2);
  return out;
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }

// ---- runtime API surface

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrComputeCapabilityMinor = 76 };
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrComputeCapabilityMajor ? 8 : 0;  // an sm80 device
  return cudaSuccess;
}

namespace emu {

// Thrown for anything a real GPU would fault on or silently corrupt (misaligned or out-of-range accesses).
[[noreturn]] inline void fault(const std::string& what) { throw std::runtime_error("emulated GPU fault: " + what); }

struct Warp {
  std::barrier<> bar{32};
  uint32_t u32[32][8];
  float f32[32];
};

struct Block {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> smem;  // dynamic shared memory
};

inline Block g_block;
inline std::vector<std::pair<const char*, size_t>> g_buffers;  // global buffers cp.async may read

inline int lane() { return static_cast<int>(threadIdx.x % 32); }
inline Warp& warp() { return *g_block.warps[threadIdx.x / 32]; }
inline unsigned char* dynamic_smem() { return g_block.smem.data(); }

inline void check_global(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (const auto& [base, size] : g_buffers) {
    if (c >= base && c + bytes <= base + size) return;
  }
  fault("global read outside every input tensor");
}

inline void check_smem(uint32_t offset, size_t bytes) {
  if (offset + bytes > g_block.smem.size()) fault("shared memory access past the dynamic allocation");
}

// ---- asynchronous copies: recorded when issued, performed when a wait_group retires their group

struct Copy {
  uint32_t dst;
  const void* src;
  bool valid;
};
inline thread_local std::vector<Copy> t_open;
inline thread_local std::deque<std::vector<Copy>> t_groups;

inline void cp_async(uint32_t dst, const void* src, bool valid) {
  if (dst % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) fault("cp.async of 16 bytes not 16-byte aligned");
  check_smem(dst, 16);
  if (valid) check_global(src, 16);
  t_open.push_back({dst, src, valid});
}
inline void cp_commit() {
  t_groups.push_back(std::move(t_open));
  t_open.clear();
}
inline void cp_wait(int pending) {
  while (static_cast<int>(t_groups.size()) > pending) {
    for (const Copy& c : t_groups.front()) {
      if (c.valid) {
        std::memcpy(g_block.smem.data() + c.dst, c.src, 16);
      } else {
        std::memset(g_block.smem.data() + c.dst, 0, 16);
      }
    }
    t_groups.pop_front();
  }
}

// ---- warp collectives

inline float shfl(float v, int src_lane) {
  Warp& w = warp();
  w.f32[lane()] = v;
  w.bar.arrive_and_wait();
  const float out = w.f32[src_lane & 31];
  w.bar.arrive_and_wait();
  return out;
}

inline uint32_t smem_u16(uint32_t offset) {
  check_smem(offset, 2);
  uint16_t v;
  std::memcpy(&v, g_block.smem.data() + offset, 2);
  return v;
}

// ldmatrix .x4: lanes 8i..8i+7 give the 16-byte row addresses of 8x8 matrix i. Without .trans lane t receives
// (row t/4, columns 2(t%4), 2(t%4)+1) of each matrix; with .trans (rows 2(t%4), 2(t%4)+1, column t/4).
inline void ldmatrix(uint32_t (&r)[4], uint32_t addr, bool trans) {
  if (addr % 16 != 0) fault("ldmatrix row address not 16-byte aligned");
  Warp& w = warp();
  const int l = lane();
  w.u32[l][0] = addr;
  w.bar.arrive_and_wait();
  for (int i = 0; i < 4; ++i) {
    if (!trans) {
      const uint32_t row = w.u32[8 * i + l / 4][0];
      r[i] = smem_u16(row + 4 * (l % 4)) | (smem_u16(row + 4 * (l % 4) + 2) << 16);
    } else {
      const uint32_t row0 = w.u32[8 * i + 2 * (l % 4)][0], row1 = w.u32[8 * i + 2 * (l % 4) + 1][0];
      r[i] = smem_u16(row0 + 2 * (l / 4)) | (smem_u16(row1 + 2 * (l / 4)) << 16);
    }
  }
  w.bar.arrive_and_wait();
}

template <typename T>
float half_to_float(uint32_t bits) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float({static_cast<uint16_t>(bits)});
  } else {
    return __half2float({static_cast<uint16_t>(bits)});
  }
}

// mma.sync.m16n8k16.row.col, float32 accumulate. Fragments (g = lane/4, c = 2(lane%4); low half = lower index):
// A: a0 (g, c..c+1), a1 (g+8, c..c+1), a2 (g, c+8..c+9), a3 (g+8, c+8..c+9); B: b0 (k c..c+1, n g),
// b1 (k c+8..c+9, n g); C: c0, c1 (g, c..c+1), c2, c3 (g+8, c..c+1).
template <typename T>
void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Warp& w = warp();
  const int l = lane();
  for (int i = 0; i < 4; ++i) w.u32[l][i] = a[i];
  w.u32[l][4] = b0, w.u32[l][5] = b1;
  w.bar.arrive_and_wait();
  float A[16][16], B[16][8];
  for (int L = 0; L < 32; ++L) {
    const int g = L / 4, k = 2 * (L % 4);
    for (int half = 0; half < 2; ++half) {
      auto value = [&](int reg) { return half_to_float<T>((w.u32[L][reg] >> (16 * half)) & 0xFFFF); };
      A[g][k + half] = value(0);
      A[g + 8][k + half] = value(1);
      A[g][k + 8 + half] = value(2);
      A[g + 8][k + 8 + half] = value(3);
      B[k + half][g] = value(4);
      B[k + 8 + half][g] = value(5);
    }
  }
  w.bar.arrive_and_wait();
  const int g = l / 4, n = 2 * (l % 4);
  for (int j = 0; j < 2; ++j) {
    float lo = 0.0f, hi = 0.0f;
    for (int k = 0; k < 16; ++k) lo += A[g][k] * B[k][n + j], hi += A[g + 8][k] * B[k][n + j];
    c[j] += lo;
    c[2 + j] += hi;
  }
}

// ---- launch: every block of the grid in turn, each with blockDim.x threads

template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t, Args&&... args) {
  if (block.y != 1 || block.z != 1 || block.x % 32 != 0) fault("the emulator runs 1-D blocks of whole warps");
  gridDim = grid, blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        g_block.bar = std::make_unique<std::barrier<>>(block.x);
        g_block.warps.clear();
        for (unsigned i = 0; i < block.x / 32; ++i) g_block.warps.push_back(std::make_unique<Warp>());
        g_block.smem.assign(smem_bytes, 0xFF);  // garbage (NaN as 16-bit floats) until written
        std::vector<std::thread> threads;
        std::exception_ptr error;
        std::atomic<bool> failed{false};
        for (unsigned t = 0; t < block.x; ++t) {
          threads.emplace_back([&, t] {
            threadIdx = dim3(t);
            t_open.clear(), t_groups.clear();
            try {
              kernel(args...);
            } catch (...) {
              if (!failed.exchange(true)) error = std::current_exception();
            }
            // An exited thread no longer takes part in barriers (as on the GPU).
            warp().bar.arrive_and_drop();
            g_block.bar->arrive_and_drop();
          });
        }
        for (auto& th : threads) th.join();
        if (error) std::rethrow_exception(error);
      }
    }
  }
}

}  // namespace emu

// ---- device intrinsics

inline void __syncthreads() { emu::g_block.bar->arrive_and_wait(); }
inline float __shfl_sync(unsigned, float v, int src) { return emu::shfl(v, src); }
inline float __shfl_xor_sync(unsigned, float v, int mask) { return emu::shfl(v, emu::lane() ^ mask); }

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel, cudaFuncAttribute, int value) {
  return value <= 163 * 1024 ? cudaSuccess : cudaErrorInvalidValue;  // the sm80 (A100) per-block opt-in limit
}
