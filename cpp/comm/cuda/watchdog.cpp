// Failure handling of the NCCL communicator: polling NCCL's non-blocking calls, following enqueued operations
// with CUDA events, the watchdog thread that aborts on a timeout or an asynchronous error, and raising.
#include <cstdio>
#include <string>

#include "cuda_util.h"
#include "megalith/communicator.h"

namespace megalith::comm {

namespace {

// How often the watchdog looks at the operations in flight; it bounds how late past the timeout an abort
// comes, and costs one cudaEventQuery per operation in flight per look.
constexpr std::chrono::milliseconds kWatchInterval{5};

std::string seconds(double value) {
  char text[32];
  std::snprintf(text, sizeof(text), "%g", value);
  return text;
}

bool fatal(abi::Result result) {
  // Argument errors are found before NCCL touches the communicator; everything else may leave it unusable.
  return result != abi::kSuccess && result != abi::kInProgress && result != abi::kInvalidArgument &&
         result != abi::kInvalidUsage;
}

}  // namespace

void Communicator::wait_in_progress_locked(const char* what, Clock::time_point deadline) {
  const Api& nccl = api();
  detail::Backoff backoff;
  while (true) {
    abi::Result state = abi::kSuccess;
    const abi::Result queried = nccl.comm_get_async_error(comm_, &state);
    if (queried != abi::kSuccess) {
      fail_locked(describe("ncclCommGetAsyncError", queried, comm_), false);
      throw_failure_locked();
    }
    if (state == abi::kSuccess) return;
    if (state != abi::kInProgress) {
      fail_locked(describe(what, state, comm_), false);
      throw_failure_locked();
    }
    if (Clock::now() > deadline) {
      fail_locked(std::string(what) + " did not complete within " + seconds(timeout_s_) +
                      " s (every rank must make the same calls; one may have died or be stuck elsewhere)",
                  true);
      throw_failure_locked();
    }
    backoff.wait();
  }
}

void Communicator::after_call_locked(const char* what, abi::Result result) {
  if (result == abi::kInvalidArgument || result == abi::kInvalidUsage) {
    throw NcclError(where() + ": " + describe(what, result, comm_));
  }
  if (fatal(result)) {
    fail_locked(describe(what, result, comm_), false);
    throw_failure_locked();
  }
  // Non-blocking NCCL may return before the work is on the stream; it is there once the state is success.
  wait_in_progress_locked(what, Clock::now() + timeout_);
}

void Communicator::follow_locked(const std::string& what, uintptr_t stream) {
  auto* cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(cuda_stream, &status) != cudaSuccess) {
    cudaGetLastError();  // e.g. the legacy stream while another stream captures: not followed, not an error
    return;
  }
  if (status != cudaStreamCaptureStatusNone) return;  // runs at replay; watch() follows a replay
  cudaEvent_t event = nullptr;
  if (free_events_.empty()) {
    detail::check_cuda(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  } else {
    event = static_cast<cudaEvent_t>(free_events_.back());
    free_events_.pop_back();
  }
  const cudaError_t recorded = cudaEventRecord(event, cuda_stream);
  if (recorded != cudaSuccess) {
    free_events_.push_back(event);
    detail::throw_cuda(recorded, "cudaEventRecord after " + what);
  }
  const bool was_idle = pending_.empty();
  pending_.push_back(Pending{event, Clock::now() + timeout_, what});
  if (was_idle) cv_.notify_all();
}

void Communicator::poll_pending_locked() {
  for (auto it = pending_.begin(); it != pending_.end();) {
    const cudaError_t status = cudaEventQuery(static_cast<cudaEvent_t>(it->event));
    if (status == cudaSuccess) {
      free_events_.push_back(it->event);
      it = pending_.erase(it);
      continue;
    }
    if (status != cudaErrorNotReady) {
      cudaGetLastError();
      fail_locked("CUDA reported '" + std::string(cudaGetErrorString(status)) + "' while " + it->what +
                      " was in flight",
                  false);
      return;
    }
    ++it;
  }
  if (pending_.empty() || comm_ == nullptr) return;
  abi::Result state = abi::kSuccess;
  if (api().comm_get_async_error(comm_, &state) == abi::kSuccess && fatal(state)) {
    fail_locked(describe("an operation in flight", state, comm_), false);
    return;
  }
  const Pending& oldest = pending_.front();  // the same timeout for all, so the first enqueued is due first
  if (Clock::now() > oldest.deadline) {
    fail_locked(oldest.what + " did not complete within " + seconds(timeout_s_) +
                    " s of being enqueued (a rank may have died, or the ranks did not call the same operations)",
                true);
  }
}

void Communicator::fail_locked(const std::string& reason, bool timeout) {
  if (!failure_.empty()) return;
  failure_ = reason;
  failure_is_timeout_ = timeout;
  if (open_group_ops_ > 0) {
    abort_deferred_ = true;  // NCCL still refers to comm_ from the open group; group_end aborts
    return;
  }
  abort_locked();
}

void Communicator::abort_locked() {
  if (comm_ != nullptr) {
    api().comm_abort(comm_);  // also makes NCCL kernels still running on the GPU return
    comm_ = nullptr;
  }
  for (const Pending& p : pending_) free_events_.push_back(p.event);
  pending_.clear();
  cv_.notify_all();
}

void Communicator::throw_failure_locked() const {
  const std::string message = where() + " was aborted: " + failure_;
  if (failure_is_timeout_) throw NcclTimeout(message);
  throw NcclError(message);
}

void Communicator::throw_if_unusable_locked() {
  if (!failure_.empty()) throw_failure_locked();
  if (closed_ || comm_ == nullptr) throw NcclError(where() + " is closed");
  abi::Result state = abi::kSuccess;
  if (api().comm_get_async_error(comm_, &state) == abi::kSuccess && fatal(state)) {
    fail_locked(describe("an earlier operation", state, comm_), false);
    throw_failure_locked();
  }
}

void Communicator::finish_group(abi::Result group_result, const std::vector<uintptr_t>& streams) {
  detail::DeviceGuard guard(device_);
  std::unique_lock<std::mutex> lock(mu_);
  open_group_ops_ = 0;
  if (abort_deferred_) {
    abort_deferred_ = false;
    abort_locked();
  }
  if (!failure_.empty()) throw_failure_locked();
  if (comm_ == nullptr) throw NcclError(where() + " is closed");
  if (fatal(group_result)) {
    fail_locked(describe("ncclGroupEnd", group_result, comm_), false);
    throw_failure_locked();
  }
  if (group_result == abi::kInvalidArgument || group_result == abi::kInvalidUsage) {
    throw NcclError(where() + ": " + describe("ncclGroupEnd", group_result, comm_));
  }
  wait_in_progress_locked("grouped operations", Clock::now() + timeout_);
  for (uintptr_t stream : streams) follow_locked("grouped operations", stream);
}

void Communicator::watch(uintptr_t stream) {
  detail::DeviceGuard guard(device_);
  std::lock_guard<std::mutex> lock(mu_);
  throw_if_unusable_locked();
  follow_locked("work watched on a stream", stream);
}

void Communicator::synchronize() {
  std::unique_lock<std::mutex> lock(mu_);
  detail::Backoff backoff;
  while (true) {
    throw_if_unusable_locked();
    poll_pending_locked();
    if (!failure_.empty()) throw_failure_locked();
    if (pending_.empty()) return;
    lock.unlock();
    backoff.wait();
    lock.lock();
  }
}

void Communicator::check() {
  std::lock_guard<std::mutex> lock(mu_);
  throw_if_unusable_locked();
  poll_pending_locked();
  if (!failure_.empty()) throw_failure_locked();
}

void Communicator::abort(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_) return;
  fail_locked("aborted by the caller: " + reason, false);
}

void Communicator::watchdog_main() {
  // Event queries here must not invalidate a CUDA graph another thread is capturing in global mode.
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  cudaThreadExchangeStreamCaptureMode(&mode);
  if (cudaSetDevice(device_) != cudaSuccess) cudaGetLastError();
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    if (pending_.empty() || !failure_.empty() || comm_ == nullptr) {
      cv_.wait(lock);
      continue;
    }
    poll_pending_locked();
    cv_.wait_for(lock, kWatchInterval);
  }
}

void Communicator::stop_watchdog() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (watchdog_.joinable() && watchdog_.get_id() != std::this_thread::get_id()) watchdog_.join();
}

void Communicator::release_events() {
  for (const Pending& p : pending_) free_events_.push_back(p.event);
  pending_.clear();
  for (void* event : free_events_) cudaEventDestroy(static_cast<cudaEvent_t>(event));
  free_events_.clear();
  cudaGetLastError();
}

}  // namespace megalith::comm
