// Fully-connected layer: y = x * weight^T + bias.
#pragma once

#include <vector>

#include "../kernels/linear.hpp"
#include "layer.hpp"
#include "weighted.hpp"

namespace bnrelu::nn {

struct LinearOptions {
  Index in_features = 0;
  Index out_features = 0;
  bool bias = true;
};

namespace detail {
inline const LinearOptions& checked(const LinearOptions& opt) {
  check_option(opt.in_features > 0, "Linear", "in_features must be > 0");
  check_option(opt.out_features > 0, "Linear", "out_features must be > 0");
  return opt;
}
}  // namespace detail

// weight: [out_features, in_features]; bias: [out_features]
template <class T>
class Linear : public Module, public detail::WeightAndBias<T, 2> {
  using Params = detail::WeightAndBias<T, 2>;

 public:
  using value_type = T;
  using input_type = Tensor<T, 2>;
  using output_type = Tensor<T, 2>;

  explicit Linear(const LinearOptions& opt)
      : Params({detail::checked(opt).out_features, opt.in_features}, opt.bias, opt.in_features), opt_(opt) {}

  const LinearOptions& options() const { return opt_; }

  Dims<2> output_dims(const Dims<2>& in) const {
    detail::check_rank_dims("Linear", in);
    if (in[1] != opt_.in_features)
      throw shape_error("Linear: expected input N x " + std::to_string(opt_.in_features) +
                        ", got " + shape_string(in));
    return {in[0], opt_.out_features};
  }

  Tensor<T, 2> forward(const Tensor<T, 2>& x) { return forward_impl(x, nullptr); }
  // Takes ownership of x to keep it for backward without a copy.
  Tensor<T, 2> forward(Tensor<T, 2>&& x) { return forward_impl(x, &x); }

  Tensor<T, 2> backward(const Tensor<T, 2>& dy) {
    if (!x_.valid()) detail::no_forward("Linear");
    const auto& x = x_.get();
    const Index N = x.dimension(0);
    detail::check_grad_dims("Linear", Dims<2>{N, opt_.out_features}, dims_of(dy));
    Tensor<T, 2> dx(N, opt_.in_features);
    kernels::linear_backward(dx.data(), this->dweight_.data(), this->dbias_data(), dy.data(), x.data(),
                             this->weight_.data(), N, opt_.in_features, opt_.out_features);
    return dx;
  }

  std::vector<BufferRef<T>> named_buffers() { return {}; }

 private:
  Tensor<T, 2> forward_impl(const Tensor<T, 2>& x, Tensor<T, 2>* owned) {
    const auto out = output_dims(dims_of(x));  // throws before any change
    Tensor<T, 2> y(out[0], out[1]);
    kernels::linear_forward(y.data(), x.data(), this->weight_.data(), this->bias_data(), out[0],
                            opt_.in_features, opt_.out_features);
    x_.keep(x, owned, is_training());
    return y;
  }

  LinearOptions opt_;
  detail::InputCache<T, 2> x_;  // cache for backward
};

}  // namespace bnrelu::nn
