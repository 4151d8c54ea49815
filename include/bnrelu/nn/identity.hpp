// The identity map over a tensor of any rank: Residual's default shortcut, and a placeholder
// where a model has no layer (PyTorch's nn.Identity).
#pragma once

#include <algorithm>
#include <utility>
#include <vector>

#include "infer_arena.hpp"
#include "layer.hpp"

namespace bnrelu::nn {

template <class T>
class Identity : public Module {
 public:
  using value_type = T;

  template <std::size_t Rank>
  Dims<Rank> output_dims(const Dims<Rank>& in) const {
    detail::check_rank_dims("Identity", in);
    return in;
  }

  template <int Rank>
  Tensor<T, Rank> forward(const Tensor<T, Rank>& x) {
    mark(dims_of(x));
    return x;
  }
  // The eval-mode output, computed without touching the layer (any number of threads at once).
  template <int Rank>
  Tensor<T, Rank> infer(const Tensor<T, Rank>& x) const {
    Tensor<T, Rank> y = detail::infer_output<T>(dims_of(x));
    std::copy_n(x.data(), x.size(), y.data());
    return y;
  }
  template <int Rank>
  Tensor<T, Rank> forward(Tensor<T, Rank>&& x) {
    mark(dims_of(x));
    return std::move(x);
  }

  template <int Rank>
  Tensor<T, Rank> backward(const Tensor<T, Rank>& dy) {
    check_backward(dims_of(dy));
    return dy;
  }
  template <int Rank>
  Tensor<T, Rank> backward(Tensor<T, Rank>&& dy) {
    check_backward(dims_of(dy));
    return std::move(dy);
  }

  void zero_grad() {}
  std::vector<ParamRef<T>> named_parameters() { return {}; }
  std::vector<BufferRef<T>> named_buffers() { return {}; }

 private:
  template <std::size_t Rank>
  void mark(const Dims<Rank>& d) {
    detail::check_rank_dims("Identity", d);
    dims_.assign(d.begin(), d.end());
    has_cache_ = is_training();
  }
  template <std::size_t Rank>
  void check_backward(const Dims<Rank>& got) const {
    if (!has_cache_) detail::no_forward("Identity");
    if (Rank != dims_.size() || !std::equal(got.begin(), got.end(), dims_.begin()))
      throw shape_error("Identity: backward expected gradient of shape " + shape_string(dims_) +
                        " (the last forward's output), got " + shape_string(got));
  }

  std::vector<Index> dims_;
  bool has_cache_ = false;
};

}  // namespace bnrelu::nn
