// N x C x H x W -> N x (C*H*W), same memory.
#pragma once

#include <vector>

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
    const auto out = output_dims(dims_of(x));
    in_dims_ = dims_of(x);
    has_cache_ = is_training();
    return x.reshape(out);
  }
  Tensor<T, 4> backward(const Tensor<T, 2>& dy) {
    if (!has_cache_) detail::no_forward("Flatten");
    detail::check_grad_dims("Flatten", output_dims(in_dims_), dims_of(dy));
    return dy.reshape(in_dims_);
  }

  void zero_grad() {}
  std::vector<ParamRef<T>> named_parameters() { return {}; }
  std::vector<BufferRef<T>> named_buffers() { return {}; }

 private:
  Dims<4> in_dims_{};
  bool has_cache_ = false;
};

}  // namespace bnrelu::nn
