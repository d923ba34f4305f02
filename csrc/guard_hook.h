// The guard-complete hook Dynamo calls after every cache lookup of a frame
// that already has compiled entries, plus the frame-identity helpers that let
// the Python side pair exchanges about the same frame across ranks.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "shm_exchange.h"

namespace dynamo_dist {

namespace py = pybind11;

// The guard record, the same as dynamo_dist/_collective.py's pack(): low half
// x = (ident << 1) | hit, high half ~x, so an AND over ranks exposes
// disagreeing bits. Exposed to Python (_C._pack_record) only for tests.
inline uint64_t pack_record(bool hit, uint64_t ident) {
  constexpr uint64_t kM32 = 0xFFFFFFFFULL;
  uint64_t x = (((ident & 0x7FFFFFFFULL) << 1) | (hit ? 1ULL : 0ULL)) & kM32;
  return ((~x & kM32) << 32) | x;
}

// The fast path's decision on an AND-reduced word: 1 if every rank hit, 0 if
// every rank missed, -1 if Python's slow path must decide (identities
// disagree, or some ranks hit while others missed). Exposed to Python
// (_C._fast_verdict) only for tests.
inline int fast_verdict(uint64_t word) {
  constexpr uint64_t kM32 = 0xFFFFFFFFULL;
  const uint64_t low = word & kM32, high = word >> 32;
  const uint64_t disagree = ~(low | high) & kM32;
  const bool all_hit = (low & 1) != 0;
  const bool any_hit = (high & 1) == 0;
  if ((disagree & ~1ULL) == 0 && (all_hit || !any_hit)) {
    return all_hit ? 1 : 0;
  }
  return -1;
}

// Identity of the frame Dynamo is about to run, as seen from the frame that
// calls it (Dynamo has not linked the callee into the thread state yet when it
// runs the hook), combined with the innermost compiled region entered on this
// thread and the thread's grad mode (so a rank evaluating under no_grad never
// pairs with a rank training through the same call site). `skip` walks that many frames further back first: the Python
// callback wrapper passes 2 to step over its own frame and the policy method's
// frame (_policy.Policy.exchange_first_entry).
// `callee`: the code of the frame entered (borrowed; nullptr: unknown), mixed in so
// that different functions entered from one call site are different frames.
uint64_t current_identity(PyObject* callee);
// Frames running `code` are dynamo_dist's own: current_identity looks past them.
void add_transparent(PyObject* code);
// Whether this build reads the pending callee (CPython 3.11 to 3.13).
bool has_callee_probe();

// The code of the frame Dynamo is evaluating while it runs the hook (pushed, not
// linked yet), borrowed; nullptr where it cannot be found (other Pythons).
PyObject* pending_callee_code();

// Describes an identity seen earlier on this process: (caller code, lasti,
// region, grad_enabled, callee code or None) or None.
py::object describe_identity(uint64_t ident);

// Python callable () -> bool: torch.is_grad_enabled, mixed into every identity.
void set_mode_probe(py::object fn);

// dynamo_dist.local(): a per-thread depth. While it is positive, compiled
// calls on this thread exchange nothing (plain torch.compile semantics).
void local_enter();
void local_exit();
int local_depth();
// How many threads of this process are inside dynamo_dist.local() now (any thread
// may ask: the status board publishes it, so a waiting rank knows its peer is busy
// with rank-local work rather than lost).
int local_active_threads();

class GuardHook;

// One exchange's figures, in nanoseconds. `wait`: the time this rank was blocked on
// the others (shared memory: ExchangeResult::waited_ns; gloo: the all-reduce call, as
// the transport's callable reports it). `cost`: the rest, i.e. what the exchange costs
// this rank itself: from before the hook computes the frame's identity (for exchanges
// the Python callback makes, from the exchange's start) to the verdict, less `wait`.
struct ExchangeSample {
  uint64_t cost_ns;
  uint64_t wait_ns;
};

// What the exchanges about one frame identity add up to on this rank: the report's
// per-region breakdown (dynamo_dist/exchange/stats.py sums identities into regions).
struct FrameCounts {
  uint64_t ident;
  uint64_t exchanges;
  uint64_t hits;  // exchanges in which this rank's own guards passed (before agreeing)
  uint64_t wait_ns;  // total
  uint64_t wait_max_ns;
};

// FrameCounts by identity, on the hot path: an open-addressing table (linear probing;
// identities are hashes already) behind a cache of the last slot used. It allocates only
// when a new identity fills it past half, and holds at most kMaxFrames identities: the
// exchanges of any others are counted together under ident kOther, so a program making
// ever new identities costs bounded memory.
class FrameTable {
 public:
  static constexpr size_t kMaxFrames = 4096;
  static constexpr uint64_t kOther = ~0ULL;  // identities are 62-bit: never all ones
  FrameTable();
  void add(uint64_t ident, bool hit, uint64_t wait_ns);
  // [(ident, exchanges, hits, wait_ns, wait_max_ns)]; ident -1 for the others.
  py::list to_list() const;

