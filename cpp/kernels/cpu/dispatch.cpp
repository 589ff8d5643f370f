// The CPU kernel entry points of megalith/kernels.h: each calls the instruction-set copy (cpu_kernels.h) that
// the running CPU supports best, or the one chosen with set_isa.
#include <atomic>
#include <cstring>

#include "cpu_kernels.h"
#include "megalith/error.h"
#include "megalith/kernels.h"

namespace megalith::kernels::cpu {
namespace {

enum Level : int { kBase = 0, kAvx2 = 1, kAvx512 = 2, kAuto = -1 };
constexpr const char* kNames[] = {"base", "avx2", "avx512"};

// Whether the copy of `level` was compiled in and the CPU (and the OS, for the wider registers) supports it.
bool supported(int level) {
  switch (level) {
    case kBase:
      return true;
#if defined(MEGALITH_CPU_HAS_AVX2) && (defined(__GNUC__) || defined(__clang__))
    case kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
#if defined(MEGALITH_CPU_HAS_AVX512) && (defined(__GNUC__) || defined(__clang__))
    case kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && supported(kAvx2);
#endif
    default:
      return false;
  }
}

int best_level() {
  for (int level = kAvx512; level > kBase; --level) {
    if (supported(level)) return level;
  }
  return kBase;
}

std::atomic<int> g_level{kAuto};

int level() {
  int chosen = g_level.load(std::memory_order_relaxed);
  if (chosen == kAuto) {
    chosen = best_level();
    g_level.store(chosen, std::memory_order_relaxed);
  }
  return chosen;
}

int parse_level(const char* name) {
  if (std::strcmp(name, "auto") == 0) return kAuto;
  for (int level = kBase; level <= kAvx512; ++level) {
    if (std::strcmp(name, kNames[level]) == 0) return level;
  }
  fail("unknown CPU instruction set '", name, "'; expected auto, base, avx2 or avx512");
}

}  // namespace

bool isa_available(const char* name) {
  const int chosen = parse_level(name);
  return chosen == kAuto || supported(chosen);
}

void set_isa(const char* name) {
  const int chosen = parse_level(name);
  if (!isa_available(name)) {
    fail("the CPU kernels cannot use ", name, ": it was not compiled in or this CPU does not support it");
  }
  g_level.store(chosen == kAuto ? best_level() : chosen);
}

const char* isa_name() { return kNames[level()]; }

#define MEGALITH_DISPATCH_CPU_KERNEL(name, params) \
  void name(const params& p) {                     \
    switch (level()) {                             \
      case kAvx512:                                \
        return avx512::name(p);                    \
      case kAvx2:                                  \
        return avx2::name(p);                      \
      default:                                     \
        return base::name(p);                      \
    }                                              \
  }
MEGALITH_CPU_ISA_KERNELS(MEGALITH_DISPATCH_CPU_KERNEL)

}  // namespace megalith::kernels::cpu
