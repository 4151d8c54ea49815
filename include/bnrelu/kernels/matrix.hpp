// Row-major Eigen matrix maps over raw pointers, for kernels that hand products to Eigen.
#pragma once

#include "../detail/eigen.hpp"

namespace bnrelu::kernels {

template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using MatrixMap = Eigen::Map<RowMatrix<T>>;
template <class T>
using ConstMatrixMap = Eigen::Map<const RowMatrix<T>>;
// The same with rows a given number of elements apart (Eigen::OuterStride<>(stride)).
template <class T>
using StridedMatrixMap = Eigen::Map<RowMatrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using ConstStridedMatrixMap = Eigen::Map<const RowMatrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

}  // namespace bnrelu::kernels
