#include "shm_exchange.h"
#include "wait_common.h"

#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>


namespace dynamo_dist {

namespace {

// "dyndistL": the layout with leases. A segment of another layout is never
// attached (the version check refuses mixed installs first) nor judged by it.
constexpr uint64_t kMagic = 0x64796e646973744cULL;
// With a core per local rank, a late peer is usually tens of microseconds away
// (Python overhead jitter), and a futex sleep/wake costs about as much: spin
// that long. With more ranks than cores a spinning rank steals the core its
// peer needs, so spin only briefly and yield at once.
constexpr double kSpinSecondsDedicated = 200e-6;
constexpr double kSpinSecondsOversubscribed = 2e-6;
constexpr int kYieldIters = 64;  // then let a descheduled peer run on our core
constexpr long kSleepSliceNs = 50 * 1000 * 1000;  // futex slices: liveness checks

struct alignas(64) Header {
  uint64_t magic;
  int32_t local_world;
  alignas(64) std::atomic<uint32_t> gen;  // futex word, bumped by a post while someone sleeps
  std::atomic<int32_t> sleepers;
  alignas(64) std::atomic<uint64_t> verdict_seq;
  uint64_t verdict[2];
  std::atomic<uint32_t> aborted;  // 0, or 1 + the local rank that aborted first
};

struct alignas(64) Slot {
  std::atomic<uint64_t> seq;
  uint64_t word[2];
  int32_t pid;  // as the rank sees itself: for messages, and the fallback below
};

// One per local rank, after the slots (off the exchange's cache lines).
constexpr uint32_t kLeaseNone = 0;  // not held (yet), or unusable: fall back to the pid
constexpr uint32_t kLeaseHeld = 1;  // `mutex` is held by the rank's keeper thread
struct alignas(64) Lease {
  pthread_mutex_t mutex;  // robust, process-shared
  std::atomic<uint32_t> state;
  uint64_t pidns;  // inode of the rank's PID namespace, 0 if unknown
};

inline Header* header(void* base) { return static_cast<Header*>(base); }
inline Slot* slots(void* base) {
  return reinterpret_cast<Slot*>(static_cast<char*>(base) + sizeof(Header));
}
inline Lease* leases(void* base, int local_world) {
  return reinterpret_cast<Lease*>(static_cast<char*>(base) + sizeof(Header) +
                                  sizeof(Slot) * static_cast<size_t>(local_world));
}
inline size_t segment_size(int local_world) {
  return sizeof(Header) + (sizeof(Slot) + sizeof(Lease)) * static_cast<size_t>(local_world);
}

// glibc keeps a mutex's futex word first (struct __pthread_mutex_s::__lock):
// the owner's tid, plus FUTEX_OWNER_DIED once the kernel found the owner gone
// (it walks each exiting thread's robust list, before the process is a zombie).
// The keeper checks the word against its tid before declaring the lease usable.
inline uint32_t lease_word(const Lease& l) {
  return __atomic_load_n(reinterpret_cast<const uint32_t*>(&l.mutex), __ATOMIC_ACQUIRE);
}

long futex(std::atomic<uint32_t>* addr, int op, uint32_t val, const struct timespec* ts) {
  // Not FUTEX_PRIVATE: the word lives in memory shared between processes.
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), op, val, ts, nullptr, 0);
}

uint64_t pid_namespace() {
  struct stat st;
  return stat("/proc/self/ns/pid", &st) == 0 ? static_cast<uint64_t>(st.st_ino) : 0;
}

// CPUs this thread may run on (its affinity mask), not the CPUs online.
int affinity_cpus() {
  for (int n = 1024; n <= (1 << 16); n *= 2) {
    cpu_set_t* set = CPU_ALLOC(n);
    if (set == nullptr) break;
    const size_t bytes = CPU_ALLOC_SIZE(n);
    if (sched_getaffinity(0, bytes, set) == 0) {
      const int count = CPU_COUNT_S(bytes, set);
      CPU_FREE(set);
      return count;
    }
    CPU_FREE(set);
    if (errno != EINVAL) break;  // EINVAL: the kernel's mask is larger, try again
  }
  const long online = sysconf(_SC_NPROCESSORS_ONLN);
  return online > 0 ? static_cast<int>(online) : 1;
}

