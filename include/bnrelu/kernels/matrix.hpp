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

}  // namespace bnrelu::kernels
