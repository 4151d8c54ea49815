// One single-threaded matrix product through Eigen's GEMM kernel, packing into buffers that the
// calling thread keeps from call to call.
//
// Eigen's product expressions allocate their packing buffers on every call (on the heap above
// EIGEN_STACK_ALLOCATION_LIMIT), and in a parallel loop each thread's allocations come and go
// in its own malloc arena. Here the blocking sizes are the ones Eigen's single-threaded product
// computes (computeProductBlockingSizes) and the kernel is Eigen's, but the packed panels live
// in per-thread buffers that only grow: a steady-state caller allocates nothing.
#pragma once

#include <vector>

#include "../detail/eigen.hpp"
#include "../tensor.hpp"

namespace bnrelu::kernels {

// A matrix operand: data, leading dimension (elements between rows of a row-major matrix, or
// columns of a column-major one), and storage order.
template <class T>
struct MatrixView {
  const T* data;
  Index stride;
  bool row_major;
};

namespace detail {

// Eigen's level-3 blocking, pointed at this thread's buffers.
template <class T>
class KeptBlocking : public Eigen::internal::level3_blocking<T, T> {
 public:
  // For the column-major problem [rows x depth] * [depth x cols].
  KeptBlocking(Index rows, Index cols, Index depth) {
    this->m_mc = rows;
    this->m_nc = cols;
    this->m_kc = depth;
    Eigen::internal::computeProductBlockingSizes<T, T, 1>(this->m_kc, this->m_mc, this->m_nc, Index{1});
    thread_local std::vector<T, Eigen::aligned_allocator<T>> a, b;
    const auto size_a = static_cast<std::size_t>(this->m_mc * this->m_kc);
    const auto size_b = static_cast<std::size_t>(this->m_kc * this->m_nc);
    if (a.size() < size_a) a.resize(size_a);
    if (b.size() < size_b) b.resize(size_b);
    this->m_blockA = a.data();
    this->m_blockB = b.data();
  }
};

template <class T, int LhsOrder, int RhsOrder>
void gemm_colmajor(Index rows, Index cols, Index depth, const T* lhs, Index lhs_stride, const T* rhs, Index rhs_stride,
                   T* res, Index res_stride) {
  KeptBlocking<T> blocking(rows, cols, depth);
  Eigen::internal::general_matrix_matrix_product<Index, T, LhsOrder, false, T, RhsOrder, false, Eigen::ColMajor, 1>::run(
      rows, cols, depth, lhs, lhs_stride, rhs, rhs_stride, res, 1, res_stride, T(1), blocking);
}

}  // namespace detail

// c += a * b, with a: [m, k], b: [k, n], c: [m, n] row-major with leading dimension ldc.
// Runs on the calling thread alone.
template <class T>
void gemm_accumulate(Index m, Index n, Index k, MatrixView<T> a, MatrixView<T> b, T* c, Index ldc) {
  if (m == 0 || n == 0 || k == 0) return;
  // c row-major is c^T column-major: c^T += b^T * a^T, where a row-major operand is its
  // transpose column-major (and the other way round)
  using Eigen::ColMajor, Eigen::RowMajor;
  if (b.row_major && a.row_major)
    detail::gemm_colmajor<T, ColMajor, ColMajor>(n, m, k, b.data, b.stride, a.data, a.stride, c, ldc);
  else if (b.row_major)
    detail::gemm_colmajor<T, ColMajor, RowMajor>(n, m, k, b.data, b.stride, a.data, a.stride, c, ldc);
  else if (a.row_major)
    detail::gemm_colmajor<T, RowMajor, ColMajor>(n, m, k, b.data, b.stride, a.data, a.stride, c, ldc);
  else
    detail::gemm_colmajor<T, RowMajor, RowMajor>(n, m, k, b.data, b.stride, a.data, a.stride, c, ldc);
}

}  // namespace bnrelu::kernels
