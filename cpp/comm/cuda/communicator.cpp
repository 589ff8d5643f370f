// The NCCL communicator: creation, operations on raw device pointers, groups, registration and shutdown.
#include "megalith/communicator.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <utility>

#include "cuda_util.h"
#include "megalith/error.h"

namespace megalith::comm {

using detail::DeviceGuard;

namespace {

// NCCL groups are per thread and span communicators, so the operations queued in the open group of this
// thread are remembered here until the outermost group_end; the shared_ptr keeps each communicator alive
// while NCCL still holds work for it.
thread_local int t_group_depth = 0;
thread_local std::vector<std::pair<std::shared_ptr<Communicator>, uintptr_t>> t_group_ops;

void check_count(int64_t count, const char* name) {
  if (count < 0) fail(name, " must be >= 0, got ", count);
}

void check_pointer(uintptr_t ptr, int64_t count, const char* name) {
  if (count > 0 && ptr == 0) fail(name, " is a null pointer");
}

void check_dtype(int dtype) {
  if (dtype_name(dtype) == nullptr) {
    fail("dtype code ", dtype, " is not an NCCL type (0-9: int8, uint8, int32, uint32, int64, uint64, float16, ",
         "float32, float64, bfloat16)");
  }
}

void check_op(int op) {
  if (op_name(op) == nullptr) fail("op code ", op, " is not an NCCL reduction (0-4: sum, prod, max, min, avg)");
}

std::chrono::steady_clock::duration to_duration(double seconds) {
  return std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(seconds));
}

void* as_ptr(uintptr_t value) { return reinterpret_cast<void*>(value); }
abi::Stream as_stream(uintptr_t value) { return reinterpret_cast<abi::Stream>(value); }
abi::DataType as_dtype(int code) { return static_cast<abi::DataType>(code); }
abi::RedOp as_op(int code) { return static_cast<abi::RedOp>(code); }

}  // namespace

Communicator::Communicator(const std::string& unique_id, int rank, int size, int device, double timeout_s)
    : rank_(rank),
      size_(size),
      device_(device),
      timeout_s_(timeout_s),
      timeout_(to_duration(std::isfinite(timeout_s) && timeout_s > 0 && timeout_s < 1e9 ? timeout_s : 1.0)) {
  if (unique_id.size() != abi::kUniqueIdBytes) {
    fail("unique_id must be the ", abi::kUniqueIdBytes, " bytes of nccl.unique_id(), got ", unique_id.size(),
         " bytes");
  }
  if (size < 1) fail("size must be >= 1, got ", size);
  if (rank < 0 || rank >= size) fail("rank must be in [0, ", size, "), got ", rank);
  if (!(std::isfinite(timeout_s) && timeout_s > 0 && timeout_s < 1e9)) {
    fail("timeout must be a positive number of seconds, got ", timeout_s);
  }
  const Api& nccl = api();
  int count = 0;
  const cudaError_t counted = cudaGetDeviceCount(&count);
  if (counted != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(where() + " needs a CUDA GPU, but cudaGetDeviceCount failed: " +
                             cudaGetErrorString(counted));
  }
  if (device < 0 || device >= count) fail("device must be in [0, ", count, ") on this machine, got ", device);
  DeviceGuard guard(device_);

  abi::UniqueId id{};
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  abi::Config config = abi::default_config();
  config.blocking = 0;  // so that a rank that never joins is a timeout here, not a hang
  std::unique_lock<std::mutex> lock(mu_);
  const abi::Result result = nccl.comm_init_rank_config(&comm_, size_, id, rank_, &config);
  if (result != abi::kSuccess && result != abi::kInProgress) {
    const std::string message = describe("ncclCommInitRankConfig", result, comm_);
    if (comm_ != nullptr) nccl.comm_abort(comm_);
    comm_ = nullptr;
    throw NcclError(where() + ": " + message);
  }
  wait_in_progress_locked("communicator creation", Clock::now() + timeout_);
  try {
    watchdog_ = std::thread(&Communicator::watchdog_main, this);
  } catch (...) {
    abort_locked();  // no destructor runs for an object whose constructor throws
    throw;
  }
}

Communicator::~Communicator() {
  try {
    close();
  } catch (...) {  // NOLINT(bugprone-empty-catch): a destructor cannot raise; close() aborted on failure
  }
  stop_watchdog();
  std::lock_guard<std::mutex> lock(mu_);
  // NCCL may still hold queued group work for comm_ only if a thread died inside a group; leave it then.
  if (comm_ != nullptr && open_group_ops_ == 0) {
    try {
      api().comm_abort(comm_);
    } catch (...) {  // NOLINT(bugprone-empty-catch): the library is loaded whenever comm_ is set
    }
  }
  comm_ = nullptr;
  release_events();
}

