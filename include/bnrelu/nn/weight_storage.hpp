// Where a Conv2d's or Linear's weight and its gradient live: in the layer's own tensors, or,
// after place(), in memory the caller owns. bnrelu::dist keeps one copy of a large weight for
// all processes of a machine this way (dist/data_parallel.hpp); nothing else places weights.
#pragma once

#include <algorithm>
#include <cstddef>
#include <stdexcept>

#include "../tensor.hpp"

namespace bnrelu::nn::detail {

template <class T, int Rank>
class WeightStorage {
 public:
  WeightStorage() = default;
  explicit WeightStorage(const Dims<Rank>& shape) : value_(shape), grad_(shape) {}
  // A copy owns its values, wherever the original's live.
  WeightStorage(const WeightStorage& other) : value_(other.value_.dimensions()), grad_(other.value_.dimensions()) {
    std::copy_n(other.data(), size(), value_.data());
    std::copy_n(other.grad_data(), size(), grad_.data());
  }
  WeightStorage& operator=(const WeightStorage& other) {
    if (this != &other) *this = WeightStorage(other);
    return *this;
  }
  WeightStorage(WeightStorage&&) noexcept = default;
  WeightStorage& operator=(WeightStorage&&) noexcept = default;
  ~WeightStorage() = default;

  T* data() { return placed_value_ ? placed_value_ : value_.data(); }
  const T* data() const { return placed_value_ ? placed_value_ : value_.data(); }
  T* grad_data() { return placed_grad_ ? placed_grad_ : grad_.data(); }
  const T* grad_data() const { return placed_grad_ ? placed_grad_ : grad_.data(); }
  // The layer's own tensors keep the shape while the values live elsewhere.
  std::size_t size() const { return static_cast<std::size_t>(value_.size()); }
  const Dims<Rank>& dimensions() const { return value_.dimensions(); }

  // The layer's own tensors; std::logic_error while the values live elsewhere.
  Tensor<T, Rank>& value() { return own(value_); }
  const Tensor<T, Rank>& value() const { return own(value_); }
  const Tensor<T, Rank>& grad() const { return own(grad_); }

  // Moves the values and gradient into memory the caller owns (value and grad, each size()
  // elements), or back into the layer's tensors (both null). Both are copied over, the values
  // only when copy_values (false when another process has put the same values there already).
  // The memory must outlive the placement. The layer's tensors stay allocated meanwhile,
  // unused: views taken before the move (an optimizer built earlier) still point at valid
  // memory.
  void place(T* value, T* grad, bool copy_values = true) {
    const std::size_t n = size();
    if (value) {
      if (copy_values) std::copy_n(data(), n, value);
      std::copy_n(grad_data(), n, grad);
    } else if (placed_value_) {
      std::copy_n(placed_value_, n, value_.data());
      std::copy_n(placed_grad_, n, grad_.data());
    }
    placed_value_ = value;
    placed_grad_ = grad;
  }

 private:
  template <class Own>
  Own& own(Own& t) const {
    if (placed_value_) throw std::logic_error("the layer's weight lives in memory given to place_weight");
    return t;
  }

  Tensor<T, Rank> value_, grad_;
  T* placed_value_ = nullptr;
  T* placed_grad_ = nullptr;
};

}  // namespace bnrelu::nn::detail
