// Tensor-core building blocks of the float16/bfloat16 attention kernels (sm80+), on top of the PTX wrappers
// of ptx.cuh: the XOR-swizzled shared-memory tile layout, cp.async tile copies, warp-level 16-row matmuls
// (S = A B^T from shared memory, O += P B with P in registers) and the launcher checks.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"; g = lane / 4, c = 2 * (lane % 4)):
//   A 16x16 (row-major): a0 = (g, c..c+1), a1 = (g+8, c..c+1), a2 = (g, c+8..c+9), a3 = (g+8, c+8..c+9)
//   B 16x8  (col-major): b0 = (k = c..c+1, n = g), b1 = (k = c+8..c+9, n = g)
//   C 16x8  (float32):   c0, c1 = (g, c..c+1), c2, c3 = (g+8, c..c+1)
// so the C fragments of two adjacent 8-column tiles are, once packed to 16 bits, the A fragment of one
// 16-column step; this is how P and dS feed the next matmul without leaving registers.
#pragma once

#include <cstdint>

#include "attention.cuh"
#include "ptx.cuh"

namespace megalith::kernels::cuda::mma {

// Element offset of (row, col) in a shared [rows][D] tile whose 16-byte chunks are XOR-swizzled by row % 8:
// the eight rows one ldmatrix matrix (or one cp.async wave) touches then hit eight different bank groups.
// col is a multiple of 8 wherever a chunk starts.
template <int D>
__device__ __forceinline__ int swizzle(int row, int col) {
  return row * D + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

// Row/column (within a 16x16 block) whose address lane `lane` gives to ldmatrix_x4, for
//   an A operand (non-transposed) or a row-major B operand (ldmatrix_x4_trans): matrices ordered
//     (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 8-15);
//   a B operand stored [n][k] (non-transposed): (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7),
//     (n 8-15, k 8-15), i.e. registers 0-1 are the two k halves of n-tile 0, registers 2-3 of n-tile 1.
__device__ __forceinline__ int a_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
__device__ __forceinline__ int a_col(int lane) { return (lane >> 4) * 8; }
__device__ __forceinline__ int b_row(int lane) { return (lane & 7) + (lane >> 4) * 8; }
__device__ __forceinline__ int b_col(int lane) { return ((lane >> 3) & 1) * 8; }

// Block-cooperative cp.async of kRows token rows t0, t0 + 1, ... of head h of a [tokens, heads, D] tensor into
// a swizzled shared tile; rows at or past `valid` are zero-filled. The caller commits the group.
template <typename T, int D, int kRows, int kThreads>
__device__ __forceinline__ void cp_tile(T* tile, const T* __restrict__ src, int64_t t0, int64_t valid, int64_t heads,
                                        int64_t h) {
  constexpr int kChunks = D / 8;
  static_assert(kRows * kChunks % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int i = 0; i < kRows * kChunks / kThreads; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    const bool ok = r < valid;
    const T* from = ok ? src + ((t0 + r) * heads + h) * D + c : src;
    cp_async_16(smem_addr(tile + swizzle<D>(r, c)), from, ok);
  }
}

// acc[n-tile][4] += A (16 rows of a swizzled [rows][D] tile, from row0) times B^T, where B is kCols rows of a
// swizzled [rows][D] tile (from row 0): a 16 x kCols block of A B^T, reducing over all D columns.
template <typename T, int D, int kCols>
__device__ __forceinline__ void gemm_abt(float (&acc)[kCols / 8][4], const T* a_tile, int row0, const T* b_tile,
                                         int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, smem_addr(a_tile + swizzle<D>(row0 + a_row(lane), kk * 16 + a_col(lane))));
#pragma unroll
    for (int np = 0; np < kCols / 16; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, smem_addr(b_tile + swizzle<D>(np * 16 + b_row(lane), kk * 16 + b_col(lane))));
      mma16816<T>(acc[2 * np], a, b[0], b[1]);
      mma16816<T>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc[d-tile][4] += P B, where P (16 x kRowsB, float C fragments p[kRowsB / 8][4]) is packed to 16 bits and B
// is the kRowsB x D swizzled tile b_tile (row-major, read transposed by ldmatrix).
template <typename T, int D, int kRowsB>
__device__ __forceinline__ void gemm_pb(float (&acc)[D / 8][4], const float (&p)[kRowsB / 8][4], const T* b_tile,
                                        int lane) {
#pragma unroll
  for (int kk = 0; kk < kRowsB / 16; ++kk) {
    const uint32_t a[4] = {pack2<T>(p[2 * kk][0], p[2 * kk][1]), pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                           pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]), pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, smem_addr(b_tile + swizzle<D>(kk * 16 + a_row(lane), dp * 16 + a_col(lane))));
      mma16816<T>(acc[2 * dp], a, b[0], b[1]);
      mma16816<T>(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

// Stores 16 rows of float C fragments acc[D / 8][4] (scaled by `scale`) as 16-bit rows: thread row g goes to
// row_ptr_lo, row g + 8 to row_ptr_hi (either may be null: a row past the end of its sequence).
template <typename T, int D>
__device__ __forceinline__ void store_rows(const float (&acc)[D / 8][4], float scale_lo, float scale_hi, T* row_lo,
                                           T* row_hi, int lane) {
  const int c = 2 * (lane % 4);
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    if (row_lo != nullptr) {
      *reinterpret_cast<uint32_t*>(row_lo + dt * 8 + c) = pack2<T>(acc[dt][0] * scale_lo, acc[dt][1] * scale_lo);
    }
    if (row_hi != nullptr) {
      *reinterpret_cast<uint32_t*>(row_hi + dt * 8 + c) = pack2<T>(acc[dt][2] * scale_hi, acc[dt][3] * scale_hi);
    }
  }
}

template <int kTiles>
__device__ __forceinline__ void zero(float (&acc)[kTiles][4]) {
#pragma unroll
  for (int i = 0; i < kTiles; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
}

// Scales raw scores to log2 units (times scale * log2 e) and, when `mask`, hides (-inf) keys at or past k_end
// or after the causal limit. Entries of this thread: s[nt][0..1] belong to query qi, s[nt][2..3] to query
// qi + 8, and entry e of tile nt to key n0 + nt * 8 + 2 * (lane % 4) + (e % 2).
template <int kTiles>
__device__ __forceinline__ void scale_mask(float (&s)[kTiles][4], float scale_log2, bool mask, int64_t n0,
                                           int64_t k_end, int64_t qi, const AttentionShape& p, int lane) {
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[nt][e] *= scale_log2;
      if (mask) {
        const int64_t kj = n0 + nt * 8 + 2 * (lane % 4) + (e & 1), row = qi + (e >> 1) * 8;
        if (kj >= k_end || (p.causal && kj > row + p.causal_shift)) s[nt][e] = -INFINITY;
      }
    }
  }
}

// ---- launcher helpers

// Calls fn(T{}) with T = __half or __nv_bfloat16.
template <typename Fn>
void dispatch_16bit(DType dtype, const char* what, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat16:
      fn(__half{});
      return;
    case DType::kBFloat16:
      fn(__nv_bfloat16{});
      return;
    default:
      fail(what, ": the tensor-core kernels take float16 or bfloat16, got ", dtype_name(dtype));
  }
}

