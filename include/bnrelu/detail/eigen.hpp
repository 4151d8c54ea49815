// Eigen, as bnrelu includes it: with Eigen's own OpenMP threading of matrix products off.
//
// bnrelu threads at its own level (images, channels, blocks of output features) and runs every
// Eigen product on the thread that calls it. Eigen's threaded GEMM splits a product by its
// thread count, which changes the rounding of the result; with it off, every output and input
// gradient is the same whatever the thread count. The CMake target defines
// EIGEN_DONT_PARALLELIZE for its users; this header defines it for everyone else, and stops a
// build that included Eigen earlier with its threading on.
#pragma once

#if defined(EIGEN_CORE_H) && defined(_OPENMP) && !defined(EIGEN_DONT_PARALLELIZE)
#error "bnrelu: Eigen was included before bnrelu with its OpenMP threading on; include bnrelu first or define EIGEN_DONT_PARALLELIZE"
#endif
#ifndef EIGEN_DONT_PARALLELIZE
#define EIGEN_DONT_PARALLELIZE
#endif

#include <Eigen/Core>
