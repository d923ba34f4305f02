// What the two waiting exchanges (shared memory within a host, the leaders' rounds
// across hosts) share: the CPU's spin hint, the clock, how often a blocked wait lets
// Python run signal handlers, and which thread may run them.
#pragma once

#include <pybind11/pybind11.h>

#include <chrono>
#include <cstdint>

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

// Blocking waits are sliced so that signal handlers (Ctrl-C, a preemption's SIGTERM)
// run at least this often.
constexpr double kSignalCheckS = 0.05;

// Monotonic nanoseconds, the same clock as now_s(): the hook's cost and wait samples.
inline uint64_t now_ns() {
  using namespace std::chrono;
  return static_cast<uint64_t>(
      duration_cast<nanoseconds>(steady_clock::now().time_since_epoch()).count());
}

// Monotonic seconds: deadlines and waited times, never wall-clock time.
inline double now_s() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

// Python's main thread, the only one that runs signal handlers (call with the GIL).
inline unsigned long python_main_thread() {
  namespace py = pybind11;
  return py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
}

}  // namespace dynamo_dist
