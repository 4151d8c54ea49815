// Fully-connected arithmetic over Eigen's GEMM.
#pragma once

#include <Eigen/Core>

#include "../tensor.hpp"
#include "conv2d.hpp"  // RowMatrix maps

namespace bnrelu::kernels {

// y = x * weight^T + bias.  x: [N, I]; weight: [O, I]; bias: [O] or null; y: [N, O]
template <class T>
void linear_forward(T* y, const T* x, const T* weight, const T* bias, Index N, Index I, Index O) {
  if (N == 0) return;  // an empty batch has null data pointers, which Eigen must not offset
  MatrixMap<T> ym(y, N, O);
  ym.noalias() = ConstMatrixMap<T>(x, N, I) * ConstMatrixMap<T>(weight, O, I).transpose();
  if (bias) ym.rowwise() += Eigen::Map<const Eigen::RowVector<T, Eigen::Dynamic>>(bias, O);
}

// dx = dy * weight (skipped when dx is null);  dweight += dy^T * x;  dbias += column sums of dy.
template <class T>
void linear_backward(T* dx, T* dweight, T* dbias, const T* dy, const T* x, const T* weight,
                     Index N, Index I, Index O) {
  if (N == 0) return;  // nothing to add, and null data pointers
  ConstMatrixMap<T> dym(dy, N, O);
  if (dx) MatrixMap<T>(dx, N, I).noalias() = dym * ConstMatrixMap<T>(weight, O, I);
  MatrixMap<T>(dweight, O, I).noalias() += dym.transpose() * ConstMatrixMap<T>(x, N, I);
  if (dbias) Eigen::Map<Eigen::RowVector<T, Eigen::Dynamic>>(dbias, O) += dym.colwise().sum();
}

}  // namespace bnrelu::kernels
