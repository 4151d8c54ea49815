// Fully-connected layer: y = x * weight^T + bias.
#pragma once

#include <utility>
#include <vector>

#include "infer_arena.hpp"
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
  check_extent(opt.in_features, 1, "Linear", "in_features");
  check_extent(opt.out_features, 1, "Linear", "out_features");
  checked_elements("Linear", Dims<2>{opt.out_features, opt.in_features}, "weight");
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
    const Dims<2> out{in[0], opt_.out_features};
    detail::checked_elements("Linear", out, "output");
    return out;
  }

  Tensor<T, 2> forward(const Tensor<T, 2>& x) { return forward_impl(x, nullptr); }
  // Takes ownership of x to keep it for backward without a copy.
  Tensor<T, 2> forward(Tensor<T, 2>&& x) { return forward_impl(x, &x); }
  // The eval-mode output (with a folded ReLU, if any), computed without touching the layer: any
  // number of threads may call it at once while nobody changes the layer.
  Tensor<T, 2> infer(const Tensor<T, 2>& x) const {
    const auto out = output_dims(dims_of(x));
    Tensor<T, 2> y = detail::infer_output<T>(out);
    kernels::linear_forward(y.data(), x.data(), this->weight_data(), this->bias_data(), out[0], opt_.in_features,
                            opt_.out_features);
    if (this->relu_) kernels::relu_forward(y.data(), static_cast<std::uint8_t*>(nullptr), y.data(), y.size());
    return y;
  }

  Tensor<T, 2> backward(const Tensor<T, 2>& dy) {
    check_backward(dy);
    Tensor<T, 2> dx = x_.take_grad_storage();
    backward_impl(dx.data(), dy);
    return dx;
  }
  // Gives dy's storage to the next forward's output.
  Tensor<T, 2> backward(Tensor<T, 2>&& dy) {
    auto dx = backward(std::as_const(dy));
    y_.give(std::move(dy));
    return dx;
  }
  // Parameter gradients only, without dLoss/dx (for a first layer whose input needs none).
  void backward_params(Tensor<T, 2>&& dy) {
    check_backward(dy);
    backward_impl(nullptr, dy);
    y_.give(std::move(dy));
  }

  // Takes back an output of this layer that is no longer needed, for the next output.
  void recycle_output(Tensor<T, 2>&& y) { y_.give(std::move(y)); }

  std::vector<BufferRef<T>> named_buffers() { return {}; }

 private:
  void check_backward(const Tensor<T, 2>& dy) const {
    if (!x_.valid()) detail::no_forward("Linear");
    detail::check_grad_dims("Linear", Dims<2>{x_.get().dimension(0), opt_.out_features}, dims_of(dy));
  }

  void backward_impl(T* dx, const Tensor<T, 2>& dy) {
    kernels::linear_backward(dx, this->dweight_data(), this->dbias_data(), dy.data(), x_.get().data(),
                             this->weight_data(), dy.dimension(0), opt_.in_features, opt_.out_features);
  }

  Tensor<T, 2> forward_impl(const Tensor<T, 2>& x, Tensor<T, 2>* owned) {
    const auto out = output_dims(dims_of(x));  // throws before any change
    if (this->relu_ && is_training()) detail::inference_only("Linear");
    Tensor<T, 2> y = y_.take(out);
    kernels::linear_forward(y.data(), x.data(), this->weight_data(), this->bias_data(), out[0],
                            opt_.in_features, opt_.out_features);
    if (this->relu_) kernels::relu_forward(y.data(), static_cast<std::uint8_t*>(nullptr), y.data(), y.size());
    x_.keep(x, owned, is_training());
    return y;
  }

  LinearOptions opt_;
  detail::InputCache<T, 2> x_;  // cache for backward
  detail::Recycler<T, 2> y_;    // storage for the next output
};

}  // namespace bnrelu::nn
