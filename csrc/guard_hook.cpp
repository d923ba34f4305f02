#include "guard_hook.h"
#include "wait_common.h"

#include <Python.h>
#include <frameobject.h>
#include <pythread.h>

// The frame Dynamo is evaluating when it calls the hook has been pushed on the
// thread's frame stack but not linked yet: reading it needs CPython's frame layout.
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030E0000
#define DYNAMO_DIST_CALLEE_CODE 1
#define Py_BUILD_CORE
#include <internal/pycore_frame.h>
#undef Py_BUILD_CORE
#endif

#include <atomic>
#include <cstddef>
#include <cstring>
#include <new>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace dynamo_dist {

namespace {

struct CodeInfo {
  uint64_t hash;
  bool use_lasti;
};

struct IdentityDesc {
  PyObject* code;  // strong reference, kept for the life of the process
  PyObject* callee;  // strong reference or nullptr
  int lasti;
  int64_t region;
  bool grad;
};

struct RegionFrame {
  int64_t region;
  GuardHook* hook;
  // The Python GuardHook, held while the region is entered: if torch skips the exit
  // hooks (it can raise in its own `finally` before running them), the entry stays, and
  // must never point at a freed hook. A released hook passes results through.
  PyObject* owner;
};

// Code objects are kept alive by the cache (strong references) so a freed
// code object's address can never be reused for a different frame's hash.
std::unordered_map<PyObject*, CodeInfo>& code_cache() {
  static auto* cache = new std::unordered_map<PyObject*, CodeInfo>();
  return *cache;
}

std::unordered_map<uint64_t, IdentityDesc>& identity_table() {
  static auto* table = new std::unordered_map<uint64_t, IdentityDesc>();
  return *table;
}

py::object& classifier() {
  static auto* fn = new py::object();
  return *fn;
}

py::object& mode_probe() {
  static auto* fn = new py::object();
  return *fn;
}

thread_local std::vector<RegionFrame> region_stack;
thread_local int local_depth_ = 0;
std::atomic<int> local_threads{0};  // threads inside dynamo_dist.local(), for the status board
uint64_t exchange_epoch = 0;  // guarded by the GIL

bool grad_enabled() {
  if (!mode_probe()) return true;
  PyObject* r = PyObject_CallNoArgs(mode_probe().ptr());
  if (r == nullptr) {
    PyErr_Clear();
    return true;
  }
  const bool on = (r == Py_True);
  Py_DECREF(r);
  return on;
}

py::object& sticky_error() {
  static auto* err = new py::object();
  return *err;
}

inline uint64_t mix(uint64_t h, uint64_t v) {
  // splitmix64 finaliser over the running hash: cheap and well distributed.
  uint64_t z = h ^ (v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2));
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

CodeInfo classify(PyObject* code) {
  auto& cache = code_cache();
  auto it = cache.find(code);
  if (it != cache.end()) {
    return it->second;
  }
  CodeInfo info{reinterpret_cast<uintptr_t>(code), false};
  if (classifier()) {
    py::tuple res = classifier()(py::handle(code));
    info.hash = res[0].cast<uint64_t>();
    info.use_lasti = res[1].cast<bool>();
  }
  Py_INCREF(code);
  cache.emplace(code, info);
  return info;
}

int frame_lasti(PyFrameObject* f) {
#if PY_VERSION_HEX >= 0x030B0000
  return PyFrame_GetLasti(f);
#else
  return f->f_lasti;
#endif
}

#ifdef DYNAMO_DIST_CALLEE_CODE
PyObject* frame_code(_PyInterpreterFrame* f) {
#if PY_VERSION_HEX >= 0x030D0000
  return f->f_executable;
#else
  return reinterpret_cast<PyObject*>(f->f_code);
#endif
}

ptrdiff_t frame_slots(PyObject* code) {
  auto* co = reinterpret_cast<PyCodeObject*>(code);
#if PY_VERSION_HEX >= 0x030C0000
  return co->co_framesize;
#else
  return co->co_nlocalsplus + co->co_stacksize + FRAME_SPECIALS_SIZE;
#endif
}
#endif

}  // namespace