// The fallback when a peer has no usable lease: its pid, which means something
// only within our PID namespace.
bool process_alive(int32_t pid) {
  if (pid <= 0) return true;  // unknown: rely on the timeout
  if (kill(pid, 0) != 0 && errno == ESRCH) return false;
  // A peer that exited but is not yet reaped by its launcher is a zombie:
  // kill() still succeeds, but it will never post again.
  char path[64];
  snprintf(path, sizeof(path), "/proc/%d/stat", pid);
  FILE* f = fopen(path, "r");
  if (f == nullptr) return true;
  char buf[256];
  size_t n = fread(buf, 1, sizeof(buf) - 1, f);
  fclose(f);
  buf[n] = '\0';
  const char* close_paren = strrchr(buf, ')');
  return !(close_paren != nullptr && close_paren[1] == ' ' &&
           (close_paren[2] == 'Z' || close_paren[2] == 'X'));
}

}  // namespace

ShmExchange::ShmExchange(const std::string& name, bool create, int local_rank, int local_world,
                         bool hierarchical, double timeout_s, double log_interval_s)
    : name_(name),
      owner_(create),
      local_rank_(local_rank),
      local_world_(local_world),
      hierarchical_(hierarchical),
      timeout_s_(timeout_s),
      log_interval_s_(log_interval_s) {
  if (local_world <= 0 || local_rank < 0 || local_rank >= local_world) {
    throw std::invalid_argument("invalid local rank/world for the shared-memory exchange");
  }
  size_ = segment_size(local_world);
  set_cpus(affinity_cpus());  // refined by the Python side with the other ranks' masks
  main_thread_ = python_main_thread();
  pidns_ = pid_namespace();
  int fd = shm_open(name.c_str(), create ? (O_CREAT | O_EXCL | O_RDWR) : O_RDWR, 0600);
  if (fd < 0) {
    throw std::runtime_error("shm_open(" + name + ") failed: " + std::strerror(errno));
  }
  if (create && ftruncate(fd, static_cast<off_t>(size_)) != 0) {
    int err = errno;
    close(fd);
    shm_unlink(name.c_str());
    throw std::runtime_error("ftruncate(" + name + ") failed: " + std::strerror(err));
  }
  base_ = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (base_ == MAP_FAILED) {
    base_ = nullptr;
    if (create) shm_unlink(name.c_str());
    throw std::runtime_error("mmap(" + name + ") failed: " + std::strerror(errno));
  }
  Header* h = header(base_);
  if (create) {
    // ftruncate zero-fills: every atomic starts at 0.
    h->local_world = local_world;
  } else {
    for (int i = 0; i < 2000 && __atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) != kMagic; ++i) {
      usleep(1000);
    }
    if (h->magic != kMagic || h->local_world != local_world) {
      munmap(base_, size_);
      base_ = nullptr;
      throw std::runtime_error("shared-memory segment " + name + " is not a dynamo_dist exchange");
    }
  }
  slots(base_)[local_rank].pid = static_cast<int32_t>(getpid());
  leases(base_, local_world)[local_rank].pidns = pidns_;
  start_lease();
  if (create) {
    // Magic last, so attachers (and the stale-segment sweep) that see it see an
    // initialised header and the creator's lease.
    std::atomic_thread_fence(std::memory_order_release);
    __atomic_store_n(&h->magic, kMagic, __ATOMIC_RELEASE);
  }
}

ShmExchange::~ShmExchange() {
  stop_lease();
  if (base_ != nullptr) {
    munmap(base_, size_);
  }
}

void* ShmExchange::lease_main(void* arg) {
  auto* self = static_cast<ShmExchange*>(arg);
  Lease& l = leases(self->base_, self->local_world_)[self->local_rank_];
  const int rc = pthread_mutex_lock(&l.mutex);
  const uint32_t tid = static_cast<uint32_t>(syscall(SYS_gettid));
  if (rc == 0 && (lease_word(l) & FUTEX_TID_MASK) == tid) {
    l.state.store(kLeaseHeld, std::memory_order_release);
  }
  std::unique_lock<std::mutex> lock(self->lease_mu_);
  self->lease_phase_ = 1;
  self->lease_cv_.notify_all();
  self->lease_cv_.wait(lock, [self] { return self->lease_phase_ == 2; });
  // Return still holding the lease: the kernel marks it owner-dead as this
  // thread exits, which is how peers learn that this rank left.
  return nullptr;
}

