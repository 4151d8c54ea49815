// Fully-connected layer: y = x * weight^T + bias.
#pragma once

#include <vector>

#include "../kernels/linear.hpp"
#include "init.hpp"
#include "layer.hpp"

namespace bnrelu::nn {

struct LinearOptions {
  Index in_features = 0;
  Index out_features = 0;
  bool bias = true;
};

template <class T>
class Linear : public Module {
 public:
  using value_type = T;
  using input_type = Tensor<T, 2>;
  using output_type = Tensor<T, 2>;

  explicit Linear(const LinearOptions& opt) : opt_(opt) {
    detail::check_option(opt.in_features > 0, "Linear", "in_features must be > 0");
    detail::check_option(opt.out_features > 0, "Linear", "out_features must be > 0");
    weight_.resize(opt.out_features, opt.in_features);
    dweight_.resize(weight_.dimensions());
    init::uniform_fan_in(weight_, opt.in_features);
    if (opt.bias) {
      bias_.resize(opt.out_features);
      dbias_.resize(opt.out_features);
      init::uniform_fan_in(bias_, opt.in_features);
    }
    zero_grad();
  }

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
    if (!has_cache_) detail::no_forward("Linear");
    const Index N = x_.dimension(0);
    detail::check_grad_dims("Linear", Dims<2>{N, opt_.out_features}, dims_of(dy));
    Tensor<T, 2> dx(N, opt_.in_features);
    kernels::linear_backward(dx.data(), dweight_.data(), opt_.bias ? dbias_.data() : nullptr,
                             dy.data(), x_.data(), weight_.data(), N, opt_.in_features,
                             opt_.out_features);
    return dx;
  }

  void zero_grad() {
    dweight_.setZero();
    if (opt_.bias) dbias_.setZero();
  }

  std::vector<ParamRef<T>> named_parameters() {
    std::vector<ParamRef<T>> p{{"weight", shape_vector(weight_), span_of(weight_), span_of(dweight_)}};
    if (opt_.bias) p.push_back({"bias", shape_vector(bias_), span_of(bias_), span_of(dbias_)});
    return p;
  }
  std::vector<BufferRef<T>> named_buffers() { return {}; }

  Tensor<T, 2>& weight() { return weight_; }
  Tensor<T, 1>& bias() { return bias_; }
  const Tensor<T, 2>& weight_grad() const { return dweight_; }
  const Tensor<T, 1>& bias_grad() const { return dbias_; }

 private:
  Tensor<T, 2> forward_impl(const Tensor<T, 2>& x, Tensor<T, 2>* owned) {
    const auto out = output_dims(dims_of(x));  // throws before any change
    Tensor<T, 2> y(out[0], out[1]);
    kernels::linear_forward(y.data(), x.data(), weight_.data(), opt_.bias ? bias_.data() : nullptr,
                            out[0], opt_.in_features, opt_.out_features);
    has_cache_ = is_training();
    if (!is_training()) x_ = Tensor<T, 2>();
    else if (owned) x_ = std::move(*owned);
    else x_ = x;
    return y;
  }

  LinearOptions opt_;
  Tensor<T, 2> weight_, dweight_;
  Tensor<T, 1> bias_, dbias_;
  Tensor<T, 2> x_;  // cache for backward
  bool has_cache_ = false;
};

}  // namespace bnrelu::nn
