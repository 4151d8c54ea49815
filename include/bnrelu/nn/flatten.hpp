// N x C x H x W -> N x (C*H*W), same element order.
#pragma once

#include <algorithm>
#include <utility>
#include <vector>

#include "infer_arena.hpp"
#include "layer.hpp"

namespace bnrelu::nn {

template <class T>
class Flatten : public Module {
 public:
  using value_type = T;
  using input_type = Tensor<T, 4>;
  using output_type = Tensor<T, 2>;

  Dims<2> output_dims(const Dims<4>& in) const {
    detail::check_rank_dims("Flatten", in);
    return {in[0], in[1] * in[2] * in[3]};
  }

  Tensor<T, 2> forward(const Tensor<T, 4>& x) {
    Tensor<T, 2> y = y_.take(output_dims(dims_of(x)));
    std::copy_n(x.data(), x.size(), y.data());
    in_dims_ = dims_of(x);
    has_cache_ = is_training();
    return y;
  }
  // The eval-mode output, computed without touching the layer (any number of threads at once).
  Tensor<T, 2> infer(const Tensor<T, 4>& x) const {
    Tensor<T, 2> y = detail::infer_output<T>(output_dims(dims_of(x)));
    std::copy_n(x.data(), x.size(), y.data());
    return y;
  }
  // Keeps x's storage for the input gradient.
  Tensor<T, 2> forward(Tensor<T, 4>&& x) {
    auto y = forward(std::as_const(x));
    if (has_cache_) dx_.give(std::move(x));
    return y;
  }

  Tensor<T, 4> backward(const Tensor<T, 2>& dy) {
    if (!has_cache_) detail::no_forward("Flatten");
    detail::check_grad_dims("Flatten", output_dims(in_dims_), dims_of(dy));
    Tensor<T, 4> dx = dx_.take(in_dims_);
    std::copy_n(dy.data(), dy.size(), dx.data());
    return dx;
  }
  // Gives dy's storage to the next forward's output.
  Tensor<T, 4> backward(Tensor<T, 2>&& dy) {
    auto dx = backward(std::as_const(dy));
    y_.give(std::move(dy));
    return dx;
  }

  void zero_grad() {}
  std::vector<ParamRef<T>> named_parameters() { return {}; }
  // Takes back an output of this layer that is no longer needed, for the next output.
  void recycle_output(Tensor<T, 2>&& y) { y_.give(std::move(y)); }

  std::vector<BufferRef<T>> named_buffers() { return {}; }

 private:
  Dims<4> in_dims_{};
  detail::Recycler<T, 2> y_;   // storage for the next output
  detail::Recycler<T, 4> dx_;  // storage for the next input gradient
  bool has_cache_ = false;
};

}  // namespace bnrelu::nn