void ShmExchange::start_lease() {
  Lease& l = leases(base_, local_world_)[local_rank_];
  pthread_mutexattr_t attr;
  if (pthread_mutexattr_init(&attr) != 0) return;
  const bool ok = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED) == 0 &&
                  pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST) == 0 &&
                  pthread_mutex_init(&l.mutex, &attr) == 0;
  pthread_mutexattr_destroy(&attr);
  if (!ok) return;  // no lease: peers fall back to the pid
  // The keeper takes no signals: they must reach the threads that handle them.
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  pthread_attr_t tattr;
  pthread_attr_init(&tattr);
  pthread_attr_setstacksize(&tattr, 256 * 1024);
  lease_running_ = pthread_create(&lease_thread_, &tattr, &ShmExchange::lease_main, this) == 0;
  pthread_attr_destroy(&tattr);
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  if (!lease_running_) return;
  lease_pid_ = getpid();
  std::unique_lock<std::mutex> lock(lease_mu_);
  lease_cv_.wait(lock, [this] { return lease_phase_ >= 1; });
}

void ShmExchange::stop_lease() {
  // A forked child has a copy of this object but not the keeper thread: the
  // lease stays with the parent.
  if (!lease_running_ || getpid() != lease_pid_) return;
  {
    std::lock_guard<std::mutex> lock(lease_mu_);
    lease_phase_ = 2;
  }
  lease_cv_.notify_all();
  pthread_join(lease_thread_, nullptr);  // the mapping must outlive the keeper's exit
  lease_running_ = false;
}

bool ShmExchange::peer_alive(int r) const {
  const Lease& l = leases(base_, local_world_)[r];
  if (l.state.load(std::memory_order_acquire) == kLeaseHeld) {
    return (lease_word(l) & FUTEX_OWNER_DIED) == 0;
  }
  if (l.pidns != 0 && pidns_ != 0 && l.pidns != pidns_) {
    return true;  // its pid means nothing here: rely on the timeout
  }
  return process_alive(slots(base_)[r].pid);
}

std::optional<bool> ShmExchange::creator_alive(const std::string& name) {
  int fd = shm_open(name.c_str(), O_RDONLY, 0);
  if (fd < 0) return std::nullopt;
  struct stat st;
  if (fstat(fd, &st) != 0 || static_cast<size_t>(st.st_size) < sizeof(Header)) {
    close(fd);
    return std::nullopt;
  }
  const size_t size = static_cast<size_t>(st.st_size);
  void* base = mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  close(fd);
  if (base == MAP_FAILED) return std::nullopt;
  std::optional<bool> out;
  const Header* h = header(base);
  if (__atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) == kMagic && h->local_world > 0 &&
      size == segment_size(h->local_world)) {
    const Lease& l = leases(base, h->local_world)[0];
    if (l.state.load(std::memory_order_acquire) == kLeaseHeld) {
      out = (lease_word(l) & FUTEX_OWNER_DIED) == 0;
    }
  }
  munmap(base, size);
  return out;
}

void ShmExchange::set_cpus(int cpus) {
  spin_s_ = (cpus > 0 && local_world_ <= cpus) ? kSpinSecondsDedicated
                                                 : kSpinSecondsOversubscribed;
}

void ShmExchange::unlink() { shm_unlink(name_.c_str()); }

void ShmExchange::notify() {
  Header* h = header(base_);
  // A waiter counts itself in `sleepers` before its last look at what it waits for, and
  // this fence orders our post before our read of `sleepers` (Dekker's pattern): a
  // waiter not counted here sees our post. So the futex word changes only when someone
  // may sleep on it, and a hit with spinning peers writes no line every rank shares.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (h->sleepers.load(std::memory_order_seq_cst) > 0) {
    h->gen.fetch_add(1, std::memory_order_seq_cst);
    futex(&h->gen, FUTEX_WAKE, INT32_MAX, nullptr);
  }
}

void ShmExchange::abort() {
  if (base_ == nullptr) return;
  uint32_t none = 0;
  header(base_)->aborted.compare_exchange_strong(none, static_cast<uint32_t>(local_rank_) + 1,
                                                 std::memory_order_seq_cst);
  notify();
}