PyObject* pending_callee_code() {
#ifdef DYNAMO_DIST_CALLEE_CODE
  // Python pushes a frame on the thread's data stack (a bump allocator) and then calls
  // the frame evaluator (Dynamo), which links it only when it runs it. While the hook
  // runs, the callee is therefore the frame right after the innermost frame of the
  // linked chain that lives on the data stack (generator frames live in their
  // generator; 3.12's entry frames on the C stack), or the first frame of a fresh
  // chunk, and it ends exactly at the stack's top. Anything else: no callee (nullptr).
  PyThreadState* ts = PyThreadState_Get();
#if PY_VERSION_HEX >= 0x030D0000
  _PyInterpreterFrame* f = ts->current_frame;
#else
  _PyInterpreterFrame* f = ts->cframe->current_frame;
#endif
  while (f != nullptr && f->owner != FRAME_OWNED_BY_THREAD) f = f->previous;
  _PyStackChunk* chunk = ts->datastack_chunk;
  PyObject** top = ts->datastack_top;
  if (chunk == nullptr || top == nullptr) return nullptr;
  PyObject** lo = &chunk->data[chunk->previous == nullptr ? 1 : 0];
  PyObject** cand = lo;
  auto* fp = reinterpret_cast<PyObject**>(f);
  if (f != nullptr && fp >= lo && fp < top) {
    PyObject* code = frame_code(f);
    if (code == nullptr || !PyCode_Check(code)) return nullptr;
    cand = fp + frame_slots(code);
  }
  if (cand < lo || cand + FRAME_SPECIALS_SIZE > top) return nullptr;
  PyObject* code = frame_code(reinterpret_cast<_PyInterpreterFrame*>(cand));
  if (code == nullptr || !PyCode_Check(code) || cand + frame_slots(code) != top) return nullptr;
  return code;
#else
  return nullptr;
#endif
}

std::unordered_set<PyObject*>& transparent_codes() {
  static auto* codes = new std::unordered_set<PyObject*>();  // never freed: held for life
  return *codes;
}

void add_transparent(PyObject* code) {
  if (transparent_codes().insert(code).second) Py_INCREF(code);
}

bool has_callee_probe() {
#ifdef DYNAMO_DIST_CALLEE_CODE
  return true;
#else
  return false;
#endif
}

uint64_t current_identity(PyObject* callee) {
#ifndef DYNAMO_DIST_CALLEE_CODE
  // Without the probe the hook never knows the callee: every path must leave it out,
  // or the callback's identity (which knows it) would never match the hook's.
  callee = nullptr;
#endif
  int64_t region = region_stack.empty() ? -1 : region_stack.back().region;
  const bool grad = grad_enabled();
  // The caller: the innermost frame that is not one of dynamo_dist's own (the callback
  // and the exchange helpers register theirs), so every path names the same frame
  // however many of ours sit between Dynamo and the exchange.
  PyFrameObject* f = PyEval_GetFrame();  // borrowed
  Py_XINCREF(f);
  const auto& transparent = transparent_codes();
  while (f != nullptr && !transparent.empty()) {
    PyCodeObject* code = PyFrame_GetCode(f);  // new reference
    const bool ours = transparent.count(reinterpret_cast<PyObject*>(code)) != 0;
    Py_DECREF(code);
    if (!ours) break;
    PyFrameObject* back = PyFrame_GetBack(f);  // new reference
    Py_DECREF(f);
    f = back;
  }
  uint64_t ident = mix(0x6479646973743031ULL, static_cast<uint64_t>(region));
  ident = mix(ident, grad ? 0x67726164ULL : 0x6e6f6772ULL);
  // The callee: different functions entered from one call site (resume functions
  // called from the same Dynamo-generated code) are different frames.
  ident = mix(ident, callee != nullptr ? classify(callee).hash : 0x6e6f63616c6cULL);
  if (f == nullptr) {
    return ident >> 2;
  }
  PyCodeObject* code = PyFrame_GetCode(f);  // new reference
  int lasti = frame_lasti(f);
  Py_DECREF(f);
  CodeInfo info;
  try {
    info = classify(reinterpret_cast<PyObject*>(code));
  } catch (...) {
    Py_DECREF(code);
    throw;
  }
  ident = mix(ident, info.hash);
  int used_lasti = info.use_lasti ? lasti : -1;
  ident = mix(ident, static_cast<uint64_t>(static_cast<int64_t>(used_lasti)));
  // 62 bits fit Python's int64 everywhere they travel; the exchange record (both
  // transports) carries only the low 31 (_collective._IDENT_BITS).
  ident >>= 2;
  auto& table = identity_table();
  if (table.find(ident) == table.end()) {
    Py_INCREF(code);
    Py_XINCREF(callee);
    table.emplace(ident, IdentityDesc{reinterpret_cast<PyObject*>(code), callee, used_lasti,
                                      region, grad});
  }
  Py_DECREF(code);
  return ident;
}

