// Python bindings for dynamo_dist._C. Thin on purpose: policy, I/O and error
// reporting live in Python; C++ keeps only what runs on every compiled call.
#include <pybind11/pybind11.h>

#include <pybind11/stl.h>

#include "guard_hook.h"
#include "leader_rounds.h"
#include "shm_exchange.h"

#ifndef DYNAMO_DIST_VERSION
#error "build with setup.py: it defines DYNAMO_DIST_VERSION from dynamo_dist/_version.py"
#endif

namespace py = pybind11;
using namespace dynamo_dist;

PYBIND11_MODULE(_C, m) {
  m.doc() = "dynamo_dist native core: the Dynamo guard-complete hook and frame identities.";
  // setup.py passes the package version (dynamo_dist/_version.py); _hook.py refuses a
  // mismatch so a stale in-tree build fails at import with a clear message.
  m.attr("__version__") = DYNAMO_DIST_VERSION;

  py::class_<ShmExchange, std::shared_ptr<ShmExchange>>(
      m, "ShmExchange", "Intra-host guard exchange through a shared-memory segment.")
      .def(py::init<const std::string&, bool, int, int, bool, double, double>(), py::arg("name"),
           py::arg("create"), py::arg("local_rank"), py::arg("local_world"),
           py::arg("hierarchical"), py::arg("timeout"), py::arg("log_interval"))
      .def("unlink", &ShmExchange::unlink, "Remove the segment's name (leader, once all attached).")
      .def("abort", &ShmExchange::abort, "Make local ranks stop waiting.")
      .def("set_cross_host", &ShmExchange::set_cross_host, py::arg("fn"),
           "Leader: fn(word) -> word ANDed over hosts.")
      .def("set_cross_host_native", &ShmExchange::set_cross_host_native, py::arg("rounds"),
           py::arg("on_failure"),
           "Leader: run the cross-host step as rounds (a LeaderRounds, None: back to "
           "set_cross_host's fn); on_failure(status, value, peer, waited) must raise.")
      .def("set_wait_logger", &ShmExchange::set_wait_logger, py::arg("fn"))
      .def("waiting_for", &ShmExchange::waiting_for,
           "Seconds the exchange in progress has waited, or -1 (for the status thread).")
      .def("set_cpus", &ShmExchange::set_cpus, py::arg("cpus"),
           "CPUs the host's local ranks may run on (union of affinities): sets the spin policy.")
      .def_property_readonly("spin_s", &ShmExchange::spin_s)
      .def_static("creator_alive", &ShmExchange::creator_alive, py::arg("name"),
                  "Whether segment name's creator holds its lease (None: not readable as one).")
      .def_property_readonly("name", &ShmExchange::name);

  py::class_<LeaderRounds, std::shared_ptr<LeaderRounds>>(
      m, "LeaderRounds",
      "The host leaders' rounds over connected sockets, run natively without the GIL.")
      .def(py::init<int, int, std::vector<LeaderRounds::Round>, std::map<int, int>, double>(),
           py::arg("me"), py::arg("hosts"), py::arg("rounds"), py::arg("fds"),
           py::arg("busy_poll_s"),
           "rounds[r] = (send_to, recv_from) host indices; fds[host] = a connected socket's fd "
           "for every host a round names (the caller keeps and closes them).")
      .def(
          "exchange",
          [](LeaderRounds& self, py::int_ word, double timeout) {
            // Any int the caller has (record.pack's signed words, or unsigned
            // ones) as its 64 bits.
            const uint64_t w = PyLong_AsUnsignedLongLongMask(word.ptr());
            if (PyErr_Occurred()) throw py::error_already_set();
            const bool signals = self.on_main_thread();
            NativeResult r;
            {
              py::gil_scoped_release nogil;
              r = self.exchange_nogil(w, timeout, signals);
            }
            return py::make_tuple(r.status, static_cast<int64_t>(r.value), r.peer, r.waited_s);
          },
          py::arg("word"), py::arg("timeout"),
          "(status, value, peer, waited): status 0 ok (value: the AND over hosts, signed), "
          "1 timeout, 2 closed, 3 poisoned (value: the notice's code), 4 malformed; peer: the "
          "host named, or -1. After a failure every call returns that failure again.")
      .def("waiting_for", &LeaderRounds::waiting_for,
           "Seconds the exchange in progress has waited, or -1 (for the status thread).")
      .def_property_readonly("seq", &LeaderRounds::seq, "Exchanges made so far.")
      .def_property_readonly("me", &LeaderRounds::me)
      .def_property_readonly("hosts", &LeaderRounds::hosts)
      .def_property_readonly("num_rounds", &LeaderRounds::num_rounds);
  m.attr("POISON") = py::int_(kPoison);
  m.attr("POISON_TIMEOUT") = py::int_(kPoisonTimeout);
  m.attr("SUSPECT") = py::int_(kSuspectMask);

  py::class_<GuardHook>(m, "GuardHook", "Callable installed as Dynamo's guard-complete hook.")
      .def(py::init<py::object>(), py::arg("exchange"),
           "exchange(hit: bool, ident: int) -> bool, or (bool, waited_ns), is called for every "
           "guard result.")
      .def(py::init<std::shared_ptr<ShmExchange>, py::object>(), py::arg("shm"),
           py::arg("slow_path"),
           "Shared-memory fast path; slow_path(status, seq, ident, hit, word, culprit, waited) "
           "decides the rare cases in Python.")
      .def("exchange", &GuardHook::exchange, py::arg("hit"), py::arg("ident"),
           "One exchange (may raise): for frames Dynamo has no entries for yet.")
      .def("thread_ok", &GuardHook::thread_ok,
           "Whether this thread may exchange on the channel (it owns it, or nobody does yet).")
      .def("release", &GuardHook::release,
           "Shutdown: drop the transport callables; the hook then passes results through.")
      .def_property_readonly("owner_thread", &GuardHook::owner_thread)
      .def_property_readonly("seq", &GuardHook::seq)
      .def_property_readonly("last_ident", &GuardHook::last_ident)
      .def_property_readonly("last_epoch", &GuardHook::last_epoch)
      .def("samples_ns", &GuardHook::samples_ns,
           "(cost, wait): pairwise lists of the last 8192 completed exchanges' own cost and "
           "wait for the other ranks, in nanoseconds.")
      .def("frames", &GuardHook::frames,
           "[(ident, exchanges, hits, wait_ns, wait_max_ns)] per frame identity exchanged; "
           "ident -1: the identities beyond the first 4096, together.")
      .def("__call__", &GuardHook::call, py::arg("hit"),
           "Dynamo's entry point: returns the verdict agreed by all ranks (False forces a recompile).")
      .def("counters", &GuardHook::counters, "This rank's hook counters as a dict.");

  add_call_objects(m);  // Router, RegionEnter, region_exit, pending_check

  m.def("pending_error", &pending_error,
        "The exception kept from a failed exchange (raised on the next compiled call), or None.");
  m.def("set_pending_error", &set_pending_error, py::arg("error"),
        "Set (or clear, with None) the exception raised on the next compiled call.");
  m.def(
      "current_identity",
      [](py::object callee) {
        return current_identity(callee.is_none() ? nullptr : callee.ptr());
      },
      py::arg("callee") = py::none(),
      "Identity of the call about to run: callee code, the innermost caller that is not a "
      "transparent frame (its code and call site), region, grad mode. The exchange record "
      "carries its low 31 bits.");
  m.def(
      "add_transparent",
      [](py::object code) {
        if (!PyCode_Check(code.ptr())) throw py::type_error("add_transparent: a code object");
        add_transparent(code.ptr());
      },
      py::arg("code"),
      "Mark frames running ``code`` as dynamo_dist's own: identities look past them.");
  m.attr("HAS_CALLEE_PROBE") = py::bool_(has_callee_probe());
  m.def(
      "_pending_callee_code",
      []() -> py::object {
        PyObject* c = pending_callee_code();
        return c != nullptr ? py::reinterpret_borrow<py::object>(c) : py::none();
      },
      "The code the hook would take for the callee now (for tests; None outside the hook).");
  m.def("describe_identity", &describe_identity, py::arg("ident"),
        "(caller code, lasti, region, grad_enabled, callee code or None) for an identity seen on "
        "this process, or None.");
  m.def("_pack_record", &pack_record, py::arg("hit"), py::arg("ident"),
        "The fast path's record for (hit, ident), as an unsigned 64-bit int; for tests.");
  m.def("_fast_verdict", &fast_verdict, py::arg("word"),
        "The fast path's decision on an AND-reduced word: 1 all hit, 0 all missed, -1 the "
        "slow path decides; for tests.");
  m.def("set_mode_probe", &set_mode_probe, py::arg("fn"),
        "fn() -> bool (torch.is_grad_enabled): mixed into every frame identity.");
  m.def("local_enter", &local_enter, "Enter dynamo_dist.local() on this thread.");
  m.def("local_exit", &local_exit, "Leave dynamo_dist.local() on this thread.");
  m.def("local_depth", &local_depth, "How deep this thread is inside dynamo_dist.local().");
  m.def("local_active_threads", &local_active_threads,
        "How many threads of this process are inside dynamo_dist.local() now.");
  m.def("set_code_classifier", &set_code_classifier, py::arg("fn"),
        "fn(code) -> (stable hash, use_lasti); called once per caller code object.");
}
