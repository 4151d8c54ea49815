// MPI for bnrelu::dist: initialisation, the process's rank and the number of ranks, a sum
// over ranks, and the helpers the other dist headers call MPI through.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <limits>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "../tensor.hpp"

namespace bnrelu::dist {

namespace detail {
inline void check(int code, const char* what) {
  if (code != MPI_SUCCESS) {
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(code, text, &len);
    throw std::runtime_error(std::string("bnrelu::dist: ") + what + " failed: " + std::string(text, static_cast<std::size_t>(len)));
  }
}

// Sums data over all ranks in place, in pieces that fit MPI's int counts.
template <class T>
void allreduce_sum(T* data, std::size_t n, MPI_Datatype type, const char* what) {
  constexpr std::size_t kMax = 1u << 30;
  for (std::size_t done = 0; done < n; done += kMax)
    check(MPI_Allreduce(MPI_IN_PLACE, data + done, static_cast<int>(std::min(kMax, n - done)), type, MPI_SUM,
                        MPI_COMM_WORLD),
          what);
}

// Whether any parameter is marked.
inline bool any_marked(const std::vector<bool>& marks) { return std::find(marks.begin(), marks.end(), true) != marks.end(); }

template <class T>
MPI_Datatype mpi_type() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "float or double");
  return std::is_same_v<T, float> ? MPI_FLOAT : MPI_DOUBLE;
}
}  // namespace detail

// Whether MPI is running (initialised and not finalised).
inline bool running() {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  return init && !fin;
}

inline int rank() {
  int r = 0;
  if (running()) MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

inline int size() {
  int s = 1;
  if (running()) MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

// The sum of v over all ranks (such as a count or a loss sum), the same on every rank.
inline double sum_over_ranks(double v) {
  detail::allreduce_sum(&v, 1, MPI_DOUBLE, "MPI_Allreduce of a scalar");
  return v;
}

// Initialises MPI (unless something else did) and finalises it on destruction. Threads inside
// a rank (OpenMP) never call MPI, so MPI_THREAD_FUNNELED is enough.
//
// Unless the environment already sets it, Open MPI's shared-memory transport is told to copy
// through its shared buffers instead of its single-copy (CMA) path, which bench_dist measures
// faster for the gradient allreduce between ranks of a machine (docs/distributed.md). Other
// MPI libraries ignore the variable.
class Environment {
 public:
  Environment(int* argc, char*** argv) {
    if (running()) return;
    ::setenv("OMPI_MCA_btl_vader_single_copy_mechanism", "none", 0);
    int provided = 0;
    detail::check(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
    owns_ = true;
    if (provided < MPI_THREAD_FUNNELED) {
      MPI_Finalize();
      owns_ = false;
      throw std::runtime_error("bnrelu::dist: the MPI library does not provide MPI_THREAD_FUNNELED");
    }
  }
  ~Environment() {
    if (owns_ && running()) MPI_Finalize();
  }
  Environment(const Environment&) = delete;
  Environment& operator=(const Environment&) = delete;

  int rank() const { return dist::rank(); }
  int size() const { return dist::size(); }

 private:
  bool owns_ = false;
};

}  // namespace bnrelu::dist
