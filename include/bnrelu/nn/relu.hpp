// ReLU over a tensor of any rank (N x C x H x W or N x F).
#pragma once

#include <cstdint>
#include <vector>

#include "infer_arena.hpp"
#include "../kernels/relu.hpp"
#include "layer.hpp"

namespace bnrelu::nn {

template <class T>
class ReLU : public Module {
 public:
  using value_type = T;
  static constexpr bool is_relu = true;

  template <std::size_t Rank>
  Dims<Rank> output_dims(const Dims<Rank>& in) const {
    detail::check_rank_dims("ReLU", in);
    return in;
  }

  // y = max(0, x); NaN passes through. Training mode keeps a 1-byte mask for backward.
  template <int Rank>
  Tensor<T, Rank> forward(const Tensor<T, Rank>& x) {
    Tensor<T, Rank> y(x.dimensions());
    forward_into(y.data(), x);
    return y;
  }
  // In place: the output takes x's storage.
  template <int Rank>
  Tensor<T, Rank> forward(Tensor<T, Rank>&& x) {
    forward_into(x.data(), x);
    return std::move(x);
  }
  // The eval-mode output, computed without touching the layer (any number of threads at once).
  template <int Rank>
  Tensor<T, Rank> infer(const Tensor<T, Rank>& x) const {
    Tensor<T, Rank> y = detail::infer_output<T>(dims_of(x));
    kernels::relu_forward(y.data(), static_cast<std::uint8_t*>(nullptr), x.data(), x.size());
    return y;
  }

  template <int Rank>
  Tensor<T, Rank> backward(const Tensor<T, Rank>& dy) {
    check_backward(dy);
    Tensor<T, Rank> dx(dy.dimensions());
    kernels::relu_backward(dx.data(), dy.data(), mask_.data(), dy.size());
    return dx;
  }
  // In place: the input gradient takes dy's storage.
  template <int Rank>
  Tensor<T, Rank> backward(Tensor<T, Rank>&& dy) {
    check_backward(dy);
    kernels::relu_backward(dy.data(), dy.data(), mask_.data(), dy.size());
    return std::move(dy);
  }

  void zero_grad() {}
  std::vector<ParamRef<T>> named_parameters() { return {}; }
  std::vector<BufferRef<T>> named_buffers() { return {}; }

 private:
  template <int Rank>
  void forward_into(T* y, const Tensor<T, Rank>& x) {
    const bool keep = is_training();
    mask_.resize(keep ? static_cast<std::size_t>(x.size()) : 0);
    dims_.assign(x.dimensions().begin(), x.dimensions().end());
    kernels::relu_forward(y, keep ? mask_.data() : nullptr, x.data(), x.size());
    has_cache_ = keep;
  }

  template <int Rank>
  void check_backward(const Tensor<T, Rank>& dy) const {
    if (!has_cache_) detail::no_forward("ReLU");
    const auto got = dims_of(dy);
    if (static_cast<std::size_t>(Rank) != dims_.size() ||
        !std::equal(got.begin(), got.end(), dims_.begin()))
      throw shape_error("ReLU: backward expected gradient of shape " + shape_string(dims_) +
                        " (the last forward's output), got " + shape_string(got));
  }

  std::vector<std::uint8_t> mask_;  // cache: 1 where the output was > 0
  std::vector<Index> dims_;
  bool has_cache_ = false;
};

}  // namespace bnrelu::nn