py::object describe_identity(uint64_t ident) {
  auto& table = identity_table();
  auto it = table.find(ident);
  if (it == table.end()) {
    return py::none();
  }
  py::object callee = it->second.callee != nullptr
                          ? py::reinterpret_borrow<py::object>(it->second.callee)
                          : py::none();
  return py::make_tuple(py::handle(it->second.code), it->second.lasti, it->second.region,
                        it->second.grad, callee);
}

void set_mode_probe(py::object fn) { mode_probe() = std::move(fn); }

void local_enter() {
  if (local_depth_++ == 0) local_threads.fetch_add(1, std::memory_order_relaxed);
}

void local_exit() {
  if (local_depth_ > 0 && --local_depth_ == 0) {
    local_threads.fetch_sub(1, std::memory_order_relaxed);
  }
}

int local_active_threads() { return local_threads.load(std::memory_order_relaxed); }

int local_depth() { return local_depth_; }

void set_code_classifier(py::object fn) {
  classifier() = std::move(fn);
}

py::object pending_error() {
  return sticky_error() ? sticky_error() : py::none();
}

void set_pending_error(py::object err) {
  sticky_error() = err.is_none() ? py::object() : std::move(err);
}

namespace {
// Dynamo calls these on every compiled call: the enter hooks (pending_check, a
// RegionEnter), their exits, and the Router after every guard evaluation. They are
// plain CPython objects with vectorcall, not pybind11 classes, whose dispatch (argument
// casters, overload records, instance lookup) cost about 60 ns per call, three times a call.

// Sets the pending exception: a fresh one each time, chained to the kept one
// (_errors.pending); re-raising the same object would grow its traceback on every call
// and keep those frames alive. Returns nullptr, for returning straight to Python.
PyObject* raise_pending() {
  try {
    py::object fresh = py::module_::import("dynamo_dist._errors").attr("pending")(sticky_error());
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(fresh.ptr())), fresh.ptr());
  } catch (py::error_already_set& e) {
    e.restore();
  }
  return nullptr;
}

PyObject* noop_exit_fn(PyObject*, PyObject*) { Py_RETURN_NONE; }

PyObject* region_exit_fn(PyObject*, PyObject*) {
  if (!region_stack.empty()) {
    PyObject* owner = region_stack.back().owner;
    region_stack.pop_back();
    Py_XDECREF(owner);
  }
  Py_RETURN_NONE;
}

PyMethodDef noop_exit_def = {"noop_exit", noop_exit_fn, METH_NOARGS, nullptr};
PyMethodDef region_exit_def = {"region_exit", region_exit_fn, METH_NOARGS,
                               "Leaves the innermost compiled region (RegionEnter's exit)."};
// Created once at module init, not as function-local statics whose first use could race.
PyObject* noop_exit_obj = nullptr;
PyObject* region_exit_obj = nullptr;

// The first enter hook of every adopted context (guard_hook.h: add_call_objects).
PyObject* pending_check_fn(PyObject*, PyObject*) {
  if (sticky_error()) return raise_pending();
  Py_INCREF(noop_exit_obj);
  return noop_exit_obj;
}

PyMethodDef pending_check_def = {
    "pending_check", pending_check_fn, METH_NOARGS,
    "Dynamo enter hook, inserted first: raises the error kept from a failed exchange."};

// _C.Router(): the installed guard-complete hook, called with one bool.
struct RouterObject {
  PyObject_HEAD
  vectorcallfunc vectorcall;
};

PyObject* router_vectorcall(PyObject*, PyObject* const* args, size_t nargsf, PyObject* kwnames) {
  if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames != nullptr && PyTuple_GET_SIZE(kwnames) != 0)) {
    PyErr_SetString(PyExc_TypeError, "Router(hit): one positional bool");
    return nullptr;
  }
  const int hit = PyObject_IsTrue(args[0]);
  if (hit < 0) return nullptr;
  return PyBool_FromLong(route(hit != 0));
}

PyObject* router_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  if (PyTuple_GET_SIZE(args) != 0 || (kwargs != nullptr && PyDict_GET_SIZE(kwargs) != 0)) {
    PyErr_SetString(PyExc_TypeError, "Router() takes no arguments");
    return nullptr;
  }
  auto* self = reinterpret_cast<RouterObject*>(type->tp_alloc(type, 0));
  if (self != nullptr) self->vectorcall = router_vectorcall;
  return reinterpret_cast<PyObject*>(self);
}

