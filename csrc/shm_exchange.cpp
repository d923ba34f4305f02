#include "shm_exchange.h"

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

#include <chrono>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DD_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define DD_PAUSE() asm volatile("yield" ::: "memory")
#else
#define DD_PAUSE() \
  do {             \
  } while (0)
#endif

namespace dynamo_dist {

namespace {

constexpr uint64_t kMagic = 0x64796e646973744dULL;  // "dyndistM"
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
  alignas(64) std::atomic<uint32_t> gen;  // futex word, bumped on every post
  std::atomic<int32_t> sleepers;
  alignas(64) std::atomic<uint64_t> verdict_seq;
  uint64_t verdict[2];
  std::atomic<uint32_t> aborted;
};

struct alignas(64) Slot {
  std::atomic<uint64_t> seq;
  uint64_t word[2];
  int32_t pid;
};

inline Header* header(void* base) { return static_cast<Header*>(base); }
inline Slot* slots(void* base) {
  return reinterpret_cast<Slot*>(static_cast<char*>(base) + sizeof(Header));
}

long futex(std::atomic<uint32_t>* addr, int op, uint32_t val, const struct timespec* ts) {
  // Not FUTEX_PRIVATE: the word lives in memory shared between processes.
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), op, val, ts, nullptr, 0);
}

double now_s() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

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
  size_ = sizeof(Header) + sizeof(Slot) * static_cast<size_t>(local_world);
  const long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  spin_s_ = (cpus > 0 && local_world <= cpus) ? kSpinSecondsDedicated : kSpinSecondsOversubscribed;
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
    throw std::runtime_error("mmap(" + name + ") failed: " + std::strerror(errno));
  }
  Header* h = header(base_);
  if (create) {
    // ftruncate zero-fills: every atomic starts at 0. Magic last, so attachers
    // that see it see an initialised header.
    h->local_world = local_world;
    std::atomic_thread_fence(std::memory_order_release);
    h->magic = kMagic;
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
}

ShmExchange::~ShmExchange() {
  if (base_ != nullptr) {
    munmap(base_, size_);
  }
}

void ShmExchange::unlink() { shm_unlink(name_.c_str()); }

void ShmExchange::notify() {
  Header* h = header(base_);
  h->gen.fetch_add(1, std::memory_order_seq_cst);
  if (h->sleepers.load(std::memory_order_seq_cst) > 0) {
    futex(&h->gen, FUTEX_WAKE, INT32_MAX, nullptr);
  }
}

void ShmExchange::abort() {
  if (base_ == nullptr) return;
  header(base_)->aborted.store(1, std::memory_order_seq_cst);
  notify();
}

template <typename Ready>
ExchangeResult ShmExchange::wait_for(uint64_t seq, Ready ready, int* culprit_hint,
                                     double timeout_s) {
  Header* h = header(base_);
  const double start = now_s();
  const double spin_until = start + spin_s_;
  for (int i = 0;; ++i) {
    if (ready()) return {ExchangeStatus::kOk, 0, -1, 0.0};
    DD_PAUSE();
    if ((i & 63) == 63 && now_s() >= spin_until) break;
  }
  ExchangeResult res{ExchangeStatus::kOk, 0, -1, 0.0};
  double next_log = start + log_interval_s_;
  {
    py::gil_scoped_release nogil;
    for (int i = 0; i < kYieldIters; ++i) {
      if (ready()) return res;
      sched_yield();
    }
    while (true) {
      uint32_t g = h->gen.load(std::memory_order_seq_cst);
      h->sleepers.fetch_add(1, std::memory_order_seq_cst);
      if (ready()) {
        h->sleepers.fetch_sub(1, std::memory_order_seq_cst);
        return res;
      }
      if (h->aborted.load(std::memory_order_acquire) != 0) {
        h->sleepers.fetch_sub(1, std::memory_order_seq_cst);
        res.status = ExchangeStatus::kAborted;
        break;
      }
      struct timespec ts{0, kSleepSliceNs};
      futex(&h->gen, FUTEX_WAIT, g, &ts);
      h->sleepers.fetch_sub(1, std::memory_order_seq_cst);
      if (ready()) return res;
      double t = now_s();
      res.waited_s = t - start;
      // A local peer that no longer exists will never post: fail now rather
      // than at the timeout.
      Slot* s = slots(base_);
      for (int r = 0; r < local_world_; ++r) {
        if (s[r].seq.load(std::memory_order_acquire) < seq && !process_alive(s[r].pid)) {
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
      if (t >= next_log && wait_logger_) {
        next_log = t + log_interval_s_;
        py::gil_scoped_acquire gil;
        try {
          wait_logger_(seq, t - start);
        } catch (py::error_already_set&) {
        }
      }
    }
  }
  res.waited_s = now_s() - start;
  return res;
}

double ShmExchange::waiting_for() const {
  const double start = wait_start_.load(std::memory_order_relaxed);
  return start > 0.0 ? now_s() - start : -1.0;
}

ExchangeResult ShmExchange::exchange(uint64_t word, uint64_t seq) {
  struct Clear {
    std::atomic<double>& start;
    ~Clear() { start.store(0.0, std::memory_order_relaxed); }
  } clear{wait_start_};
  wait_start_.store(now_s(), std::memory_order_relaxed);
  return exchange_impl(word, seq);
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
  ExchangeResult res = wait_for(seq, local_ready, &missing, timeout_s_);
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
    try {
      py::object out = cross_host_(static_cast<int64_t>(combined));
      combined = static_cast<uint64_t>(out.cast<int64_t>());
    } catch (...) {
      abort();
      throw;
    }
    h->verdict[parity] = combined;
    h->verdict_seq.store(seq, std::memory_order_release);
    notify();
    res.word = combined;
    return res;
  }
  int leader = 0;
  auto verdict_ready = [&]() { return h->verdict_seq.load(std::memory_order_acquire) >= seq; };
  // A grace period: the leader's own timeout (or its peers' failure) should
  // reach us as an abort with a precise error before we give up on it.
  res = wait_for(seq, verdict_ready, &leader, timeout_s_ + 5.0);
  if (res.status == ExchangeStatus::kOk) {
    res.word = h->verdict[parity];
  }
  return res;
}

}  // namespace dynamo_dist
