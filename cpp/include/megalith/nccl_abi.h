// The slice of NCCL's C ABI that Megalith calls, declared here so that building needs no nccl.h.
//
// libnccl.so.2 is opened with dlopen at run time, so only the layout of a few types and the signatures of the
// functions we look up matter. They are stable across NCCL 2.x: enums are int-sized, ncclUniqueId is 128
// bytes passed by value, and ncclConfig_t is versioned by its own `size` and `version` fields, so a config
// laid out as in NCCL 2.18 (the minimum we accept) is read correctly by every later release. When a CUDA
// build finds an nccl.h (system or nvidia-nccl wheel), cpp/comm/abi_check.cpp checks these declarations
// against it at compile time (see cmake/MegalithNccl.cmake).
#pragma once

#include <climits>
#include <cstddef>

namespace megalith::comm::abi {

// ncclResult_t
using Result = int;
enum ResultCode : int {
  kSuccess = 0,
  kUnhandledCudaError = 1,
  kSystemError = 2,
  kInternalError = 3,
  kInvalidArgument = 4,
  kInvalidUsage = 5,
  kRemoteError = 6,
  kInProgress = 7,
};

// ncclDataType_t values present since NCCL 2.10.
enum DataType : int {
  kInt8 = 0,
  kUint8 = 1,
  kInt32 = 2,
  kUint32 = 3,
  kInt64 = 4,
  kUint64 = 5,
  kFloat16 = 6,
  kFloat32 = 7,
  kFloat64 = 8,
  kBfloat16 = 9,
};
constexpr int kNumDataTypes = 10;

// ncclRedOp_t built-in operators.
enum RedOp : int { kSum = 0, kProd = 1, kMax = 2, kMin = 3, kAvg = 4 };
constexpr int kNumRedOps = 5;

struct OpaqueComm;
using Comm = OpaqueComm*;  // ncclComm_t
using Stream = void*;      // cudaStream_t

constexpr int kUniqueIdBytes = 128;
struct UniqueId {
  char internal[kUniqueIdBytes];
};

// NCCL_VERSION(X, Y, Z) for releases after 2.8.
constexpr int version_code(int major, int minor, int patch) { return major * 10000 + minor * 100 + patch; }

constexpr unsigned kConfigMagic = 0xcafebeef;  // NCCL_API_MAGIC
constexpr int kConfigUndefInt = INT_MIN;       // NCCL_CONFIG_UNDEF_INT

// ncclConfig_t as of NCCL 2.18: the fields after `splitShare` were added later and keep their defaults,
// because NCCL copies only `size` bytes of a caller's config.
struct Config {
  size_t size;
  unsigned int magic;
  unsigned int version;
  int blocking;
  int cgaClusterSize;
  int minCTAs;
  int maxCTAs;
  const char* netName;
  int splitShare;
};

// The equivalent of NCCL_CONFIG_INITIALIZER for the layout above.
inline Config default_config() {
  return Config{sizeof(Config),   kConfigMagic,     static_cast<unsigned>(version_code(2, 18, 0)),
                kConfigUndefInt,  kConfigUndefInt,  kConfigUndefInt,
                kConfigUndefInt,  nullptr,          kConfigUndefInt};
}

// Signatures of the functions looked up with dlsym: `XFn` is the type of `ncclX`.
using GetVersionFn = Result (*)(int* version);
using GetUniqueIdFn = Result (*)(UniqueId* id);
using CommInitRankConfigFn = Result (*)(Comm* comm, int nranks, UniqueId id, int rank, Config* config);
using CommFinalizeFn = Result (*)(Comm comm);
using CommDestroyFn = Result (*)(Comm comm);
using CommAbortFn = Result (*)(Comm comm);
using CommGetAsyncErrorFn = Result (*)(Comm comm, Result* async_error);
using GetErrorStringFn = const char* (*)(Result result);
using GetLastErrorFn = const char* (*)(Comm comm);
using AllReduceFn = Result (*)(const void* send, void* recv, size_t count, DataType dtype, RedOp op, Comm comm,
                               Stream stream);
using ReduceScatterFn = Result (*)(const void* send, void* recv, size_t recv_count, DataType dtype, RedOp op,
                                   Comm comm, Stream stream);
using AllGatherFn = Result (*)(const void* send, void* recv, size_t send_count, DataType dtype, Comm comm,
                               Stream stream);
using BroadcastFn = Result (*)(const void* send, void* recv, size_t count, DataType dtype, int root, Comm comm,
                               Stream stream);
using SendFn = Result (*)(const void* send, size_t count, DataType dtype, int peer, Comm comm, Stream stream);
using RecvFn = Result (*)(void* recv, size_t count, DataType dtype, int peer, Comm comm, Stream stream);
using GroupFn = Result (*)();
// Since NCCL 2.19; optional.
using CommRegisterFn = Result (*)(Comm comm, void* buffer, size_t size, void** handle);
using CommDeregisterFn = Result (*)(Comm comm, void* handle);
using MemAllocFn = Result (*)(void** ptr, size_t size);
using MemFreeFn = Result (*)(void* ptr);

}  // namespace megalith::comm::abi