// _C.RegionEnter(region, hook=None): the enter hook that marks one compiled region.
struct RegionEnterObject {
  PyObject_HEAD
  vectorcallfunc vectorcall;
  int64_t region;
  GuardHook* hook;  // nullptr: nobody to agree with
  PyObject* hook_owner;  // the Python GuardHook, kept alive while this object lives
};

PyObject* region_enter_vectorcall(PyObject* self, PyObject* const*, size_t nargsf,
                                  PyObject* kwnames) {
  if (PyVectorcall_NARGS(nargsf) != 0 || (kwnames != nullptr && PyTuple_GET_SIZE(kwnames) != 0)) {
    PyErr_SetString(PyExc_TypeError, "RegionEnter() takes no arguments");
    return nullptr;
  }
  // In contexts dynamo_dist.compile adopted, pending_check (the first enter hook)
  // raises the sticky error before Dynamo's other enter hooks run; this is a backstop
  // for contexts without it.
  if (sticky_error()) return raise_pending();
  auto* me = reinterpret_cast<RegionEnterObject*>(self);
  try {
    region_stack.push_back(RegionFrame{me->region, me->hook, me->hook_owner});
    Py_XINCREF(me->hook_owner);
  } catch (const std::bad_alloc&) {
    return PyErr_NoMemory();
  }
  Py_INCREF(region_exit_obj);
  return region_exit_obj;
}

PyObject* region_enter_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static const char* names[] = {"region", "hook", nullptr};
  long long region = 0;
  PyObject* hook = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "L|O:RegionEnter", const_cast<char**>(names),
                                   &region, &hook)) {
    return nullptr;
  }
  GuardHook* ptr = nullptr;
  if (hook != Py_None) {
    try {
      ptr = py::handle(hook).cast<GuardHook*>();
    } catch (const py::cast_error&) {
      PyErr_SetString(PyExc_TypeError, "RegionEnter: hook must be a GuardHook or None");
      return nullptr;
    }
  }
  auto* self = reinterpret_cast<RegionEnterObject*>(type->tp_alloc(type, 0));
  if (self == nullptr) return nullptr;
  self->vectorcall = region_enter_vectorcall;
  self->region = region;
  self->hook = ptr;
  self->hook_owner = hook == Py_None ? nullptr : hook;
  Py_XINCREF(self->hook_owner);
  return reinterpret_cast<PyObject*>(self);
}

void region_enter_dealloc(PyObject* self) {
  Py_XDECREF(reinterpret_cast<RegionEnterObject*>(self)->hook_owner);
  Py_TYPE(self)->tp_free(self);
}

PyObject* region_enter_get_region(PyObject* self, void*) {
  return PyLong_FromLongLong(reinterpret_cast<RegionEnterObject*>(self)->region);
}

PyGetSetDef region_enter_getset[] = {
    {"region", region_enter_get_region, nullptr, "The compiled region's id.", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};

PyTypeObject router_type = {PyVarObject_HEAD_INIT(nullptr, 0)};
PyTypeObject region_enter_type = {PyVarObject_HEAD_INIT(nullptr, 0)};

// Readies `t`, a type whose instances are called by vectorcall, and adds it to `m`.
void vectorcall_type(py::module_& m, PyTypeObject* t, const char* name, const char* doc,
                     Py_ssize_t size, Py_ssize_t vectorcall_offset, newfunc make) {
  t->tp_name = name;
  t->tp_doc = doc;
  t->tp_basicsize = size;
  t->tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL;
  t->tp_vectorcall_offset = vectorcall_offset;
  t->tp_call = PyVectorcall_Call;
  t->tp_new = make;
  if (PyType_Ready(t) < 0) throw py::error_already_set();
  Py_INCREF(t);
  m.add_object(t->tp_name + std::strlen("dynamo_dist._C."), py::reinterpret_steal<py::object>(
                                                               reinterpret_cast<PyObject*>(t)));
}
}  // namespace

