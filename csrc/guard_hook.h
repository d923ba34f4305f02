// The guard-complete hook Dynamo calls after every cache lookup of a frame
// that already has compiled entries, plus the frame-identity helpers that let
// the Python side pair exchanges about the same frame across ranks.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

namespace dynamo_dist {

namespace py = pybind11;

// Identity of the frame Dynamo is about to run, as seen from the frame that
// calls it (Dynamo has not linked the callee into the thread state yet when it
// runs the hook), combined with the innermost compiled region entered on this
// thread. `skip` walks that many frames further back first: the Python
// callback wrapper passes 1 to step over its own frame.
uint64_t current_identity(int skip);

// Describes an identity seen earlier on this process: (caller code, lasti,
// region) or None.
py::object describe_identity(uint64_t ident);

// Python callable (code) -> (hash: int, use_lasti: bool), called once per
// caller code object. The hash must be stable across processes.
void set_code_classifier(py::object fn);

// The sticky error: set when an exchange fails (a timeout, a divergence).
// Raised by the Python callback wrapper and by RegionEnter, i.e. at the latest
// on the next call of any compiled function, since it cannot be raised from
// inside the hook.
py::object pending_error();
void set_pending_error(py::object err);

// Region stack: dynamo_dist.compile appends a RegionEnter to the Dynamo
// context's enter/exit hooks, so every call of a compiled function pushes its
// region id for the duration of the call.
class RegionEnter {
 public:
  explicit RegionEnter(int64_t region);
  py::object call();
  int64_t region() const { return region_; }

 private:
  int64_t region_;
};

class RegionExit {
 public:
  void call();
};

// The hook object installed with set_guard_complete_hook.
class GuardHook {
 public:
  explicit GuardHook(py::object exchange);

  // Called by Dynamo: hit == true means the local cache lookup found an entry.
  // Returns false to force a recompile. Never throws: an exception escaping
  // into Dynamo's frame evaluator calls std::terminate, so errors are kept
  // here (sticky) and raised later by the Python callback wrapper.
  bool call(bool hit);

  py::dict counters() const;
  void set_enabled(bool enabled) { enabled_ = enabled; }
  bool enabled() const { return enabled_; }

 private:
  py::object exchange_;
  bool enabled_ = true;
  uint64_t evaluations_ = 0;
  uint64_t local_misses_ = 0;
  uint64_t forced_recompiles_ = 0;
  uint64_t exchanges_ = 0;
};

}  // namespace dynamo_dist
