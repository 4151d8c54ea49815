// Fully-connected arithmetic over Eigen's GEMM.
//
// Each product is cut into column blocks (output features for y, input features for dx and
// dweight), spread over the threads. The cut depends on the matrix sizes alone, never on the
// thread count, and each block is one single-threaded GEMM of the same shape whichever thread
// runs it, so every result is the same for any thread count.
#pragma once

#include <algorithm>

#include "../detail/eigen.hpp"
#include "../tensor.hpp"
#include "../threads.hpp"
#include "matrix.hpp"

namespace bnrelu::kernels {

namespace detail {
// The blocks of n columns: at least kMinWidth columns each (a GEMM too narrow repacks its other
// operand for little work), at most kMaxBlocks of them (each packs its operands anew), and a
// width that is a multiple of 16 (whole vectors, whatever the ISA).
inline constexpr Index kMinWidth = 256, kMaxBlocks = 8;
inline Index linear_block_width(Index n) {
  const Index blocks = std::clamp<Index>(n / kMinWidth, 1, kMaxBlocks);
  return ((n + blocks - 1) / blocks + 15) / 16 * 16;
}

// f(begin, width) for the blocks of [0, n), on up to num_threads() threads.
template <class F>
void linear_blocks(Index n, F&& f) {
  const Index width = linear_block_width(n), blocks = (n + width - 1) / width;
  const int threads = static_cast<int>(std::min<Index>(bnrelu::num_threads(), blocks));
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (Index b = 0; b < blocks; ++b) {
    const Index begin = b * width;
    f(begin, std::min(width, n - begin));
  }
}
}  // namespace detail

// y = x * weight^T + bias.  x: [N, I]; weight: [O, I]; bias: [O] or null; y: [N, O]
template <class T>
void linear_forward(T* y, const T* x, const T* weight, const T* bias, Index N, Index I, Index O) {
  if (N == 0) return;  // an empty batch has null data pointers, which Eigen must not offset
  MatrixMap<T> ym(y, N, O);
  ConstMatrixMap<T> xm(x, N, I), wm(weight, O, I);
  detail::linear_blocks(O, [&](Index o0, Index w) {
    auto yb = ym.middleCols(o0, w);
    yb.noalias() = xm * wm.middleRows(o0, w).transpose();
    if (bias) yb.rowwise() += Eigen::Map<const Eigen::RowVector<T, Eigen::Dynamic>>(bias + o0, w);
  });
}
// dx = dy * weight (skipped when dx is null);  dweight += dy^T * x;  dbias += column sums of dy.
// Blocks of input features: dx's columns and dweight's columns.
template <class T>
void linear_backward(T* dx, T* dweight, T* dbias, const T* dy, const T* x, const T* weight,
                     Index N, Index I, Index O) {
  if (N == 0) return;  // nothing to add, and null data pointers
  ConstMatrixMap<T> dym(dy, N, O), xm(x, N, I), wm(weight, O, I);
  MatrixMap<T> dwm(dweight, O, I);
  detail::linear_blocks(I, [&](Index i0, Index w) {
    if (dx) MatrixMap<T>(dx, N, I).middleCols(i0, w).noalias() = dym * wm.middleCols(i0, w);
    dwm.middleCols(i0, w).noalias() += dym.transpose() * xm.middleCols(i0, w);
  });
  if (dbias) Eigen::Map<Eigen::RowVector<T, Eigen::Dynamic>>(dbias, O) += dym.colwise().sum();
}

}  // namespace bnrelu::kernels
