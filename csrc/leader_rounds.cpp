#include "leader_rounds.h"
#include "wait_common.h"

#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>


namespace dynamo_dist {

namespace {

constexpr size_t kFrameBytes = 16;
// How long one failure notice may wait for room in a socket's send buffer. A
// 16-byte frame fits an idle connection's buffer at once; a peer that stopped
// reading must not hold the failing leader up.
constexpr double kNoticeWriteS = 0.1;

void encode(uint64_t seq, uint64_t word, uint8_t* out) {
  for (int i = 0; i < 8; ++i) {
    out[i] = static_cast<uint8_t>(seq >> (8 * i));
    out[8 + i] = static_cast<uint8_t>(word >> (8 * i));
  }
}

uint64_t decode_u64(const uint8_t* in) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | in[i];
  return v;
}

bool is_notice(uint64_t w) { return ((w >> 32) & w & kPoison) != 0; }

uint64_t notice_word(uint32_t code) { return (static_cast<uint64_t>(code) << 32) | code; }

// Milliseconds for one poll() slice: never past the deadline, never longer
// than a signal-check interval, and at least 1 (0 would spin).
int slice_ms(double now, double deadline) {
  const double left = std::min(deadline - now, kSignalCheckS);
  return std::max(1, static_cast<int>(std::ceil(left * 1000.0)));
}

void check_host(int h, int me, int hosts, const std::map<int, int>& fds, const char* what) {
  if (h < 0 || h >= hosts || h == me) {
    throw std::invalid_argument(std::string("leader rounds: ") + what + " names host " +
                                std::to_string(h) + " (this leader is " + std::to_string(me) +
                                " of " + std::to_string(hosts) + ")");
  }
  if (fds.find(h) == fds.end()) {
    throw std::invalid_argument("leader rounds: no connection to host " + std::to_string(h));
  }
}

void check_list(const std::vector<int>& hosts_in, int me, int hosts,
                const std::map<int, int>& fds, const char* what) {
  std::vector<int> sorted(hosts_in);
  std::sort(sorted.begin(), sorted.end());
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
    // Frames carry no round number: two frames from one host in one round
    // could not be told apart.
    throw std::invalid_argument(std::string("leader rounds: a host appears twice in ") + what);
  }
  for (int h : hosts_in) check_host(h, me, hosts, fds, what);
}

}  // namespace

struct LeaderRounds::Call {
  uint64_t seq;
  double start;
  double deadline;
  bool signals;
  double next_signal_check;
  std::unique_ptr<py::error_already_set> raised;
};

LeaderRounds::LeaderRounds(int me, int hosts, std::vector<Round> rounds, std::map<int, int> fds,
                           double busy_poll_s)
    : me_(me), hosts_(hosts), rounds_(std::move(rounds)), busy_poll_s_(busy_poll_s) {
  if (hosts <= 0 || me < 0 || me >= hosts) {
    throw std::invalid_argument("leader rounds: invalid host index or host count");
  }
  if (!(busy_poll_s >= 0.0)) throw std::invalid_argument("leader rounds: busy_poll_s < 0");
  size_t widest = 0;
  for (const Round& r : rounds_) {
    check_list(r.first, me, hosts, fds, "a round's send_to");
    check_list(r.second, me, hosts, fds, "a round's recv_from");
    widest = std::max({widest, r.first.size(), r.second.size()});
  }
  links_.resize(static_cast<size_t>(hosts));
  for (const Round& r : rounds_) {
    for (const std::vector<int>* list : {&r.first, &r.second}) {
      for (int h : *list) {
        Link& l = links_[static_cast<size_t>(h)];
        if (l.fd >= 0) continue;
        const int fd = fds.at(h);
        const int flags = fcntl(fd, F_GETFL);
        if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0) {
          throw std::invalid_argument("leader rounds: the connection to host " +
                                      std::to_string(h) + " is not an open fd");
        }
        // Each frame is a message of its own: Nagle would hold it back waiting
        // for the previous one's ACK. Fails harmlessly on a non-TCP socket.
        const int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        l.fd = fd;
      }
    }
  }
  pending_.reserve(widest);
  pollfds_.reserve(widest);
  notified_.assign(static_cast<size_t>(hosts), 0);
  main_thread_ = python_main_thread();
}

bool LeaderRounds::on_main_thread() const { return PyThread_get_thread_ident() == main_thread_; }

