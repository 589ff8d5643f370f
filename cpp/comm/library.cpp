// Finding and opening libnccl.so.2 with dlopen, checking its version, and the calls that need no GPU.
#include <dlfcn.h>
#include <sys/stat.h>

#include <mutex>
#include <optional>
#include <sstream>
#include <type_traits>

#include "megalith/comm.h"

namespace megalith::comm {

namespace {

struct Loaded {
  void* handle = nullptr;
  Api api;
  LibraryInfo info;
};

// The library stays open for the life of the process: communicators and registered buffers refer to it.
std::mutex g_mutex;
std::optional<Loaded> g_loaded;

std::string last_dl_error() {
  const char* message = dlerror();
  return message != nullptr ? message : "unknown dlopen error";
}

bool is_directory(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

template <typename Fn>
Fn symbol(void* handle, const char* name) {
  return reinterpret_cast<Fn>(dlsym(handle, name));
}

// The path the dynamic loader resolved for a symbol of the opened library.
std::string resolved_path(void* any_symbol, const std::string& fallback) {
  Dl_info info{};
  if (dladdr(any_symbol, &info) != 0 && info.dli_fname != nullptr) return info.dli_fname;
  return fallback;
}

// Resolves every function, after the version check. Throws (and leaves `out` unusable) on a missing one.
void resolve(void* handle, const std::string& path, Api& out) {
  auto need = [&](auto& slot, const char* name) {
    using Fn = std::remove_reference_t<decltype(slot)>;
    slot = symbol<Fn>(handle, name);
    if (slot == nullptr) {
      throw LibraryError(path + " has no " + name + "; it is not a usable NCCL library (set " + kLibraryEnv +
                         " to another libnccl.so.2)");
    }
  };
  need(out.get_unique_id, "ncclGetUniqueId");
  need(out.comm_init_rank_config, "ncclCommInitRankConfig");
  need(out.comm_finalize, "ncclCommFinalize");
  need(out.comm_destroy, "ncclCommDestroy");
  need(out.comm_abort, "ncclCommAbort");
  need(out.comm_get_async_error, "ncclCommGetAsyncError");
  need(out.get_error_string, "ncclGetErrorString");
  need(out.get_last_error, "ncclGetLastError");
  need(out.all_reduce, "ncclAllReduce");
  need(out.reduce_scatter, "ncclReduceScatter");
  need(out.all_gather, "ncclAllGather");
  need(out.broadcast, "ncclBroadcast");
  need(out.send, "ncclSend");
  need(out.recv, "ncclRecv");
  need(out.group_start, "ncclGroupStart");
  need(out.group_end, "ncclGroupEnd");
  out.comm_register = symbol<abi::CommRegisterFn>(handle, "ncclCommRegister");
  out.comm_deregister = symbol<abi::CommDeregisterFn>(handle, "ncclCommDeregister");
  out.mem_alloc = symbol<abi::MemAllocFn>(handle, "ncclMemAlloc");
  out.mem_free = symbol<abi::MemFreeFn>(handle, "ncclMemFree");
}

// Opens `name` (a path, or a bare name for the system search); returns null and sets `error` on failure.
void* open_library(const std::string& name, std::string* error) {
  void* handle = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) *error = last_dl_error();
  return handle;
}

// Turns an opened handle into a Loaded library, or closes it and throws.
Loaded finish_load(void* handle, const std::string& opened_as, const std::string& source) {
  Loaded loaded;
  loaded.handle = handle;
  try {
    loaded.api.get_version = symbol<abi::GetVersionFn>(handle, "ncclGetVersion");
    if (loaded.api.get_version == nullptr) {
      throw LibraryError(opened_as + " has no ncclGetVersion; it is not an NCCL library");
    }
    const std::string path = resolved_path(reinterpret_cast<void*>(loaded.api.get_version), opened_as);
    int code = 0;
    if (loaded.api.get_version(&code) != abi::kSuccess) throw LibraryError("ncclGetVersion failed in " + path);
    check_version(code, path);
    resolve(handle, path, loaded.api);
    loaded.info.path = path;
    loaded.info.source = source;
    loaded.info.version_code = code;
    loaded.info.registration = loaded.api.comm_register != nullptr && loaded.api.comm_deregister != nullptr &&
                               loaded.api.mem_alloc != nullptr && loaded.api.mem_free != nullptr;
  } catch (...) {
    dlclose(handle);
    throw;
  }
  return loaded;
}

std::string install_hint() {
  return std::string("Install NCCL with `pip install 'megalith-kernels[nccl]'` (CUDA 12) or ") +
         "`pip install 'megalith-kernels[nccl-cu13]'` (CUDA 13), or set " + kLibraryEnv + " to the path of " +
         kLibraryName + ".";
}

Loaded search(const std::string& explicit_path, const std::vector<std::string>& wheel_dirs) {
  std::string error;
  if (!explicit_path.empty()) {
    const std::string file =
        is_directory(explicit_path) ? explicit_path + "/" + kLibraryName : explicit_path;
    void* handle = open_library(file, &error);
    if (handle == nullptr) {
      throw LibraryError(std::string(kLibraryEnv) + "=" + explicit_path + " cannot be loaded: " + error);
    }
    return finish_load(handle, file, kLibraryEnv);
  }
  std::ostringstream tried;
  tried << "NCCL library not found. Tried: " << kLibraryEnv << " (not set); ";
  if (wheel_dirs.empty()) tried << "the nvidia-nccl-cu12/-cu13 wheel (not installed); ";
  for (const std::string& dir : wheel_dirs) {
    const std::string file = dir + "/" + kLibraryName;
    void* handle = open_library(file, &error);
    if (handle != nullptr) return finish_load(handle, file, "wheel");
    tried << "the wheel's " << file << " (" << error << "); ";
  }
  void* handle = open_library(kLibraryName, &error);
  if (handle != nullptr) return finish_load(handle, kLibraryName, "system");
  tried << "the system library path (" << error << "). " << install_hint();
  throw LibraryError(tried.str());
}

}  // namespace

std::string Version::str() const {
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
}

Version parse_version(int code) {
  if (code <= 0) throw LibraryError("invalid NCCL version code " + std::to_string(code));
  // NCCL_VERSION(X, Y, Z) changed encoding after 2.8: 2.8.4 is 2804, 2.9.6 is 20906.
  if (code < 10000) return Version{code / 1000, (code % 1000) / 100, code % 100};
  return Version{code / 10000, (code % 10000) / 100, code % 100};
}

void check_version(int code, const std::string& path) {
  const Version found = parse_version(code);
  const Version minimum = parse_version(kMinVersionCode);
  // Compare decoded versions: the two encodings do not order correctly against each other as integers.
  const auto key = [](const Version& v) { return (v.major * 1000 + v.minor) * 1000 + v.patch; };
  if (key(found) < key(minimum)) {
    throw LibraryError("NCCL " + found.str() + " at " + path + " is older than the minimum " + minimum.str() +
                       " that megalith-kernels needs. " + install_hint());
  }
}

LibraryInfo load_library(const std::string& explicit_path, const std::vector<std::string>& wheel_dirs) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_loaded) g_loaded = search(explicit_path, wheel_dirs);
  return g_loaded->info;
}

