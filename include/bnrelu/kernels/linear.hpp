// Fully-connected arithmetic over Eigen's GEMM, and its matrix-vector products for small batches.
//
// Each product is cut into column blocks (output features for y, input features for dx and
// dweight), spread over the threads. The cut depends on the matrix sizes (and for small batches
// the L2 size) alone, never on the thread count, and each block is one single-threaded product of
// the same shape whichever thread runs it, so every result is the same for any thread count.
//
// A GEMM copies (packs) its operands into panels before multiplying. For a batch of a few rows
// that copy of the whole weight costs more than the multiplication: a batch of at most
// kRowBatch rows multiplies each row by the weight as a matrix-vector product instead, over
// blocks of the weight small enough to stay in L2 while every row of the batch passes.
#pragma once

#include <algorithm>

#include "../detail/eigen.hpp"
#include "../tensor.hpp"
#include "../threads.hpp"
#include "matrix.hpp"
#include "tuning.hpp"

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

// Batches of at most this many rows take the matrix-vector path.
inline constexpr Index kRowBatch = 8;
// The matrix-vector path's blocks: as many weight rows (or columns) of `length` elements as fill
// a quarter of L2, at most 64, a multiple of 8 when there are 8 or more.
template <class T>
Index row_batch_block(Index length) {
  const Index fit = l2_bytes() / 4 / std::max<Index>(1, length * Index{sizeof(T)});
  const Index rows = std::clamp<Index>(fit, 1, 64);
  return rows >= 8 ? rows / 8 * 8 : rows;
}

// f(begin, width) for the blocks of [0, n) of the given width, on up to num_threads() threads.
template <class F>
void linear_blocks(Index n, Index width, F&& f) {
  const Index blocks = (n + width - 1) / width;
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
  const bool rows = N <= detail::kRowBatch;
  const Index width = rows ? detail::row_batch_block<T>(I) : detail::linear_block_width(O);
  detail::linear_blocks(O, width, [&](Index o0, Index w) {
    auto yb = ym.middleCols(o0, w);
    if (rows) {  // y[n] = W x[n], the weight block staying in L2 across the rows
      for (Index n = 0; n < N; ++n) yb.row(n).transpose().noalias() = wm.middleRows(o0, w) * xm.row(n).transpose();
    } else {
      yb.noalias() = xm * wm.middleRows(o0, w).transpose();
    }
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
  const bool rows = N <= detail::kRowBatch;
  const Index width = rows ? detail::row_batch_block<T>(O) : detail::linear_block_width(I);
  detail::linear_blocks(I, width, [&](Index i0, Index w) {
    if (dx && rows) {  // dx[n] = W^T dy[n], over the weight's columns [i0, i0 + w)
      MatrixMap<T> dxm(dx, N, I);
      for (Index n = 0; n < N; ++n)
        dxm.row(n).segment(i0, w).transpose().noalias() = wm.middleCols(i0, w).transpose() * dym.row(n).transpose();
    } else if (dx) {
      MatrixMap<T>(dx, N, I).middleCols(i0, w).noalias() = dym * wm.middleCols(i0, w);
    }
    dwm.middleCols(i0, w).noalias() += dym.transpose() * xm.middleCols(i0, w);
  });
  if (dbias) Eigen::Map<Eigen::RowVector<T, Eigen::Dynamic>>(dbias, O) += dym.colwise().sum();
}

}  // namespace bnrelu::kernels