void add_call_objects(py::module_& m) {
  noop_exit_obj = PyCFunction_New(&noop_exit_def, nullptr);
  region_exit_obj = PyCFunction_New(&region_exit_def, nullptr);
  if (noop_exit_obj == nullptr || region_exit_obj == nullptr) throw py::error_already_set();
  m.add_object("pending_check", py::reinterpret_steal<py::object>(
                                    PyCFunction_New(&pending_check_def, nullptr)));
  m.add_object("region_exit", py::reinterpret_borrow<py::object>(region_exit_obj));

  vectorcall_type(m, &router_type, "dynamo_dist._C.Router",
                  "The installed guard-complete hook: Router()(hit) routes to the innermost "
                  "region's GuardHook and returns the agreed verdict.",
                  sizeof(RouterObject), offsetof(RouterObject, vectorcall), router_new);
  region_enter_type.tp_dealloc = region_enter_dealloc;
  region_enter_type.tp_getset = region_enter_getset;
  vectorcall_type(m, &region_enter_type, "dynamo_dist._C.RegionEnter",
                  "RegionEnter(region, hook=None): Dynamo enter hook marking one compiled "
                  "region; calling it returns region_exit.",
                  sizeof(RegionEnterObject), offsetof(RegionEnterObject, vectorcall),
                  region_enter_new);
}

namespace {
constexpr size_t kSamples = 8192;
constexpr size_t kFirstFrameSlots = 64;  // a power of two
}  // namespace

FrameTable::FrameTable() : slots_(kFirstFrameSlots, FrameCounts{kOther, 0, 0, 0, 0}) {}

FrameCounts& FrameTable::find(uint64_t ident) {
  if (slots_[last_].ident == ident) return slots_[last_];
  if (ident == kOther) return other_;
  size_t mask = slots_.size() - 1;
  size_t i = static_cast<size_t>(ident) & mask;
  while (slots_[i].ident != ident && slots_[i].ident != kOther) i = (i + 1) & mask;
  if (slots_[i].ident == kOther) {
    if (used_ >= kMaxFrames) return other_;
    if (2 * (used_ + 1) > slots_.size()) {
      grow();
      return find(ident);
    }
    slots_[i].ident = ident;
    ++used_;
  }
  last_ = i;
  return slots_[i];
}

void FrameTable::grow() {
  std::vector<FrameCounts> old(2 * slots_.size(), FrameCounts{kOther, 0, 0, 0, 0});
  old.swap(slots_);
  const size_t mask = slots_.size() - 1;
  for (const FrameCounts& c : old) {
    if (c.ident == kOther) continue;
    size_t i = static_cast<size_t>(c.ident) & mask;
    while (slots_[i].ident != kOther) i = (i + 1) & mask;
    slots_[i] = c;
  }
  last_ = 0;
}

void FrameTable::add(uint64_t ident, bool hit, uint64_t wait_ns) {
  FrameCounts& c = find(ident);
  ++c.exchanges;
  c.hits += hit ? 1 : 0;
  c.wait_ns += wait_ns;
  if (wait_ns > c.wait_max_ns) c.wait_max_ns = wait_ns;
}

py::list FrameTable::to_list() const {
  py::list out;
  auto put = [&out](const FrameCounts& c, py::object ident) {
    out.append(py::make_tuple(ident, c.exchanges, c.hits, c.wait_ns, c.wait_max_ns));
  };
  for (const FrameCounts& c : slots_) {
    if (c.ident != kOther) put(c, py::int_(c.ident));
  }
  if (other_.exchanges > 0) put(other_, py::int_(-1));
  return out;
}

GuardHook::GuardHook(py::object exchange) : exchange_(std::move(exchange)) {
  samples_.reserve(kSamples);
}

GuardHook::GuardHook(std::shared_ptr<ShmExchange> shm, py::object slow_path)
    : shm_(std::move(shm)), slow_path_(std::move(slow_path)) {
  samples_.reserve(kSamples);
}

bool GuardHook::thread_ok() const {
  return owner_ == 0 || owner_ == PyThread_get_thread_ident();
}

void GuardHook::release() {
  released_ = true;
  exchange_ = py::object();
  slow_path_ = py::object();
  shm_.reset();
}

bool GuardHook::exchange(bool hit, uint64_t ident) { return exchange_from(hit, ident, now_ns()); }

void GuardHook::record(uint64_t cost_ns, uint64_t wait_ns) {
  const ExchangeSample sample{cost_ns, wait_ns};
  if (samples_.size() < kSamples) {
    samples_.push_back(sample);  // within the reserved capacity
  } else {
    samples_[sample_next_] = sample;
    sample_next_ = (sample_next_ + 1) % kSamples;
  }
}