template <typename Ready, typename Watch>
ExchangeResult ShmExchange::wait_for(uint64_t seq, Ready ready, Watch watch, int* culprit_hint,
                                     double timeout_s) {
  // Already there (the common case of a rank that arrives last): no wait, and no clock
  // read. Otherwise waited_ns runs from here to the return, whatever the outcome.
  if (ready()) return {ExchangeStatus::kOk, 0, -1, 0};
  Header* h = header(base_);
  const uint64_t start_ns = now_ns();
  const double start = static_cast<double>(start_ns) * 1e-9;  // now_s()'s clock
  ExchangeResult res{ExchangeStatus::kOk, 0, -1, 0};
  auto waited = [&res, start_ns]() -> ExchangeResult {
    res.waited_ns = now_ns() - start_ns;
    return res;
  };
  const double spin_until = start + spin_s_;
  for (int i = 0;; ++i) {
    if (ready()) return waited();
    DD_PAUSE();
    if ((i & 63) == 63 && now_s() >= spin_until) break;
  }
  double next_log = start + log_interval_s_;
  // Python runs signal handlers on its main thread only; elsewhere there is
  // nothing to check (and no reason to take the GIL).
  const bool signals = PyThread_get_thread_ident() == main_thread_;
  double next_signal_check = start;
  std::unique_ptr<py::error_already_set> raised;
  {
    py::gil_scoped_release nogil;
    for (int i = 0; i < kYieldIters; ++i) {
      if (ready()) return waited();
      sched_yield();
    }
    while (true) {
      uint32_t g = h->gen.load(std::memory_order_seq_cst);
      h->sleepers.fetch_add(1, std::memory_order_seq_cst);
      std::atomic_thread_fence(std::memory_order_seq_cst);  // pairs with notify()'s
      if (ready()) {
        h->sleepers.fetch_sub(1, std::memory_order_seq_cst);
        return waited();
      }
      const uint32_t aborted = h->aborted.load(std::memory_order_acquire);
      if (aborted != 0) {
        h->sleepers.fetch_sub(1, std::memory_order_seq_cst);
        res.status = ExchangeStatus::kAborted;
        res.culprit = static_cast<int>(aborted) - 1;
        break;
      }
      struct timespec ts{0, kSleepSliceNs};
      const bool interrupted = futex(&h->gen, FUTEX_WAIT, g, &ts) != 0 && errno == EINTR;
      h->sleepers.fetch_sub(1, std::memory_order_seq_cst);
      if (ready()) return waited();
      double t = now_s();
      // A peer that no longer exists will never post (or publish the verdict):
      // fail now rather than at the timeout.
      for (int r = 0; r < local_world_; ++r) {
        if (r != local_rank_ && watch(r) && !peer_alive(r)) {
          res.status = ExchangeStatus::kPeerDead;
          res.culprit = r;
          break;
        }
      }
      if (res.status != ExchangeStatus::kOk) break;
      if (t - start >= timeout_s) {
        res.status = ExchangeStatus::kTimeout;
        res.culprit = culprit_hint ? *culprit_hint : -1;
        break;
      }
      // Run the handlers of signals that arrived meanwhile (Ctrl-C, SIGTERM
      // for a preemption checkpoint): one that returns lets the wait go on,
      // one that raises ends it, below.
      if (signals && (interrupted || t >= next_signal_check)) {
        next_signal_check = t + kSignalCheckS;
        py::gil_scoped_acquire gil;
        if (PyErr_CheckSignals() != 0) {
          raised = std::make_unique<py::error_already_set>();
          break;
        }
      }
      if (t >= next_log && wait_logger_) {
        next_log = t + log_interval_s_;
        py::gil_scoped_acquire gil;
        try {
          wait_logger_(seq, t - start);
        } catch (py::error_already_set& e) {
          // A failing log line must not fail the exchange, but KeyboardInterrupt
          // or SystemExit raised while logging is the user's, like a signal's.
          if (e.matches(PyExc_Exception)) {
            e.discard_as_unraisable(wait_logger_);
          } else {
            raised = std::make_unique<py::error_already_set>(std::move(e));
            break;
          }
        }
      }
    }
  }
  if (raised) {
    // Peers waiting for this rank fail at once, naming it, instead of at the timeout.
    abort();
    throw py::error_already_set(std::move(*raised));
  }
  return waited();
}

double ShmExchange::waiting_for() const {
  const double start = wait_start_.load(std::memory_order_relaxed);
  return start > 0.0 ? now_s() - start : -1.0;
}

