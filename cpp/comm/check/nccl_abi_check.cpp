// Compile-time check of megalith/nccl_abi.h against a real nccl.h; it generates no code. CMake builds it when
// it finds an nccl.h (see cmake/MegalithNccl.cmake), so a drift in our declarations fails the build.
#include <nccl.h>

#include <cstddef>

#include "megalith/nccl_abi.h"

namespace abi = megalith::comm::abi;

namespace {

// Same arity and the same size for the result and every parameter: enough for a C call to agree, since our
// declarations differ from nccl.h only in naming enum and handle types.
template <typename R1, typename... A1, typename R2, typename... A2>
constexpr bool same_shape(R1 (*)(A1...), R2 (*)(A2...)) {
  if constexpr (sizeof...(A1) != sizeof...(A2)) {
    return false;
  } else {
    return sizeof(R1) == sizeof(R2) && ((sizeof(A1) == sizeof(A2)) && ...);
  }
}

#define MEGALITH_SAME_SHAPE(name, type) \
  static_assert(same_shape(&name, static_cast<abi::type>(nullptr)), #name " does not match abi::" #type)

MEGALITH_SAME_SHAPE(ncclGetVersion, GetVersionFn);
MEGALITH_SAME_SHAPE(ncclGetUniqueId, GetUniqueIdFn);
MEGALITH_SAME_SHAPE(ncclCommInitRankConfig, CommInitRankConfigFn);
MEGALITH_SAME_SHAPE(ncclCommFinalize, CommFinalizeFn);
MEGALITH_SAME_SHAPE(ncclCommDestroy, CommDestroyFn);
MEGALITH_SAME_SHAPE(ncclCommAbort, CommAbortFn);
MEGALITH_SAME_SHAPE(ncclCommGetAsyncError, CommGetAsyncErrorFn);
MEGALITH_SAME_SHAPE(ncclGetErrorString, GetErrorStringFn);
MEGALITH_SAME_SHAPE(ncclGetLastError, GetLastErrorFn);
MEGALITH_SAME_SHAPE(ncclAllReduce, AllReduceFn);
MEGALITH_SAME_SHAPE(ncclReduceScatter, ReduceScatterFn);
MEGALITH_SAME_SHAPE(ncclAllGather, AllGatherFn);
MEGALITH_SAME_SHAPE(ncclBroadcast, BroadcastFn);
MEGALITH_SAME_SHAPE(ncclSend, SendFn);
MEGALITH_SAME_SHAPE(ncclRecv, RecvFn);
MEGALITH_SAME_SHAPE(ncclGroupStart, GroupFn);
MEGALITH_SAME_SHAPE(ncclGroupEnd, GroupFn);
MEGALITH_SAME_SHAPE(ncclCommRegister, CommRegisterFn);
MEGALITH_SAME_SHAPE(ncclCommDeregister, CommDeregisterFn);
MEGALITH_SAME_SHAPE(ncclMemAlloc, MemAllocFn);
MEGALITH_SAME_SHAPE(ncclMemFree, MemFreeFn);

static_assert(sizeof(ncclUniqueId) == sizeof(abi::UniqueId) && NCCL_UNIQUE_ID_BYTES == abi::kUniqueIdBytes);
static_assert(sizeof(ncclResult_t) == sizeof(abi::Result) && sizeof(ncclDataType_t) == sizeof(abi::DataType) &&
              sizeof(ncclRedOp_t) == sizeof(abi::RedOp));

#define MEGALITH_SAME_VALUE(theirs, ours) \
  static_assert(static_cast<long long>(theirs) == static_cast<long long>(ours), #theirs " != " #ours)

MEGALITH_SAME_VALUE(ncclSuccess, abi::kSuccess);
MEGALITH_SAME_VALUE(ncclUnhandledCudaError, abi::kUnhandledCudaError);
MEGALITH_SAME_VALUE(ncclSystemError, abi::kSystemError);
MEGALITH_SAME_VALUE(ncclInternalError, abi::kInternalError);
MEGALITH_SAME_VALUE(ncclInvalidArgument, abi::kInvalidArgument);
MEGALITH_SAME_VALUE(ncclInvalidUsage, abi::kInvalidUsage);
MEGALITH_SAME_VALUE(ncclRemoteError, abi::kRemoteError);
MEGALITH_SAME_VALUE(ncclInProgress, abi::kInProgress);
MEGALITH_SAME_VALUE(ncclInt8, abi::kInt8);
MEGALITH_SAME_VALUE(ncclUint8, abi::kUint8);
MEGALITH_SAME_VALUE(ncclInt32, abi::kInt32);
MEGALITH_SAME_VALUE(ncclUint32, abi::kUint32);
MEGALITH_SAME_VALUE(ncclInt64, abi::kInt64);
MEGALITH_SAME_VALUE(ncclUint64, abi::kUint64);
MEGALITH_SAME_VALUE(ncclFloat16, abi::kFloat16);
MEGALITH_SAME_VALUE(ncclFloat32, abi::kFloat32);
MEGALITH_SAME_VALUE(ncclFloat64, abi::kFloat64);
MEGALITH_SAME_VALUE(ncclBfloat16, abi::kBfloat16);
MEGALITH_SAME_VALUE(ncclSum, abi::kSum);
MEGALITH_SAME_VALUE(ncclProd, abi::kProd);
MEGALITH_SAME_VALUE(ncclMax, abi::kMax);
MEGALITH_SAME_VALUE(ncclMin, abi::kMin);
MEGALITH_SAME_VALUE(ncclAvg, abi::kAvg);
MEGALITH_SAME_VALUE(ncclNumOps, abi::kNumRedOps);
// The magic as NCCL_CONFIG_INITIALIZER writes it: newer headers name it NCCL_API_MAGIC, older ones (2.28 and
// before, as torch 2.11's nvidia-nccl-cu13 ships) spell the literal inside the initializer.
constexpr ncclConfig_t kTheirDefaults = NCCL_CONFIG_INITIALIZER;
MEGALITH_SAME_VALUE(kTheirDefaults.magic, abi::kConfigMagic);
MEGALITH_SAME_VALUE(NCCL_CONFIG_UNDEF_INT, abi::kConfigUndefInt);
MEGALITH_SAME_VALUE(NCCL_VERSION(2, 18, 1), abi::version_code(2, 18, 1));
static_assert(sizeof(abi::Config) <= sizeof(ncclConfig_t));

#define MEGALITH_SAME_FIELD(field)                                                                              \
  static_assert(offsetof(ncclConfig_t, field) == offsetof(abi::Config, field) &&                             \
                    sizeof(ncclConfig_t::field) == sizeof(abi::Config::field),                               \
                "ncclConfig_t::" #field " is not where abi::Config has it")

MEGALITH_SAME_FIELD(size);
MEGALITH_SAME_FIELD(magic);
MEGALITH_SAME_FIELD(version);
MEGALITH_SAME_FIELD(blocking);
MEGALITH_SAME_FIELD(cgaClusterSize);
MEGALITH_SAME_FIELD(minCTAs);
MEGALITH_SAME_FIELD(maxCTAs);
MEGALITH_SAME_FIELD(netName);
MEGALITH_SAME_FIELD(splitShare);

}  // namespace