NativeResult LeaderRounds::exchange_nogil(uint64_t word, double timeout_s, bool check_signals) {
  bool idle = false;
  if (!busy_.compare_exchange_strong(idle, true)) {
    // Its frames would interleave with the exchange in progress.
    throw std::runtime_error(
        "a leader exchange was entered while another was in progress on this object");
  }
  struct Clear {
    std::atomic<bool>& busy;
    ~Clear() { busy.store(false); }
  } clear{busy_};
  const uint64_t seq = seq_.fetch_add(1, std::memory_order_relaxed) + 1;
  if (failed_) {
    NativeResult again = failure_;
    again.waited_s = 0.0;
    return again;
  }
  const double start = now_s();
  wait_start_.store(start, std::memory_order_relaxed);
  struct Idle {
    std::atomic<double>& since;
    ~Idle() { since.store(0.0, std::memory_order_relaxed); }
  } idle_again{wait_start_};
  // The first signal check comes after one interval: a signal that arrived
  // before the call was handled by the interpreter on its way here.
  Call c{seq, start, start + timeout_s, check_signals, start + kSignalCheckS, nullptr};
  NativeResult res = run(c, word);
  if (c.raised) {
    // The notices are out; the handler's exception belongs to the caller, who
    // expects it raised with the GIL held (ShmExchange::wait_for does the same).
    py::gil_scoped_acquire gil;
    throw py::error_already_set(std::move(*c.raised));
  }
  return res;
}

double LeaderRounds::waiting_for() const {
  const double since = wait_start_.load(std::memory_order_relaxed);
  return since > 0.0 ? now_s() - since : -1.0;
}

NativeResult LeaderRounds::run(Call& c, uint64_t word) {
  for (size_t r = 0; r < rounds_.size(); ++r) {
    size_t sent = 0;
    Outcome o = send_round(c, r, word, &sent);
    if (o.step == Step::kOk) o = recv_round(c, r, &word);
    if (o.step != Step::kOk) {
      o = fail(c, r, sent, o);
      failed_ = true;
      switch (o.step) {
        case Step::kTimeout:
          failure_ = {static_cast<int>(RoundStatus::kTimeout), 0, o.peer, 0.0};
          break;
        case Step::kClosed:
          failure_ = {static_cast<int>(RoundStatus::kClosed), 0, o.peer, 0.0};
          break;
        case Step::kMalformed:
          failure_ = {static_cast<int>(RoundStatus::kMalformed), 0, o.peer, 0.0};
          break;
        default:  // a notice received, or this leader's own (interrupted)
          failure_ = {static_cast<int>(RoundStatus::kPoisoned), o.code, o.peer, 0.0};
          break;
      }
      NativeResult res = failure_;
      res.waited_s = now_s() - c.start;
      return res;
    }
  }
  return {static_cast<int>(RoundStatus::kOk), word, -1, now_s() - c.start};
}

LeaderRounds::Outcome LeaderRounds::fail(Call& c, size_t r, size_t sent, Outcome o) {
  // The notice's code names the suspect as DoublingExchange._pass_on does: the
  // peer that closed or misbehaved, the one waited for (timeout bit set), or,
  // for a received notice, its own code unchanged.
  uint32_t code = 0;
  int skip = o.peer;
  switch (o.step) {
    case Step::kTimeout:
      code = kPoison | kPoisonTimeout | (static_cast<uint32_t>(o.peer) & kSuspectMask);
      break;
    case Step::kClosed:
    case Step::kMalformed:
      code = kPoison | (static_cast<uint32_t>(o.peer) & kSuspectMask);
      break;
    case Step::kPoisoned:
      code = o.code;
      break;
    default:
      // A signal handler raised here: this leader gives up, and names itself
      // (as a leader that exited would be named by its peers).
      code = kPoison | (static_cast<uint32_t>(me_) & kSuspectMask);
      skip = -1;
      o.peer = me_;
      o.code = code;
      break;
  }
  send_notices(r, sent, skip, code, c.seq);
  return o;
}

LeaderRounds::Outcome LeaderRounds::send_round(Call& c, size_t r, uint64_t word, size_t* sent) {
  uint8_t frame[kFrameBytes];
  encode(c.seq, word, frame);
  const std::vector<int>& to = rounds_[r].first;
  for (*sent = 0; *sent < to.size(); ++*sent) {
    Outcome o = write_frame(c, to[*sent], frame);
    if (o.step == Step::kInterrupted && o.peer >= 0) {
      ++*sent;  // part of the frame is out: a notice after it would be misframed
      o.peer = -1;
    }
    if (o.step != Step::kOk) return o;
  }
  return {Step::kOk, -1, 0};
}

LeaderRounds::Outcome LeaderRounds::write_frame(Call& c, int host, const uint8_t* frame) {
  const int fd = links_[static_cast<size_t>(host)].fd;
  size_t off = 0;
  while (true) {
    const Io io = try_write(fd, frame, &off);
    if (io == Io::kDone) return {Step::kOk, -1, 0};
    if (io == Io::kClosed) return {Step::kClosed, host, 0};
    const Step s = wait(c, &host, 1, POLLOUT, 0.0);
    if (s == Step::kTimeout) return {Step::kTimeout, host, 0};
    if (s == Step::kInterrupted) return {Step::kInterrupted, off > 0 ? host : -1, 0};
  }
}

