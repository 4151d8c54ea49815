// What Conv2d and Linear share: a weight, an optional bias, their gradients, PyTorch's default
// initialisation, and the training-mode input kept for backward.
#pragma once

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "../kernels/relu.hpp"

#include "init.hpp"
#include "layer.hpp"
#include "weight_storage.hpp"

namespace bnrelu::nn::detail {

template <class T, int WeightRank>
class WeightAndBias {
 public:
  void zero_grad() {
    std::fill_n(weight_.grad_data(), weight_.size(), T(0));
    if (has_bias_) dbias_.setZero();
  }

  // "weight" then "bias" (when present), as PyTorch names them.
  std::vector<ParamRef<T>> named_parameters() {
    std::vector<ParamRef<T>> p{
        {"weight", weight_shape(), {weight_.data(), weight_.size()}, {weight_.grad_data(), weight_.size()}}};
    if (has_bias_) p.push_back({"bias", shape_vector(bias_), span_of(bias_), span_of(dbias_)});
    return p;
  }

  // Makes the layer compute relu?(scale * (W x + b) + shift) per output channel, by scaling
  // W's rows and b (a bias is added if there was none). For inference: Sequential's
  // fuse_for_inference folds an eval-mode BatchNorm (and the ReLU after it) this way.
  void fold_affine(const std::vector<double>& scale, const std::vector<double>& shift, bool relu) {
    const Index O = weight_.dimensions()[0], per_row = static_cast<Index>(weight_.size()) / O;
    if (!has_bias_) {
      bias_.resize(O);
      dbias_.resize(O);
      bias_.setZero();
      dbias_.setZero();
      has_bias_ = true;
    }
    for (Index o = 0; o < O; ++o) {
      const double s = scale[static_cast<std::size_t>(o)];
      T* row = weight_.data() + o * per_row;
      for (Index i = 0; i < per_row; ++i) row[i] = static_cast<T>(s * static_cast<double>(row[i]));
      bias_(o) = static_cast<T>(s * static_cast<double>(bias_(o)) + shift[static_cast<std::size_t>(o)]);
    }
    relu_ = relu_ || relu;
    folded_ = true;
  }
  // Whether the output goes through a folded ReLU.
  bool folded_relu() const { return relu_; }
  // Whether fold_affine changed the layer: its parameters are no longer PyTorch's Conv2d's or
  // Linear's alone, so checkpoints refuse it.
  bool folded() const { return folded_; }

  // The weight and its gradient (named_parameters() views them wherever they live; these throw
  // std::logic_error while place_weight has them elsewhere).
  Tensor<T, WeightRank>& weight() { return weight_.value(); }
  const Tensor<T, WeightRank>& weight() const { return weight_.value(); }
  Tensor<T, 1>& bias() { return bias_; }
  const Tensor<T, 1>& bias() const { return bias_; }
  const Tensor<T, WeightRank>& weight_grad() const { return weight_.grad(); }
  const Tensor<T, 1>& bias_grad() const { return dbias_; }

  // For bnrelu::dist: moves the weight and its gradient into memory the caller owns, or back
  // (both null); see WeightStorage::place.
  void place_weight(T* value, T* grad, bool copy_values = true) { weight_.place(value, grad, copy_values); }

 protected:
  // Weight of the given shape and, if wanted, a bias of its first dimension, both drawn from
  // U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's kaiming_uniform_(a = sqrt(5)) and bias init).
  WeightAndBias(const Dims<WeightRank>& shape, bool bias, Index fan_in) : weight_(shape), has_bias_(bias) {
    init::uniform_fan_in(weight_.value(), fan_in);
    if (bias) {
      bias_.resize(shape[0]);
      dbias_.resize(shape[0]);
      init::uniform_fan_in(bias_, fan_in);
    }
    zero_grad();
  }

  T* weight_data() { return weight_.data(); }
  const T* weight_data() const { return weight_.data(); }
  T* dweight_data() { return weight_.grad_data(); }
  std::vector<Index> weight_shape() const {
    const auto& d = weight_.dimensions();
    return std::vector<Index>(d.begin(), d.end());
  }
  T* bias_data() { return has_bias_ ? bias_.data() : nullptr; }
  const T* bias_data() const { return has_bias_ ? bias_.data() : nullptr; }
  T* dbias_data() { return has_bias_ ? dbias_.data() : nullptr; }

  WeightStorage<T, WeightRank> weight_;
  Tensor<T, 1> bias_, dbias_;  // empty without bias
  bool has_bias_;
  bool relu_ = false;    // a folded ReLU on the output
  bool folded_ = false;  // fold_affine was called
};

// The input of the last training-mode forward: moved in when the caller gave it up (owned is
// &x), copied into the kept storage otherwise; dropped by an eval-mode forward. The input it
// replaces is recycled as the storage of the next input gradient (same shape).
template <class T, int Rank>
class InputCache {
 public:
  void keep(const Tensor<T, Rank>& x, Tensor<T, Rank>* owned, bool training) {
    valid_ = training;
    if (!training) {
      x_ = Tensor<T, Rank>();
      spare_.clear();
    } else if (owned) {
      spare_.give(std::move(x_));
      x_ = std::move(*owned);
    } else {
      x_ = x;  // reuses x_'s storage when the size is unchanged
    }
  }
  bool valid() const { return valid_; }
  const Tensor<T, Rank>& get() const { return x_; }
  // Storage for the input gradient.
  Tensor<T, Rank> take_grad_storage() { return spare_.take(dims_of(x_)); }

 private:
  Tensor<T, Rank> x_;
  Recycler<T, Rank> spare_;
  bool valid_ = false;
};

}  // namespace bnrelu::nn::detail