std::string Communicator::where() const {
  return "NCCL communicator (rank " + std::to_string(rank_) + " of " + std::to_string(size_) + ", cuda:" +
         std::to_string(device_) + ")";
}

void Communicator::check_rank(int value, const char* name) const {
  if (value < 0 || value >= size_) fail(name, " must be a rank in [0, ", size_, "), got ", value);
}

template <typename Call>
void Communicator::enqueue(const char* what, uintptr_t stream, Call&& call) {
  DeviceGuard guard(device_);
  std::unique_lock<std::mutex> lock(mu_);
  throw_if_unusable_locked();
  after_call_locked(what, call(comm_));
  if (t_group_depth > 0) {
    ++open_group_ops_;
    t_group_ops.emplace_back(shared_from_this(), stream);
    return;
  }
  follow_locked(what, stream);
}

void Communicator::all_reduce(uintptr_t send, uintptr_t recv, int64_t count, int dtype, int op, uintptr_t stream) {
  check_count(count, "count"), check_dtype(dtype), check_op(op);
  check_pointer(send, count, "send"), check_pointer(recv, count, "recv");
  enqueue("all_reduce", stream, [&](abi::Comm comm) {
    return api().all_reduce(as_ptr(send), as_ptr(recv), count, as_dtype(dtype), as_op(op), comm, as_stream(stream));
  });
}

void Communicator::reduce_scatter(uintptr_t send, uintptr_t recv, int64_t recv_count, int dtype, int op,
                                  uintptr_t stream) {
  check_count(recv_count, "recv_count"), check_dtype(dtype), check_op(op);
  check_pointer(send, recv_count, "send"), check_pointer(recv, recv_count, "recv");
  enqueue("reduce_scatter", stream, [&](abi::Comm comm) {
    return api().reduce_scatter(as_ptr(send), as_ptr(recv), recv_count, as_dtype(dtype), as_op(op), comm,
                                as_stream(stream));
  });
}

void Communicator::all_gather(uintptr_t send, uintptr_t recv, int64_t send_count, int dtype, uintptr_t stream) {
  check_count(send_count, "send_count"), check_dtype(dtype);
  check_pointer(send, send_count, "send"), check_pointer(recv, send_count, "recv");
  enqueue("all_gather", stream, [&](abi::Comm comm) {
    return api().all_gather(as_ptr(send), as_ptr(recv), send_count, as_dtype(dtype), comm, as_stream(stream));
  });
}

void Communicator::broadcast(uintptr_t send, uintptr_t recv, int64_t count, int dtype, int root, uintptr_t stream) {
  check_count(count, "count"), check_dtype(dtype), check_rank(root, "root");
  if (rank_ == root) check_pointer(send, count, "send");
  check_pointer(recv, count, "recv");
  enqueue("broadcast", stream, [&](abi::Comm comm) {
    return api().broadcast(as_ptr(send), as_ptr(recv), count, as_dtype(dtype), root, comm, as_stream(stream));
  });
}

void Communicator::send(uintptr_t buffer, int64_t count, int dtype, int peer, uintptr_t stream) {
  check_count(count, "count"), check_dtype(dtype), check_rank(peer, "peer"), check_pointer(buffer, count, "buffer");
  enqueue("send", stream, [&](abi::Comm comm) {
    return api().send(as_ptr(buffer), count, as_dtype(dtype), peer, comm, as_stream(stream));
  });
}

void Communicator::recv(uintptr_t buffer, int64_t count, int dtype, int peer, uintptr_t stream) {
  check_count(count, "count"), check_dtype(dtype), check_rank(peer, "peer"), check_pointer(buffer, count, "buffer");
  enqueue("recv", stream, [&](abi::Comm comm) {
    return api().recv(as_ptr(buffer), count, as_dtype(dtype), peer, comm, as_stream(stream));
  });
}

uintptr_t Communicator::register_buffer(uintptr_t buffer, int64_t nbytes) {
  const Api& nccl = api();
  if (nccl.comm_register == nullptr || nccl.comm_deregister == nullptr) {
    throw NcclError("buffer registration needs NCCL >= 2.19 (ncclCommRegister); the loaded NCCL is " +
                    parse_version(library_info().version_code).str());
  }
  if (nbytes <= 0) fail("nbytes must be > 0, got ", nbytes);
  if (buffer == 0) fail("buffer is a null pointer");
  DeviceGuard guard(device_);
  std::unique_lock<std::mutex> lock(mu_);
  throw_if_unusable_locked();
  void* handle = nullptr;
  after_call_locked("ncclCommRegister", nccl.comm_register(comm_, as_ptr(buffer), nbytes, &handle));
  return reinterpret_cast<uintptr_t>(handle);
}