bool library_loaded() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_loaded.has_value();
}

const Api& api() {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_loaded) throw LibraryError("the NCCL library is not loaded yet (megalith.kernels.nccl loads it)");
  return g_loaded->api;
}

LibraryInfo library_info() {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_loaded) throw LibraryError("the NCCL library is not loaded yet (megalith.kernels.nccl loads it)");
  return g_loaded->info;
}

std::string describe(const char* call, abi::Result result, abi::Comm comm) {
  const Api& nccl = api();
  std::string message = std::string(call) + " failed: " + nccl.get_error_string(result);
  const char* last = nccl.get_last_error(comm);
  if (last != nullptr && last[0] != '\0') message += " (NCCL: " + std::string(last) + ")";
  return message;
}

std::string unique_id() {
  const Api& nccl = api();
  abi::UniqueId id{};
  const abi::Result result = nccl.get_unique_id(&id);
  if (result != abi::kSuccess) throw NcclError(describe("ncclGetUniqueId", result, nullptr));
  return std::string(id.internal, sizeof(id.internal));
}

const char* dtype_name(int code) {
  static const char* names[abi::kNumDataTypes] = {"int8",    "uint8",   "int32",   "uint32",  "int64",
                                                  "uint64",  "float16", "float32", "float64", "bfloat16"};
  return code >= 0 && code < abi::kNumDataTypes ? names[code] : nullptr;
}

size_t dtype_size(int code) {
  static const size_t sizes[abi::kNumDataTypes] = {1, 1, 4, 4, 8, 8, 2, 4, 8, 2};
  return code >= 0 && code < abi::kNumDataTypes ? sizes[code] : 0;
}

const char* op_name(int code) {
  static const char* names[abi::kNumRedOps] = {"sum", "prod", "max", "min", "avg"};
  return code >= 0 && code < abi::kNumRedOps ? names[code] : nullptr;
}

}  // namespace megalith::comm
