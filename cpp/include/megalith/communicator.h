// A torch-free NCCL communicator over raw device pointers and CUDA streams, with a completion watchdog.
//
// Built only with CUDA (cpp/comm/cuda/). Pointers, streams and handles cross as uintptr_t; element counts as
// int64_t so that a negative count from Python gets an error naming it. Every operation is enqueued on the
// given stream and returns without waiting for it; a watchdog thread follows each enqueued operation with a
// CUDA event and, when one has not completed `timeout` seconds after it was enqueued (or NCCL reports an
// asynchronous error), aborts the communicator. The next call on it, or synchronize(), then raises.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "megalith/comm.h"

namespace megalith::comm {

class Communicator : public std::enable_shared_from_this<Communicator> {
 public:
  // Joins the communicator identified by `unique_id` (128 bytes from ncclGetUniqueId, the same on every
  // rank) as `rank` of `size` on CUDA device `device`. Creation is non-blocking: it raises NcclTimeout when
  // the other ranks have not all joined within `timeout_s` seconds.
  Communicator(const std::string& unique_id, int rank, int size, int device, double timeout_s);
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int device() const { return device_; }
  double timeout() const { return timeout_s_; }

  // recv[i] = op over ranks of send[i]; send == recv is in place.
  void all_reduce(uintptr_t send, uintptr_t recv, int64_t count, int dtype, int op, uintptr_t stream);
  // recv (recv_count elements) = this rank's block of op over ranks of send (size * recv_count elements).
  void reduce_scatter(uintptr_t send, uintptr_t recv, int64_t recv_count, int dtype, int op, uintptr_t stream);
  // recv (size * send_count elements) = every rank's send, in rank order.
  void all_gather(uintptr_t send, uintptr_t recv, int64_t send_count, int dtype, uintptr_t stream);
  // recv = root's send on every rank (send is read on the root only).
  void broadcast(uintptr_t send, uintptr_t recv, int64_t count, int dtype, int root, uintptr_t stream);
  void send(uintptr_t buffer, int64_t count, int dtype, int peer, uintptr_t stream);
  void recv(uintptr_t buffer, int64_t count, int dtype, int peer, uintptr_t stream);

  // ncclCommRegister / ncclCommDeregister (NCCL >= 2.19); a null handle (registration off) deregisters nothing.
  uintptr_t register_buffer(uintptr_t buffer, int64_t nbytes);
  void deregister_buffer(uintptr_t handle);

  // Records a point on `stream` that the watchdog follows like an operation: call it after replaying a CUDA
  // graph that holds this communicator's operations (captured operations are not followed on their own).
  void watch(uintptr_t stream);
  // Waits until every followed operation has completed; raises if one fails or times out.
  void synchronize();
  // Raises if the communicator has failed (watchdog abort, asynchronous NCCL error) or is closed.
  void check();
  // Aborts now (ncclCommAbort); later calls raise NcclError with `reason`.
  void abort(const std::string& reason);
  // Waits for followed operations, then ncclCommFinalize + ncclCommDestroy (aborting instead on a timeout or
  // error, which is raised). A failed or already closed communicator closes quietly.
  void close();
  bool closed() const;
  // Why the communicator failed; empty while it is healthy.
  std::string failure() const;

 private:
  using Clock = std::chrono::steady_clock;
  struct Pending {
    void* event;  // cudaEvent_t
    Clock::time_point deadline;
    std::string what;
  };

  friend void group_end();
  template <typename Call>
  void enqueue(const char* what, uintptr_t stream, Call&& call);
  void check_rank(int value, const char* name) const;
  void wait_in_progress_locked(const char* what, Clock::time_point deadline);
  void after_call_locked(const char* what, abi::Result result);
  void follow_locked(const std::string& what, uintptr_t stream);
  void poll_pending_locked();
  void fail_locked(const std::string& reason, bool timeout);
  void abort_locked();
  [[noreturn]] void throw_failure_locked() const;
  void throw_if_unusable_locked();
  void finish_group(abi::Result group_result, const std::vector<uintptr_t>& streams);
  void watchdog_main();
  void stop_watchdog();
  void release_events();
  std::string where() const;

  const int rank_, size_, device_;
  const double timeout_s_;
  const Clock::duration timeout_;

  mutable std::mutex mu_;  // guards everything below; held during every NCCL call on comm_
  std::condition_variable cv_;
  abi::Comm comm_ = nullptr;  // null once destroyed or aborted
  std::deque<Pending> pending_;
  std::vector<void*> free_events_;
  std::string failure_;
  bool failure_is_timeout_ = false;
  bool closed_ = false;
  int open_group_ops_ = 0;  // operations queued in a group that has not ended: NCCL still refers to comm_
  bool abort_deferred_ = false;
  bool stop_ = false;
  std::thread watchdog_;
};

// ncclGroupStart / ncclGroupEnd for batching operations (send/recv pairs above all) of any communicators on
// this thread. Groups nest; NCCL launches at the outermost group_end.
void group_start();
void group_end();

// ncclMemAlloc / ncclMemFree on `device` (NCCL >= 2.19): memory NCCL can register with every transport.
uintptr_t mem_alloc(int64_t nbytes, int device);
void mem_free(uintptr_t ptr, int device);

}  // namespace megalith::comm
