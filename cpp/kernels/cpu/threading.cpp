// Thread count and parallel_for of the CPU kernels, plus the dtype names shared by every kernel.
#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "cpu_common.h"

namespace megalith::kernels {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
  }
  return "unknown";
}

namespace cpu {
namespace {
std::atomic<int> g_num_threads{0};  // 0 = not chosen yet: use the hardware concurrency
}  // namespace

void set_num_threads(int num_threads) {
  MEGALITH_CHECK(num_threads >= 1, "num_threads must be >= 1, got ", num_threads);
  g_num_threads.store(num_threads);
}

int num_threads() {
  const int chosen = g_num_threads.load();
  if (chosen > 0) return chosen;
  return std::max(1u, std::thread::hardware_concurrency());
}

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  const int64_t by_grain = std::max<int64_t>(1, n / std::max<int64_t>(1, grain));
  const int64_t workers = std::min<int64_t>({static_cast<int64_t>(num_threads()), by_grain, n});
  if (workers <= 1) {
    fn(0, n);
    return;
  }
  const int64_t chunk = (n + workers - 1) / workers;
  std::exception_ptr error;
  std::mutex error_mutex;
  auto run = [&](int64_t begin) {
    if (begin >= n) return;
    try {
      fn(begin, std::min(n, begin + chunk));
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(workers - 1));
  for (int64_t w = 1; w < workers; ++w) threads.emplace_back(run, w * chunk);
  run(0);
  for (auto& t : threads) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace cpu
}  // namespace megalith::kernels
