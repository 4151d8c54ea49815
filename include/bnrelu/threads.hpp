// Thread-count control: one knob for bnrelu's OpenMP loops and Eigen's GEMM.
#pragma once

#include <omp.h>

#include <Eigen/Core>

#include "error.hpp"

namespace bnrelu {

// Threads used by kernels and products. Defaults to OMP_NUM_THREADS where set, else the cores.
inline int num_threads() { return omp_get_max_threads(); }

inline void set_num_threads(int n) {
  if (n < 1) throw shape_error("set_num_threads: expected n >= 1, got " + std::to_string(n));
  omp_set_num_threads(n);
  Eigen::setNbThreads(n);
}

}  // namespace bnrelu