ExchangeResult ShmExchange::exchange(uint64_t word, uint64_t seq) {
  if (wait_start_.load(std::memory_order_relaxed) != 0.0) {
    // Posting now would overwrite this rank's slot mid-exchange.
    throw std::runtime_error(
        "a guard exchange was entered while another was in progress on this rank (compiled code "
        "called from a signal handler or a wait logger while this rank waited for its peers)");
  }
  struct Clear {
    std::atomic<double>& start;
    ~Clear() { start.store(0.0, std::memory_order_relaxed); }
  } clear{wait_start_};
  wait_start_.store(now_s(), std::memory_order_relaxed);
  ExchangeResult r = exchange_impl(word, seq);
  if (r.status == ExchangeStatus::kOk) {
    // A peer that gave up (an error, a signal) left its posted record behind: a rank
    // arriving later would otherwise complete the exchange and run one more compiled
    // call the aborted rank has left. Aborts are sticky for the segment.
    const uint32_t aborted = header(base_)->aborted.load(std::memory_order_acquire);
    if (aborted != 0) {
      r.status = ExchangeStatus::kAborted;
      r.culprit = static_cast<int>(aborted) - 1;
    }
  }
  return r;
}

uint64_t ShmExchange::cross_host(uint64_t word) {
  if (!native_) {
    py::object out = cross_host_(static_cast<int64_t>(word));
    return static_cast<uint64_t>(out.cast<int64_t>());
  }
  const bool signals = PyThread_get_thread_ident() == main_thread_;
  NativeResult r;
  {
    // The local ranks wait on the futex meanwhile; nothing here needs Python
    // but the signal checks, which take the GIL for themselves.
    py::gil_scoped_release nogil;
    r = native_->exchange_nogil(word, timeout_s_, signals);
  }
  if (r.status == static_cast<int>(RoundStatus::kOk)) return r.value;
  on_native_failure_(r.status, static_cast<int64_t>(r.value), r.peer, r.waited_s);
  throw std::runtime_error("the native cross-host step failed (status " +
                           std::to_string(r.status) + ") and its on_failure did not raise");
}

ExchangeResult ShmExchange::exchange_impl(uint64_t word, uint64_t seq) {
  Header* h = header(base_);
  Slot* s = slots(base_);
  Slot& me = s[local_rank_];
  const int parity = static_cast<int>(seq & 1);
  me.word[parity] = word;
  me.seq.store(seq, std::memory_order_release);
  notify();

  int missing = -1;
  auto local_ready = [&]() {
    for (int r = 0; r < local_world_; ++r) {
      if (s[r].seq.load(std::memory_order_acquire) < seq) {
        missing = r;
        return false;
      }
    }
    return true;
  };
  // Only a peer that has not posted can hold the exchange up.
  auto not_posted = [&](int r) { return s[r].seq.load(std::memory_order_acquire) < seq; };
  ExchangeResult res = wait_for(seq, local_ready, not_posted, &missing, timeout_s_);
  if (res.status != ExchangeStatus::kOk) {
    return res;
  }
  uint64_t combined = ~0ULL;
  for (int r = 0; r < local_world_; ++r) {
    combined &= s[r].word[parity];
  }
  if (!hierarchical_) {
    res.word = combined;
    return res;
  }
  if (local_rank_ == 0) {
    // The cross-host step is the host leader's wait: the other hosts' leaders arrive when
    // their own ranks have; its own sends and receives are a small part of it.
    const uint64_t cross_start = now_ns();
    try {
      combined = cross_host(combined);
    } catch (...) {
      abort();
      throw;
    }
    res.waited_ns += now_ns() - cross_start;
    h->verdict[parity] = combined;
    h->verdict_seq.store(seq, std::memory_order_release);
    notify();
    res.word = combined;
    return res;
  }
  int leader = 0;
  auto verdict_ready = [&]() { return h->verdict_seq.load(std::memory_order_acquire) >= seq; };
  // The leader has posted: it is its death during the cross-host step that
  // would leave us waiting.
  auto is_leader = [](int r) { return r == 0; };
  // A grace period: the leader's own timeout (or its peers' failure) should
  // reach us as an abort with a precise error before we give up on it.
  const uint64_t waited_local = res.waited_ns;
  res = wait_for(seq, verdict_ready, is_leader, &leader, timeout_s_ + 5.0);
  res.waited_ns += waited_local;
  if (res.status == ExchangeStatus::kOk) {
    res.word = h->verdict[parity];
  }
  return res;
}

}  // namespace dynamo_dist
