// Torch-free access to libnccl loaded at run time: search order, version check, errors and unique ids.
//
// Nothing here needs CUDA or a GPU, so it is built into every variant of the module; the communicator that
// runs operations (megalith/communicator.h) is built only with CUDA.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

#include "megalith/nccl_abi.h"

namespace megalith::comm {

// The oldest NCCL accepted: non-blocking ncclCommInitRankConfig, ncclCommFinalize, ncclGetLastError, bf16
// and ncclAvg are all present from here on. Registration (ncclCommRegister, ncclMemAlloc) needs 2.19.
constexpr int kMinVersionCode = abi::version_code(2, 18, 1);
constexpr const char* kLibraryName = "libnccl.so.2";
constexpr const char* kLibraryEnv = "MEGALITH_NCCL_LIBRARY";

// libnccl could not be found, opened, or is too old (Python: NcclLibraryError, a RuntimeError).
class LibraryError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An NCCL call failed; the message carries ncclGetErrorString and ncclGetLastError (Python: NcclError).
class NcclError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An operation did not complete within the communicator's timeout (Python: NcclTimeoutError, also a
// TimeoutError). The communicator has been aborted when this is thrown.
class NcclTimeout : public NcclError {
 public:
  using NcclError::NcclError;
};

struct Version {
  int major = 0, minor = 0, patch = 0;
  std::string str() const;
};

// Decodes ncclGetVersion's integer (X*1000+Y*100+Z up to 2.8, X*10000+Y*100+Z after).
Version parse_version(int code);

// Throws LibraryError naming `path`, the version found and the minimum when `code` is below kMinVersionCode.
void check_version(int code, const std::string& path);

// The functions resolved from the loaded library; the optional ones are null on NCCL < 2.19.
struct Api {
  abi::GetVersionFn get_version = nullptr;
  abi::GetUniqueIdFn get_unique_id = nullptr;
  abi::CommInitRankConfigFn comm_init_rank_config = nullptr;
  abi::CommFinalizeFn comm_finalize = nullptr;
  abi::CommDestroyFn comm_destroy = nullptr;
  abi::CommAbortFn comm_abort = nullptr;
  abi::CommGetAsyncErrorFn comm_get_async_error = nullptr;
  abi::GetErrorStringFn get_error_string = nullptr;
  abi::GetLastErrorFn get_last_error = nullptr;
  abi::AllReduceFn all_reduce = nullptr;
  abi::ReduceScatterFn reduce_scatter = nullptr;
  abi::AllGatherFn all_gather = nullptr;
  abi::BroadcastFn broadcast = nullptr;
  abi::SendFn send = nullptr;
  abi::RecvFn recv = nullptr;
  abi::GroupFn group_start = nullptr;
  abi::GroupFn group_end = nullptr;
  abi::CommRegisterFn comm_register = nullptr;
  abi::CommDeregisterFn comm_deregister = nullptr;
  abi::MemAllocFn mem_alloc = nullptr;
  abi::MemFreeFn mem_free = nullptr;
};

struct LibraryInfo {
  std::string path;    // the file the dynamic loader actually opened
  std::string source;  // "MEGALITH_NCCL_LIBRARY", "wheel" or "system"
  int version_code = 0;
  bool registration = false;  // ncclCommRegister/ncclMemAlloc present
};

// Loads libnccl once per process, searching in this order:
//   1. `explicit_path` (the value of MEGALITH_NCCL_LIBRARY; a file or a directory holding libnccl.so.2) when
//      non-empty; if it cannot be loaded that is an error, the other places are not tried;
//   2. each of `wheel_dirs` (the nvidia-nccl-cu12/-cu13 wheels' lib directories, found by the Python side);
//   3. the system library path (dlopen("libnccl.so.2"): LD_LIBRARY_PATH, the ld.so cache, /usr/lib...).
// Later calls return the library already loaded, whatever their arguments. Throws LibraryError saying
// what was tried and how to install NCCL.
LibraryInfo load_library(const std::string& explicit_path, const std::vector<std::string>& wheel_dirs);

// Whether load_library has succeeded in this process.
bool library_loaded();
// The loaded library's functions; throws LibraryError when load_library has not succeeded yet.
const Api& api();
LibraryInfo library_info();

// A message for a failed NCCL call: "<call> failed: <ncclGetErrorString> (NCCL: <ncclGetLastError>)".
std::string describe(const char* call, abi::Result result, abi::Comm comm);

// ncclGetUniqueId as 128 raw bytes.
std::string unique_id();

// Name of a supported NCCL dtype code (int8 ... bfloat16), or nullptr for any other code.
const char* dtype_name(int code);
// Bytes per element of a supported dtype code.
size_t dtype_size(int code);
// Name of a supported reduction code (sum, prod, max, min, avg), or nullptr.
const char* op_name(int code);

}  // namespace megalith::comm