void Communicator::deregister_buffer(uintptr_t handle) {
  const Api& nccl = api();
  if (nccl.comm_deregister == nullptr) throw NcclError("buffer registration needs NCCL >= 2.19");
  if (handle == 0) return;  // NCCL hands out null handles when local registration is off (NCCL_LOCAL_REGISTER=0)
  DeviceGuard guard(device_);
  std::unique_lock<std::mutex> lock(mu_);
  throw_if_unusable_locked();
  after_call_locked("ncclCommDeregister", nccl.comm_deregister(comm_, as_ptr(handle)));
}

void Communicator::close() {
  std::unique_lock<std::mutex> lock(mu_);
  if (closed_) return;
  if (open_group_ops_ > 0) fail("close() was called inside a group holding operations of this communicator");
  const bool failed_before = !failure_.empty();
  detail::Backoff backoff;
  while (failure_.empty() && comm_ != nullptr) {  // let followed operations finish first
    poll_pending_locked();
    if (pending_.empty()) break;
    lock.unlock();
    backoff.wait();
    lock.lock();
  }
  lock.unlock();
  stop_watchdog();
  lock.lock();
  closed_ = true;
  if (!failure_.empty() || comm_ == nullptr) {
    release_events();
    if (!failed_before && !failure_.empty()) throw_failure_locked();
    return;
  }
  DeviceGuard guard(device_);
  const Api& nccl = api();
  const abi::Result finalized = nccl.comm_finalize(comm_);
  if (finalized != abi::kSuccess && finalized != abi::kInProgress) {
    fail_locked(describe("ncclCommFinalize", finalized, comm_), false);
    throw_failure_locked();
  }
  wait_in_progress_locked("ncclCommFinalize", Clock::now() + timeout_);
  const abi::Result destroyed = nccl.comm_destroy(comm_);
  comm_ = nullptr;
  release_events();
  if (destroyed != abi::kSuccess && destroyed != abi::kInProgress) {
    throw NcclError(where() + ": " + describe("ncclCommDestroy", destroyed, nullptr));
  }
}

bool Communicator::closed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return closed_;
}

std::string Communicator::failure() const {
  std::lock_guard<std::mutex> lock(mu_);
  return failure_;
}

void group_start() {
  const abi::Result result = api().group_start();
  if (result != abi::kSuccess) throw NcclError(describe("ncclGroupStart", result, nullptr));
  ++t_group_depth;
}

void group_end() {
  if (t_group_depth == 0) fail("group_end() was called without a matching group_start()");
  const abi::Result result = api().group_end();
  --t_group_depth;
  const bool failed = result != abi::kSuccess && result != abi::kInProgress;
  if (t_group_depth > 0) {  // an inner end only closes the nesting level; NCCL launches at the outermost one
    if (failed) throw NcclError(describe("ncclGroupEnd", result, nullptr));
    return;
  }
  auto ops = std::move(t_group_ops);
  t_group_ops.clear();
  std::vector<std::pair<std::shared_ptr<Communicator>, std::vector<uintptr_t>>> members;
  for (auto& [comm, stream] : ops) {
    auto it = members.begin();
    while (it != members.end() && it->first != comm) ++it;
    if (it == members.end()) it = members.insert(members.end(), {comm, {}});
    if (std::find(it->second.begin(), it->second.end(), stream) == it->second.end()) it->second.push_back(stream);
  }
  std::exception_ptr first_error;
  for (auto& [comm, streams] : members) {
    try {
      comm->finish_group(result, streams);
    } catch (...) {
      if (!first_error) first_error = std::current_exception();
    }
  }
  if (first_error) std::rethrow_exception(first_error);
  if (members.empty() && failed) throw NcclError(describe("ncclGroupEnd", result, nullptr));
}

uintptr_t mem_alloc(int64_t nbytes, int device) {
  const Api& nccl = api();
  if (nccl.mem_alloc == nullptr) throw NcclError("ncclMemAlloc needs NCCL >= 2.19");
  if (nbytes <= 0) fail("nbytes must be > 0, got ", nbytes);
  DeviceGuard guard(device);
  void* ptr = nullptr;
  const abi::Result result = nccl.mem_alloc(&ptr, static_cast<size_t>(nbytes));
  if (result != abi::kSuccess) throw NcclError(describe("ncclMemAlloc", result, nullptr));
  return reinterpret_cast<uintptr_t>(ptr);
}

void mem_free(uintptr_t ptr, int device) {
  const Api& nccl = api();
  if (nccl.mem_free == nullptr) throw NcclError("ncclMemFree needs NCCL >= 2.19");
  if (ptr == 0) fail("ptr is a null pointer");
  DeviceGuard guard(device);
  const abi::Result result = nccl.mem_free(as_ptr(ptr));
  if (result != abi::kSuccess) throw NcclError(describe("ncclMemFree", result, nullptr));
}

}  // namespace megalith::comm
