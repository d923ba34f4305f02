// Python bindings for dynamo_dist._C. Thin on purpose: policy, I/O and error
// reporting live in Python; C++ keeps only what runs on every compiled call.
#include <pybind11/pybind11.h>

#include "guard_hook.h"

namespace py = pybind11;
using namespace dynamo_dist;

PYBIND11_MODULE(_C, m) {
  m.doc() = "dynamo_dist native core: the Dynamo guard-complete hook and frame identities.";

  py::class_<GuardHook>(m, "GuardHook", "Callable installed as Dynamo's guard-complete hook.")
      .def(py::init<py::object>(), py::arg("exchange"),
           "exchange(hit: bool, ident: int) -> bool is called for every guard result.")
      .def("__call__", &GuardHook::call, py::arg("hit"),
           "Dynamo's entry point: returns the verdict agreed by all ranks (False forces a recompile).")
      .def("counters", &GuardHook::counters, "This rank's hook counters as a dict.")
      .def_property("enabled", &GuardHook::enabled, &GuardHook::set_enabled,
                    "When False the hook passes the local result through.");

  py::class_<RegionEnter>(m, "RegionEnter", "Dynamo enter/exit hook that marks a compiled region.")
      .def(py::init<int64_t>(), py::arg("region"))
      .def("__call__", &RegionEnter::call)
      .def_property_readonly("region", &RegionEnter::region);
  py::class_<RegionExit>(m, "RegionExit").def("__call__", &RegionExit::call);

  m.def("pending_error", &pending_error,
        "The exception kept from a failed exchange (raised on the next compiled call), or None.");
  m.def("set_pending_error", &set_pending_error, py::arg("error"),
        "Set (or clear, with None) the exception raised on the next compiled call.");
  m.def("current_identity", &current_identity, py::arg("skip") = 0,
        "62-bit identity of the frame about to run (caller code, call site, region).");
  m.def("describe_identity", &describe_identity, py::arg("ident"),
        "(caller code, lasti, region) for an identity seen on this process, or None.");
  m.def("set_code_classifier", &set_code_classifier, py::arg("fn"),
        "fn(code) -> (stable hash, use_lasti); called once per caller code object.");
}
