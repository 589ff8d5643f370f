// CUDA helpers of the communicator: errors that throw (never exit), a current-device guard, a poll backoff.
#pragma once

#include <cuda_runtime.h>

#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>

namespace megalith::comm::detail {

// Throws std::runtime_error (a Python RuntimeError) naming the failed call. The runtime is linked statically
// into the module with the kernels, which check launches with cudaGetLastError, so the error is cleared here.
[[noreturn]] inline void throw_cuda(cudaError_t status, const std::string& what) {
  cudaGetLastError();
  throw std::runtime_error(what + " failed: " + cudaGetErrorString(status));
}

inline void check_cuda(cudaError_t status, const std::string& what) {
  if (status != cudaSuccess) throw_cuda(status, what);
}

// Makes `device` current for the scope (NCCL and our events need it) and restores the caller's device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) {
      check_cuda(cudaSetDevice(device), "cudaSetDevice(" + std::to_string(device) + ")");
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

// Polling schedule for NCCL's non-blocking calls: an enqueue usually finishes within microseconds, so yield
// first, then sleep so that a long wait (a slow peer) does not burn a core.
class Backoff {
 public:
  void wait() {
    if (++polls_ < 2000) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }

 private:
  int polls_ = 0;
};

}  // namespace megalith::comm::detail
