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
#pragma once

#include <pybind11/pybind11.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

namespace dynamo_dist {

namespace py = pybind11;

enum class ExchangeStatus : int {
  kOk = 0,
  kTimeout = 1,  // a local peer (or the leader's verdict) did not arrive in time
  kPeerDead = 2,  // a local peer process no longer exists
  kAborted = 3,  // another local rank gave up (its cross-host exchange failed)
};

struct ExchangeResult {
  ExchangeStatus status;
  uint64_t word;  // AND over ranks of the packed records (valid when kOk)
  int culprit;  // local rank that did not arrive, or -1
  double waited_s;
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
  // GIL held; releases it while sleeping.
  ExchangeResult exchange(uint64_t word, uint64_t seq);

  // Seconds the current exchange has waited so far, or -1 when none is in
  // progress. Read by the status thread (stall warnings), never on the hot path.
  double waiting_for() const;

  // Leader only: fn(word: int) -> int, the AND of all hosts' combined words.
  void set_cross_host(py::object fn) { cross_host_ = std::move(fn); }
  // Called (with the GIL) every log interval while waiting: fn(seq, waited_s).
  void set_wait_logger(py::object fn) { wait_logger_ = std::move(fn); }
  // Tell the local ranks to stop waiting (an error was raised on this rank).
  void abort();

  int local_rank() const { return local_rank_; }
  int local_world() const { return local_world_; }
  bool hierarchical() const { return hierarchical_; }
  const std::string& name() const { return name_; }

 private:
  template <typename Ready>
  ExchangeResult wait_for(uint64_t seq, Ready ready, int* culprit_hint, double timeout_s);
  void notify();
  ExchangeResult exchange_impl(uint64_t word, uint64_t seq);

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
  py::object wait_logger_;
  std::atomic<double> wait_start_{0.0};
};

}  // namespace dynamo_dist
