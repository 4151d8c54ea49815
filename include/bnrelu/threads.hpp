// Thread-count control: one knob for bnrelu's OpenMP loops (Eigen's products run inside them).
#pragma once

#ifdef _OPENMP
#include <omp.h>
#endif

#include <atomic>
#include <string>

#include "error.hpp"

#ifdef BNRELU_OPENBLAS
extern "C" void openblas_set_num_threads(int);
#endif

namespace bnrelu {

namespace detail {
// In an OpenBLAS build (CMake BNRELU_USE_BLAS) Eigen's products run inside bnrelu's own
// parallel loops (one image per thread), where OpenBLAS's threads would oversubscribe the
// cores. bnrelu threads at its own level and keeps OpenBLAS on one thread, once per process.
inline void keep_blas_single_threaded() {
#ifdef BNRELU_OPENBLAS
  [[maybe_unused]] static const bool once = (openblas_set_num_threads(1), true);
#endif
}
}  // namespace detail

namespace detail {
// The thread count, one for the process: set_num_threads on any std::thread changes it for
// every thread (OpenMP's own setting, omp_set_num_threads, belongs to the thread that calls it).
// Every parallel region of bnrelu asks for num_threads() explicitly.
inline std::atomic<int>& thread_count() {
#ifdef _OPENMP
  static std::atomic<int> n{omp_get_max_threads()};
#else
  static std::atomic<int> n{1};
#endif
  return n;
}
}  // namespace detail

// The most threads set_num_threads takes.
inline constexpr int kMaxThreads = 1024;

// Threads used by kernels and products. Defaults to OMP_NUM_THREADS where set, else the
// cores; 1 in a build without OpenMP.
inline int num_threads() {
  detail::keep_blas_single_threaded();
  return detail::thread_count().load(std::memory_order_relaxed);
}

// Sets the thread count for every thread of the process. A call made while another thread runs
// bnrelu code takes effect at that thread's next parallel loop. shape_error unless
// 1 <= n <= kMaxThreads.
inline void set_num_threads(int n) {
  if (n < 1 || n > kMaxThreads)
    throw shape_error("set_num_threads: expected 1 <= n <= " + std::to_string(kMaxThreads) + ", got " + std::to_string(n));
  detail::keep_blas_single_threaded();
  detail::thread_count().store(n, std::memory_order_relaxed);
}

namespace detail {
// The calling thread's index inside a parallel region (0 outside one).
inline int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
// The number of threads in the calling thread's team (1 outside a parallel region).
inline int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}
}  // namespace detail

}  // namespace bnrelu
