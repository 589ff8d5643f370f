// The CPU kernels of each instruction-set copy (see cpu_common.h); dispatch.cpp defines the megalith::kernels::
// cpu entry points of megalith/kernels.h by calling the best copy the running CPU supports.
#pragma once

#include <string>
#include <vector>

#include "megalith/kernels.h"

// X(name, params) for every kernel compiled per instruction set.
#define MEGALITH_CPU_ISA_KERNELS(X)                                                                            \
  X(norm_forward, NormParams)                                                                                  \
  X(norm_backward, NormBackwardParams)                                                                         \
  X(softmax_forward, SoftmaxParams)                                                                            \
  X(softmax_backward, SoftmaxParams)                                                                           \
  X(rope, RopeParams)                                                                                          \
  X(swiglu_forward, SwigluParams)                                                                              \
  X(swiglu_backward, SwigluParams)                                                                             \
  X(bias_gelu_forward, GeluParams)                                                                             \
  X(bias_gelu_backward, GeluParams)                                                                            \
  X(cross_entropy_forward, CrossEntropyParams)                                                                 \
  X(cross_entropy_partials, CrossEntropyParams)                                                                \
  X(cross_entropy_backward, CrossEntropyParams)                                                                \
  X(attention_forward, AttentionParams)                                                                        \
  X(attention_backward, AttentionBackwardParams)

#define MEGALITH_DECLARE_CPU_KERNEL(name, params) void name(const params& p);

namespace megalith::kernels::cpu {
namespace base {
MEGALITH_CPU_ISA_KERNELS(MEGALITH_DECLARE_CPU_KERNEL)
}
namespace avx2 {
MEGALITH_CPU_ISA_KERNELS(MEGALITH_DECLARE_CPU_KERNEL)
}
namespace avx512 {
MEGALITH_CPU_ISA_KERNELS(MEGALITH_DECLARE_CPU_KERNEL)
}
}  // namespace megalith::kernels::cpu
