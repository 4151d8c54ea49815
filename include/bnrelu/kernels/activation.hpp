// Scalar ReLU and its gradient, as every kernel that applies a ReLU computes them.
#pragma once

#include <bit>
#include <cstdint>
#include <type_traits>

#include "../tensor.hpp"

namespace bnrelu::kernels {

// ReLU that lets NaN through (as PyTorch's relu does) and maps everything below 0 to 0.
template <class T>
inline T relu_value(T v) {
  return v < T(0) ? T(0) : v;
}

// +0 where the forward's pre-activation was <= 0, else dy: PyTorch's threshold_backward, which
// passes the gradient of a NaN output through. A bit mask rather than `pre > 0 ? dy : 0`,
// which compilers may turn into a branch in loops that also reduce in double.
template <class T>
inline T relu_grad(T pre, T dy) {
  using U = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
  return std::bit_cast<T>(std::bit_cast<U>(dy) & (U(0) - U(!(pre <= T(0)))));
}

// y[i] = relu(y[i] + a[i]) (or without the ReLU) over n values: an addend joined to a layer's
// output in the layer's own epilogue, rounded as a separate add and ReLU after it would round.
template <class T>
inline void add_then_relu(T* y, const T* a, Index n, bool relu) {
  if (relu) {
    for (Index i = 0; i < n; ++i) y[i] = relu_value(y[i] + a[i]);
  } else {
    for (Index i = 0; i < n; ++i) y[i] += a[i];
  }
}

}  // namespace bnrelu::kernels
