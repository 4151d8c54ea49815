// Thread-count control: one knob for bnrelu's OpenMP loops and Eigen's GEMM.
#pragma once

#ifdef _OPENMP
#include <omp.h>
#endif

#include <string>

#include <Eigen/Core>

#include "error.hpp"

#ifdef BNRELU_OPENBLAS
extern "C" void openblas_set_num_threads(int);
#endif

namespace bnrelu {

namespace detail {
// In an OpenBLAS build (CMake BNRELU_USE_BLAS) Eigen's products run inside bnrelu's own
// parallel loops (one image per thread), where OpenBLAS's threads would oversubscribe the
// cores (measured: 253 instead of 1818 training images/s on two threads). bnrelu threads at
// its own level and keeps OpenBLAS on one thread, once per process.
inline void keep_blas_single_threaded() {
#ifdef BNRELU_OPENBLAS
  [[maybe_unused]] static const bool once = (openblas_set_num_threads(1), true);
#endif
}
}  // namespace detail

// Threads used by kernels and products. Defaults to OMP_NUM_THREADS where set, else the
// cores; 1 in a build without OpenMP.
inline int num_threads() {
  detail::keep_blas_single_threaded();
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline void set_num_threads(int n) {
  if (n < 1) throw shape_error("set_num_threads: expected n >= 1, got " + std::to_string(n));
  detail::keep_blas_single_threaded();
#ifdef _OPENMP
  omp_set_num_threads(n);
#endif
  Eigen::setNbThreads(n);
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
}  // namespace detail

}  // namespace bnrelu