bool GuardHook::exchange_from(bool hit, uint64_t ident, uint64_t t0) {
  if (released_) return hit;
  const unsigned long me = PyThread_get_thread_ident();
  if (owner_ != me) {
    if (owner_ != 0) {
      py::object err = py::module_::import("dynamo_dist._errors").attr("wrong_thread")(owner_);
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(err.ptr())), err.ptr());
      throw py::error_already_set();
    }
    // The first thread that exchanges owns the channel: the ranks' exchanges pair one
    // to one only if each rank makes them in one order, i.e. from one thread.
    owner_ = me;
  }
  ++exchanges_;
  last_epoch_ = ++exchange_epoch;
  // Local references: the exchange may wait without the GIL, and release() (shutdown at
  // exit, say, from another thread) may drop the members meanwhile.
  if (!shm_) {
    py::object exchange = exchange_;
    py::object out = exchange(hit, ident);
    bool verdict;
    uint64_t wait_ns = 0;  // a callable that returns the verdict alone: all cost
    if (PyTuple_Check(out.ptr())) {
      auto pair = out.cast<py::tuple>();
      verdict = pair[0].cast<bool>();
      wait_ns = pair[1].cast<uint64_t>();
    } else {
      verdict = out.cast<bool>();
    }
    const uint64_t total = now_ns() - t0;
    record(total > wait_ns ? total - wait_ns : 0, wait_ns);
    frames_.add(ident, hit, wait_ns);
    return verdict;
  }
  const std::shared_ptr<ShmExchange> shm = shm_;
  py::object slow_path = slow_path_;
  const uint64_t seq = ++seq_;
  last_ident_ = ident;
  ExchangeResult r = shm->exchange(pack_record(hit, ident), seq);
  // Counted whatever the outcome; a failed exchange's wait (a timeout's, say) is no
  // sample of the exchange's cost or wait: its error reports it.
  frames_.add(ident, hit, r.waited_ns);
  if (r.status == ExchangeStatus::kOk) {
    const uint64_t total = now_ns() - t0;
    record(total > r.waited_ns ? total - r.waited_ns : 0, r.waited_ns);
    const int verdict = fast_verdict(r.word);  // pack_record/fast_verdict: guard_hook.h
    if (verdict >= 0) {
      return verdict == 1;
    }
  }
  return slow_path(static_cast<int>(r.status), seq, ident, hit, static_cast<int64_t>(r.word),
                   r.culprit, static_cast<double>(r.waited_ns) * 1e-9)
      .cast<bool>();
}

py::tuple GuardHook::samples_ns() const {
  py::list cost, wait;
  for (const ExchangeSample& s : samples_) {
    cost.append(s.cost_ns);
    wait.append(s.wait_ns);
  }
  return py::make_tuple(cost, wait);
}

bool GuardHook::call(bool hit) {
  ++evaluations_;
  if (!hit) {
    ++local_misses_;
  }
  // Only calls inside a dynamo_dist.compile region are exchanged: plain
  // torch.compile code elsewhere in the program keeps its own semantics, and
  // so does code inside dynamo_dist.local().
  if (region_stack.empty() || local_depth_ > 0) {
    return hit;
  }
  if (sticky_error()) {
    // The guard group is unusable after an error; force the frame into the
    // Python callback, which re-raises the stored error to the user.
    return false;
  }
  if (owner_ != PyThread_get_thread_ident() && owner_ != 0) {
    // Another thread owns this channel. Exchange nothing (it would interleave with
    // the owner's exchanges) and force the frame into the callback, which raises
    // _errors.wrong_thread on this thread only.
    return false;
  }
  try {
    const uint64_t t0 = now_ns();  // the exchange's cost includes computing the identity
    bool verdict = exchange_from(hit, current_identity(pending_callee_code()), t0);
    if (hit && !verdict) {
      ++forced_recompiles_;
    }
    return verdict;
  } catch (py::error_already_set& e) {
    sticky_error() = e.value();
  } catch (const std::exception& e) {
    sticky_error() = py::module_::import("builtins").attr("RuntimeError")(e.what());
  }
  return false;
}

py::dict GuardHook::counters() const {
  py::dict d;
  d["evaluations"] = evaluations_;
  d["local_misses"] = local_misses_;
  d["forced_recompiles"] = forced_recompiles_;
  d["hook_exchanges"] = exchanges_;
  return d;
}

bool route(bool hit) {
  if (region_stack.empty() || local_depth_ > 0 || region_stack.back().hook == nullptr) {
    return hit;
  }
  return region_stack.back().hook->call(hit);
}

}  // namespace dynamo_dist
