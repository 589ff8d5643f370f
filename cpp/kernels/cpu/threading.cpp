// Thread count and parallel_for of the CPU kernels, plus the dtype names shared by every kernel.
//
// The kernels run between torch's own ops, whose intra-op threads (an OpenMP team in torch's usual builds)
// keep spinning for a while after each op. A second pool of our own would compete with those spinning
// threads for the same cores, so when the Python side says torch runs on OpenMP, parallel_for borrows that
// runtime: it looks up the GOMP entry points of the OpenMP library already loaded into the process (it never
// loads one) and runs its chunks as one parallel region of torch's team, with torch's thread count. Without
// it, chunks run on short-lived std::threads.
#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if !defined(_WIN32)
#include <dlfcn.h>
#endif

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

std::atomic<int> g_num_threads{0};  // 0 = not chosen: the OpenMP team size, else the hardware concurrency

// The few entry points of an OpenMP runtime (libgomp, or LLVM/Intel libomp, which export the same GOMP_
// names) that a parallel region needs.
struct OpenMP {
  void (*parallel)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags) = nullptr;
  int (*max_threads)() = nullptr;
  int (*thread_num)() = nullptr;
  int (*team_size)() = nullptr;
  int (*in_parallel)() = nullptr;
};
std::atomic<const OpenMP*> g_openmp{nullptr};

#if !defined(_WIN32)
template <typename Fn>
bool resolve(void* handle, const char* name, Fn*& out) {
  out = reinterpret_cast<Fn*>(dlsym(handle, name));
  return out != nullptr;
}

bool resolve_all(void* handle, OpenMP& omp) {
  return resolve(handle, "GOMP_parallel", omp.parallel) && resolve(handle, "omp_get_max_threads", omp.max_threads) &&
         resolve(handle, "omp_get_thread_num", omp.thread_num) &&
         resolve(handle, "omp_get_num_threads", omp.team_size) && resolve(handle, "omp_in_parallel", omp.in_parallel);
}

// The runtime torch loaded: first through the global symbol scope, then by the usual library names, with
// RTLD_NOLOAD so that nothing new is ever loaded.
const OpenMP* find_loaded_openmp() {
  static OpenMP omp;
  if (resolve_all(RTLD_DEFAULT, omp)) return &omp;
  for (const char* name : {"libgomp.so.1", "libomp.so", "libomp.so.5", "libiomp5.so", "libomp.dylib",
                           "libiomp5.dylib"}) {
    if (void* handle = dlopen(name, RTLD_LAZY | RTLD_NOLOAD)) {
      if (resolve_all(handle, omp)) return &omp;  // the handle stays open: the runtime must outlive us
      dlclose(handle);
    }
  }
  return nullptr;
}
#else
const OpenMP* find_loaded_openmp() { return nullptr; }
#endif

// What one parallel region runs: `workers` chunks of `chunk` items.
struct Region {
  int64_t n, chunk, workers;
  const std::function<void(int64_t, int64_t)>* fn;
  const OpenMP* omp;
  std::exception_ptr error;
  std::mutex error_mutex;
};

void run_chunk(Region& r, int64_t index) {
  const int64_t begin = index * r.chunk;
  if (index >= r.workers || begin >= r.n) return;
  try {
    (*r.fn)(begin, std::min(r.n, begin + r.chunk));
  } catch (...) {  // an exception must not leave an OpenMP region or a std::thread
    std::lock_guard<std::mutex> lock(r.error_mutex);
    if (!r.error) r.error = std::current_exception();
  }
}

// Thread t of the team takes chunks t, t + team, ... (the runtime may grant fewer threads than asked for).
void openmp_body(void* data) {
  auto& r = *static_cast<Region*>(data);
  const int64_t team = std::max(1, r.omp->team_size());
  for (int64_t index = r.omp->thread_num(); index < r.workers; index += team) run_chunk(r, index);
}

}  // namespace

bool use_openmp(bool enable) {
  static std::mutex mutex;
  static const OpenMP* found = nullptr;  // looked up again until found: torch may be imported later
  std::lock_guard<std::mutex> lock(mutex);
  if (enable && found == nullptr) found = find_loaded_openmp();
  g_openmp.store(enable ? found : nullptr);
  return g_openmp.load() != nullptr;
}

const char* thread_backend() { return g_openmp.load() != nullptr ? "openmp" : "std::thread"; }

void set_num_threads(int num_threads) {
  MEGALITH_CHECK(num_threads >= 0, "num_threads must be >= 1 (or 0 to follow torch's threads), got ", num_threads);
  g_num_threads.store(num_threads);
}

int num_threads() {
  const int chosen = g_num_threads.load();
  if (chosen > 0) return chosen;
  if (const OpenMP* omp = g_openmp.load()) return std::max(1, omp->max_threads());
  return std::max(1u, std::thread::hardware_concurrency());
}

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  const OpenMP* omp = g_openmp.load();
  const int64_t by_grain = std::max<int64_t>(1, n / std::max<int64_t>(1, grain));
  int64_t workers = std::min<int64_t>({static_cast<int64_t>(num_threads()), by_grain, n});
  if (omp != nullptr && omp->in_parallel()) workers = 1;  // already inside a region: no nested team
  if (workers <= 1) {
    fn(0, n);
    return;
  }
  Region region{n, (n + workers - 1) / workers, workers, &fn, omp, nullptr, {}};
  if (omp != nullptr) {
    omp->parallel(&openmp_body, &region, static_cast<unsigned>(workers), 0);
  } else {
    std::vector<std::thread> threads;
    threads.reserve(static_cast<size_t>(workers - 1));
    for (int64_t w = 1; w < workers; ++w) threads.emplace_back([&region, w] { run_chunk(region, w); });
    run_chunk(region, 0);
    for (auto& t : threads) t.join();
  }
  if (region.error) std::rethrow_exception(region.error);
}

}  // namespace cpu
}  // namespace megalith::kernels