LeaderRounds::Outcome LeaderRounds::recv_round(Call& c, size_t r, uint64_t* word) {
  const std::vector<int>& from = rounds_[r].second;
  pending_.assign(from.begin(), from.end());
  const double busy_until = now_s() + busy_poll_s_;
  while (true) {
    for (size_t i = 0; i < pending_.size();) {
      const int host = pending_[i];
      const Io io = try_read(host);
      if (io == Io::kPending) {
        ++i;
        continue;
      }
      if (io == Io::kClosed) return {Step::kClosed, host, 0};
      Link& l = links_[static_cast<size_t>(host)];
      l.have = 0;
      const uint64_t got = decode_u64(l.buf + 8);
      if (decode_u64(l.buf) != c.seq) return {Step::kMalformed, host, 0};
      if (is_notice(got)) return {Step::kPoisoned, host, static_cast<uint32_t>(got)};
      *word &= got;
      pending_.erase(pending_.begin() + static_cast<std::ptrdiff_t>(i));  // keeps plan order
    }
    if (pending_.empty()) return {Step::kOk, -1, 0};
    const Step s = wait(c, pending_.data(), pending_.size(), POLLIN, busy_until);
    // The first host still missing, in the plan's order, is the one named.
    if (s == Step::kTimeout) return {Step::kTimeout, pending_.front(), 0};
    if (s == Step::kInterrupted) return {Step::kInterrupted, -1, 0};
  }
}

LeaderRounds::Step LeaderRounds::wait(Call& c, const int* hosts, size_t n, short events,
                                      double busy_until) {
  double t = now_s();
  if (t >= c.deadline) return Step::kTimeout;
  bool interrupted = false;
  if (t < busy_until) {
    // A peer's frame is often microseconds away: a poll() sleep and wake-up
    // would cost more than it saves.
    DD_PAUSE();
  } else {
    pollfds_.clear();
    for (size_t i = 0; i < n; ++i) {
      pollfds_.push_back({links_[static_cast<size_t>(hosts[i])].fd, events, 0});
    }
    interrupted = poll(pollfds_.data(), pollfds_.size(), slice_ms(t, c.deadline)) < 0 &&
                  errno == EINTR;
    t = now_s();
  }
  if (c.signals && (interrupted || t >= c.next_signal_check)) {
    c.next_signal_check = t + kSignalCheckS;
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) {
      c.raised = std::make_unique<py::error_already_set>();
      return Step::kInterrupted;
    }
  }
  return Step::kOk;
}

LeaderRounds::Io LeaderRounds::try_read(int host) {
  Link& l = links_[static_cast<size_t>(host)];
  while (l.have < kFrameBytes) {
    // Never more than the rest of this frame: the next exchange's frames stay
    // in the socket until that exchange reads them.
    const ssize_t n = recv(l.fd, l.buf + l.have, kFrameBytes - l.have, MSG_DONTWAIT);
    if (n > 0) {
      l.have += static_cast<size_t>(n);
      continue;
    }
    if (n == 0) return Io::kClosed;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return Io::kPending;
    return Io::kClosed;  // ECONNRESET, or the fd is gone: the peer is unreachable
  }
  return Io::kDone;
}

LeaderRounds::Io LeaderRounds::try_write(int fd, const uint8_t* frame, size_t* off) {
  while (*off < kFrameBytes) {
    // MSG_NOSIGNAL: a peer that went away is an error to report, not a SIGPIPE.
    const ssize_t n = send(fd, frame + *off, kFrameBytes - *off, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) {
      *off += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return Io::kPending;
    return Io::kClosed;  // EPIPE, ECONNRESET, a closed fd
  }
  return Io::kDone;
}

void LeaderRounds::send_notices(size_t r, size_t first_unsent, int skip, uint32_t code,
                                uint64_t seq) {
  // Every host still due a frame from this leader in this exchange would
  // otherwise wait for it until its own timeout.
  uint8_t frame[kFrameBytes];
  encode(seq, notice_word(code), frame);
  std::fill(notified_.begin(), notified_.end(), 0);
  for (size_t k = r; k < rounds_.size(); ++k) {
    const std::vector<int>& to = rounds_[k].first;
    for (size_t i = (k == r ? first_unsent : 0); i < to.size(); ++i) {
      const int host = to[i];
      if (host == skip || notified_[static_cast<size_t>(host)]) continue;
      notified_[static_cast<size_t>(host)] = 1;
      const int fd = links_[static_cast<size_t>(host)].fd;
      const double until = now_s() + kNoticeWriteS;
      size_t off = 0;
      // Best effort: a peer that is gone or not reading gets no notice.
      while (try_write(fd, frame, &off) == Io::kPending) {
        const double t = now_s();
        if (t >= until) break;
        pollfd p{fd, POLLOUT, 0};
        poll(&p, 1, slice_ms(t, until));
      }
    }
  }
}

}  // namespace dynamo_dist
