// Intra-host guard exchange through a shared-memory segment.
//
// Each local rank owns one cache-line slot: it writes its packed record into
// the slot's buffer for this sequence number's parity, then publishes the
// sequence number. A rank waits until every local slot has reached its
// sequence number, then ANDs the records itself (no leader on one host). Two
// buffers per slot suffice: a rank cannot start exchange k+2 before every peer
// has posted k+1, which a peer only does after it finished reading k.
//
// With several hosts, the local leader additionally exchanges the host's
// combined record with the other hosts' leaders (a Python callable over gloo)
// and publishes the verdict through the segment.
//
// Waiting spins briefly, then yields, then sleeps on a futex, with the GIL
// released after the spin: ranks oversubscribing cores must not burn the core
// a descheduled peer needs.
//
// Liveness does not use pids, which mean nothing across PID namespaces
// (containers sharing /dev/shm): each rank holds a robust, process-shared
// mutex in the segment (its "lease") from a thread of its own, and the kernel
// marks it owner-dead the moment that thread or the process exits. Peers read
// the lease word; no syscall, no heartbeat to miss.
#pragma once

#include <pthread.h>
#include <pybind11/pybind11.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "leader_rounds.h"

namespace dynamo_dist {

namespace py = pybind11;

enum class ExchangeStatus : int {
  kOk = 0,
  kTimeout = 1,  // a local peer (or the leader's verdict) did not arrive in time
  kPeerDead = 2,  // a local peer process no longer exists
  kAborted = 3,  // another local rank gave up (an error or a signal on it); culprit: which
};

struct ExchangeResult {
  ExchangeStatus status;
  uint64_t word;  // AND over ranks of the packed records (valid when kOk)
  int culprit;  // local rank that did not arrive, died or gave up, or -1
  // Nanoseconds this rank was blocked on others during the exchange, whatever the status:
  // waiting for the local peers to post, then (a host leader) the cross-host step or (the
  // other ranks of a host, with several hosts) the leader's verdict. 0 when every peer had
  // posted already. The rest of the exchange (posting, the AND) is the rank's own cost.
  uint64_t waited_ns;
};

class ShmExchange {
 public:
  // create: the local leader creates and sizes the segment; others attach.
  ShmExchange(const std::string& name, bool create, int local_rank, int local_world,
              bool hierarchical, double timeout_s, double log_interval_s);
  ~ShmExchange();
  ShmExchange(const ShmExchange&) = delete;
  ShmExchange& operator=(const ShmExchange&) = delete;

  // Remove the segment's name; the mapping lives on until every rank unmaps.
  // Called by the leader once all local ranks attached, so a crash later can
  // never leave a stale segment behind.
  void unlink();

  // Post `word` for exchange `seq` and wait for the verdict. Called with the
  // GIL held; releases it while sleeping. Raises (py::error_already_set) when
  // a signal handler run while waiting raises; the segment is aborted first.
  ExchangeResult exchange(uint64_t word, uint64_t seq);

  // Seconds the current exchange has waited so far, or -1 when none is in
  // progress. Read by the status thread (stall warnings), never on the hot path.
  double waiting_for() const;

  // Leader only: fn(word: int) -> int, the AND of all hosts' combined words.
  void set_cross_host(py::object fn) { cross_host_ = std::move(fn); }
  // Leader only: run the cross-host step natively (without the GIL) instead of
  // through set_cross_host's callable. On a failure, on_failure(status, value,
  // peer, waited_s) is called with the GIL and must raise: its exception is
  // handled as one from the callable would be. A null `rounds` (None) goes back
  // to the callable.
  void set_cross_host_native(std::shared_ptr<LeaderRounds> rounds, py::object on_failure) {
    native_ = std::move(rounds);
    on_native_failure_ = std::move(on_failure);
  }
  // Called (with the GIL) every log interval while waiting: fn(seq, waited_s).
  void set_wait_logger(py::object fn) { wait_logger_ = std::move(fn); }
  // Tell the local ranks to stop waiting (an error was raised on this rank).
  // The first rank to abort is the culprit the others report.
  void abort();

  // CPUs the host's local ranks may run on (the union of their affinities):
  // with fewer than local_world, spinning would steal a descheduled peer's core.
  void set_cpus(int cpus);
  double spin_s() const { return spin_s_; }

  // Whether the rank that created segment `name` still holds its lease:
  // nullopt when the segment is not (yet) a readable exchange of this format.
  static std::optional<bool> creator_alive(const std::string& name);

  int local_rank() const { return local_rank_; }
  int local_world() const { return local_world_; }
  bool hierarchical() const { return hierarchical_; }
  const std::string& name() const { return name_; }

 private:
  template <typename Ready, typename Watch>
  ExchangeResult wait_for(uint64_t seq, Ready ready, Watch watch, int* culprit_hint,
                          double timeout_s);
  void notify();
  bool peer_alive(int r) const;
  ExchangeResult exchange_impl(uint64_t word, uint64_t seq);
  uint64_t cross_host(uint64_t word);
  void start_lease();
  void stop_lease();
  static void* lease_main(void* self);

  std::string name_;
  bool owner_;
  int local_rank_;
  int local_world_;
  bool hierarchical_;
  double timeout_s_;
  double log_interval_s_;
  double spin_s_ = 0.0;
  void* base_ = nullptr;
  size_t size_ = 0;
  py::object cross_host_;
  std::shared_ptr<LeaderRounds> native_;
  py::object on_native_failure_;
  py::object wait_logger_;
  std::atomic<double> wait_start_{0.0};
  unsigned long main_thread_ = 0;  // Python's main thread: the one that runs signal handlers
  uint64_t pidns_ = 0;  // this process's PID namespace (for the pid fallback only)
  // The lease keeper: a thread that locks this rank's lease and sleeps until
  // the exchange is destroyed (it must outlive whichever thread created us).
  pid_t lease_pid_ = 0;  // process that started the keeper (a fork child must not join it)
  pthread_t lease_thread_{};
  bool lease_running_ = false;
  std::mutex lease_mu_;
  std::condition_variable lease_cv_;
  int lease_phase_ = 0;  // 0 starting, 1 locked (or failed), 2 asked to stop
};

}  // namespace dynamo_dist
