// The host leaders' cross-host step, natively: rounds of 16-byte frames over
// TCP connections that Python set up and authenticated beforehand.
//
// Python computes the round plan (who sends to whom in each round) and owns
// the sockets; this object only runs the rounds, without the GIL: in round r a
// leader writes its current word to every host of rounds[r].first, then ANDs
// in one frame from every host of rounds[r].second. With a plan in which every
// host's word reaches every other host (k-ary dissemination), each leader ends
// with the AND over all hosts.
//
// A frame is little-endian {uint64 seq, int64 word}. `seq` counts exchanges on
// this object (every leader makes the same number of them), so a frame of the
// wrong exchange is told apart from a late or early one. Frames are read
// exactly one at a time into a fixed 16-byte buffer per connection: nothing a
// peer sends decides an allocation or a length.
//
// Failures travel like DoublingExchange's (exchange/allreduce.py): a leader
// that fails writes a failure notice (record.py's POISON word) to every host
// still due a frame from it in this exchange, and a leader that receives a
// notice passes it on unchanged, so every leader learns of the failure within
// the rounds instead of at its own timeout.
//
// After a failure the streams' framing is unknown (a notice may sit where a
// word was due, a peer may have died mid-frame). The object keeps its first
// failure and returns it again from every later exchange, without any I/O:
// the caller tears the connections down.
#pragma once

#include <poll.h>
#include <pybind11/pybind11.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <utility>
#include <vector>

namespace dynamo_dist {

namespace py = pybind11;

// record.py's failure-notice bits: a word whose halves share bit 31 (no AND of
// packed records is), bit 30 for a timeout, the suspect host in the low 30.
constexpr uint32_t kPoison = 1u << 31;
constexpr uint32_t kPoisonTimeout = 1u << 30;
constexpr uint32_t kSuspectMask = (1u << 30) - 1;

enum class RoundStatus : int {
  kOk = 0,
  kTimeout = 1,  // a frame was missing at the deadline; peer: whose
  kClosed = 2,  // a peer closed or reset its connection; peer: which
  kPoisoned = 3,  // a failure notice arrived; value: its code, peer: its sender
  kMalformed = 4,  // a frame of another exchange (seq mismatch); peer: its sender
};

struct NativeResult {
  int status;  // a RoundStatus
  uint64_t value;  // the AND over hosts (kOk), or the notice's code (kPoisoned)
  int peer;  // the host the status names, or -1
  double waited_s;
};

class LeaderRounds {
 public:
  using Round = std::pair<std::vector<int>, std::vector<int>>;  // (send_to, recv_from)

  // fds[host]: a connected stream socket for every host named in a round. The
  // fds stay Python's (it closes them, never while an exchange may run); they
  // are made non-blocking here. Each wait for a round's frames busy-polls for
  // busy_poll_s before it sleeps in poll() (0: sleep at once).
  //
  // A leader that failed should not close() its sockets at once: one closed
  // with frames still unread in it is answered with a reset, which can beat
  // the notices just written. Keep them open a grace period first (as
  // DoublingExchange's _NOTICE_GRACE_S), or drain them.
  // Throws std::invalid_argument for a plan that names a host out of range,
  // this leader itself, a host twice in one list, or a host without an fd.
  LeaderRounds(int me, int hosts, std::vector<Round> rounds, std::map<int, int> fds,
               double busy_poll_s);
  LeaderRounds(const LeaderRounds&) = delete;
  LeaderRounds& operator=(const LeaderRounds&) = delete;

  // One exchange: AND `word` over every host, bounded by `timeout_s`. Called
  // WITHOUT the GIL. With check_signals (the caller is Python's main thread),
  // pending signal handlers run at least every 50 ms while waiting; one that
  // raises makes this leader send its failure notices and rethrow, as
  // py::error_already_set, with the GIL held. Throws std::runtime_error when
  // entered while another exchange on this object is in progress.
  NativeResult exchange_nogil(uint64_t word, double timeout_s, bool check_signals);
  // Seconds the exchange in progress has waited so far, or -1 when none is: read by
  // the status thread (stall warnings, progress lines), never on the hot path.
  double waiting_for() const;

  // Exchanges made so far: the seq of the last one (its frames carry it).
  uint64_t seq() const { return seq_.load(std::memory_order_relaxed); }
  // Whether this thread is Python's main thread (the one that runs signal
  // handlers). Call with the GIL held.
  bool on_main_thread() const;
  int me() const { return me_; }
  int hosts() const { return hosts_; }
  size_t num_rounds() const { return rounds_.size(); }

 private:
  // Outcome of one step of a round; kInterrupted: a signal handler raised.
  enum class Step { kOk, kTimeout, kClosed, kPoisoned, kMalformed, kInterrupted };
  struct Outcome {
    Step step;
    int peer;
    uint32_t code;  // kPoisoned: the notice's code
  };
  struct Call;  // one exchange's deadline and signal-check state
  struct Link {
    int fd = -1;
    size_t have = 0;  // bytes of the frame being read
    uint8_t buf[16] = {};
  };
  enum class Io { kDone, kPending, kClosed };

  NativeResult run(Call& c, uint64_t word);
  Outcome send_round(Call& c, size_t r, uint64_t word, size_t* sent);
  Outcome recv_round(Call& c, size_t r, uint64_t* word);
  Outcome write_frame(Call& c, int host, const uint8_t* frame);
  Outcome fail(Call& c, size_t r, size_t sent, Outcome o);
  Step wait(Call& c, const int* hosts, size_t n, short events, double busy_until);
  Io try_read(int host);
  Io try_write(int fd, const uint8_t* frame, size_t* off);
  void send_notices(size_t r, size_t first_unsent, int skip, uint32_t code, uint64_t seq);

  int me_;
  int hosts_;
  std::vector<Round> rounds_;
  std::vector<Link> links_;  // by host; fd -1 for a host no round names
  double busy_poll_s_;
  unsigned long main_thread_ = 0;
  std::atomic<uint64_t> seq_{0};
  std::atomic<bool> busy_{false};
  std::atomic<double> wait_start_{0.0};  // 0: no exchange in progress
  bool failed_ = false;
  NativeResult failure_{0, 0, -1, 0.0};
  // Sized once here, so the exchange itself allocates nothing.
  std::vector<int> pending_;
  std::vector<pollfd> pollfds_;
  std::vector<char> notified_;
};

}  // namespace dynamo_dist