// mma.sync on 16-bit inputs and cp.async need compute capability 8.0 (Ampere) or newer.
inline void check_tensor_cores(const char* what) {
  int device = 0, major = 0, minor = 0;
  MEGALITH_CUDA_CHECK(cudaGetDevice(&device));
  MEGALITH_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  MEGALITH_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  MEGALITH_CHECK(major >= 8, what, ": the float16/bfloat16 kernels need compute capability 8.0 or newer, cuda:",
                 device, " is ", major, ".", minor);
}

// cp.async copies 16 bytes at a time, so every tensor it reads must start on a 16-byte boundary.
inline void check_aligned(const void* ptr, const char* name, const char* what) {
  MEGALITH_CHECK(reinterpret_cast<uintptr_t>(ptr) % 16 == 0, what, ": ", name,
                 " must start on a 16-byte boundary for the tensor-core kernels");
}

// Opts the kernel in to `bytes` of dynamic shared memory (above the 48 KiB default) and launches it.
template <typename Kernel, typename Params>
void launch_with_smem(Kernel kernel, dim3 grid, int threads, size_t bytes, cudaStream_t stream, const Params& p) {
  MEGALITH_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  kernel<<<grid, threads, bytes, stream>>>(p);
  MEGALITH_CUDA_CHECK(cudaGetLastError());
}

}  // namespace megalith::kernels::cuda::mma