 private:
  FrameCounts& find(uint64_t ident);
  void grow();
  std::vector<FrameCounts> slots_;  // ident kOther: empty
  size_t used_ = 0;
  size_t last_ = 0;
  FrameCounts other_{kOther, 0, 0, 0, 0};
};

// Python callable (code) -> (hash: int, use_lasti: bool), called once per
// caller code object. The hash must be stable across processes.
void set_code_classifier(py::object fn);

// The sticky error: set when an exchange fails (a timeout, a divergence).
// Raised by the Python callback wrapper and by RegionEnter, i.e. at the latest
// on the next call of any compiled function, since it cannot be raised from
// inside the hook.
py::object pending_error();
void set_pending_error(py::object err);

// Adds the objects Dynamo calls on every compiled call to the module, as plain CPython
// objects (vectorcall types and functions, not pybind11 classes, whose dispatch costs
// about 60 ns per call):
// - pending_check: the first enter hook of every adopted Dynamo context; raises the
//   sticky error (a fresh exception chained to it, _errors.pending) before any other
//   enter hook has run, so nothing is left applied when it raises. Its exit is a no-op.
// - RegionEnter(region, hook=None): appended to a compiled function's enter hooks; pushes
//   the region and its group's GuardHook on this thread's region stack for the call, and
//   returns region_exit, which pops it.
// - Router(): the hook installed with set_guard_complete_hook; calls route().
void add_call_objects(py::module_& m);

// The hook object installed with set_guard_complete_hook.
class GuardHook {
 public:
  // Python transport: exchange(hit, ident) -> verdict, or (verdict, waited_ns) from a
  // transport that measures its wait for the other ranks (gloo's all-reduce call).
  explicit GuardHook(py::object exchange);
  // Shared-memory transport with a C++ fast path. slow_path(status, seq, ident,
  // hit, word, culprit, waited_s) -> bool runs in Python only when the fast
  // path cannot decide alone (mixed hits, a mismatch, a timeout, a dead peer).
  GuardHook(std::shared_ptr<ShmExchange> shm, py::object slow_path);

  // One exchange; may throw. Used by call() and by the Python callback
  // wrapper for frames without cache entries. The first thread that exchanges
  // owns the channel; another thread gets _errors.wrong_thread (DynamoDistError).
  // After release(), returns `hit`: nothing is exchanged.
  bool exchange(bool hit, uint64_t ident);
  // Whether the calling thread may exchange on this channel (it owns it, or
  // nobody does yet).
  bool thread_ok() const;
  // The owning thread's ident (threading.get_ident()), 0 before the first exchange.
  unsigned long owner_thread() const { return owner_; }
  // Shutdown: drop the transport callables (they reference the transport, which
  // references this hook: a cycle the garbage collector cannot see through C++).
  // The hook then passes every result through.
  void release();
  uint64_t seq() const { return seq_; }
  uint64_t last_ident() const { return last_ident_; }
  // Process-wide order of this hook's last exchange among all hooks' exchanges.
  uint64_t last_epoch() const { return last_epoch_; }
  // (cost_ns, wait_ns): two lists, pairwise the last kSamples completed exchanges.
  py::tuple samples_ns() const;
  py::list frames() const { return frames_.to_list(); }

  // Called by Dynamo: hit == true means the local cache lookup found an entry.
  // Returns false to force a recompile. Never throws: an exception escaping
  // into Dynamo's frame evaluator calls std::terminate, so errors are kept
  // here (sticky) and raised later by the Python callback wrapper.
  bool call(bool hit);

  py::dict counters() const;

 private:
  // exchange(), with `t0` read before the frame's identity was computed (by call()).
  bool exchange_from(bool hit, uint64_t ident, uint64_t t0);
  void record(uint64_t cost_ns, uint64_t wait_ns);

  py::object exchange_;
  std::shared_ptr<ShmExchange> shm_;
  py::object slow_path_;
  uint64_t seq_ = 0;
  uint64_t last_ident_ = 0;
  uint64_t last_epoch_ = 0;
  std::vector<ExchangeSample> samples_;  // a ring, reserved up front: no allocation per call
  size_t sample_next_ = 0;
  FrameTable frames_;
  uint64_t evaluations_ = 0;
  uint64_t local_misses_ = 0;
  uint64_t forced_recompiles_ = 0;
  uint64_t exchanges_ = 0;
  unsigned long owner_ = 0;
  bool released_ = false;
};

// The one hook installed into Dynamo (_C.Router): routes each guard result to the
// GuardHook of the innermost compiled region on this thread; passes results through
// outside regions and inside dynamo_dist.local().
bool route(bool hit);

}  // namespace dynamo_dist
