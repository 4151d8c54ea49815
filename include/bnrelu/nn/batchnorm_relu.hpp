// Fused BatchNorm + ReLU: the same options, parameters, buffers and names as BatchNorm, with
// y = max(0, batchnorm(x)) computed in one pass forward and one pass backward.
#pragma once

#include "batchnorm.hpp"

namespace bnrelu::nn {

template <class T>
class BatchNormReLU2d : public detail::BatchNormBase<T, 4> {
  using Base = detail::BatchNormBase<T, 4>;

 public:
  static constexpr bool applies_relu = true;
  explicit BatchNormReLU2d(const BatchNormOptions& opt) : Base(opt, "BatchNormReLU2d") {}
  Tensor<T, 4> forward(const Tensor<T, 4>& x) { return this->forward_impl(x, nullptr, true); }
  Tensor<T, 4> forward(Tensor<T, 4>&& x) { return this->forward_impl(x, &x, true); }
  Tensor<T, 4> infer(const Tensor<T, 4>& x) const { return this->infer_impl(x, true); }
  Tensor<T, 4> backward(const Tensor<T, 4>& dy) { return this->backward_impl(dy, true); }
  Tensor<T, 4> backward(Tensor<T, 4>&& dy) { return this->backward_impl(std::move(dy), true); }
};

template <class T>
class BatchNormReLU1d : public detail::BatchNormBase<T, 2> {
  using Base = detail::BatchNormBase<T, 2>;

 public:
  static constexpr bool applies_relu = true;
  explicit BatchNormReLU1d(const BatchNormOptions& opt) : Base(opt, "BatchNormReLU1d") {}
  Tensor<T, 2> forward(const Tensor<T, 2>& x) { return this->forward_impl(x, nullptr, true); }
  Tensor<T, 2> forward(Tensor<T, 2>&& x) { return this->forward_impl(x, &x, true); }
  Tensor<T, 2> infer(const Tensor<T, 2>& x) const { return this->infer_impl(x, true); }
  Tensor<T, 2> backward(const Tensor<T, 2>& dy) { return this->backward_impl(dy, true); }
  Tensor<T, 2> backward(Tensor<T, 2>&& dy) { return this->backward_impl(std::move(dy), true); }
};

}  // namespace bnrelu::nn
