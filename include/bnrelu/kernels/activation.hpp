// Scalar ReLU and its gradient, as every kernel that applies a ReLU computes them.
#pragma once

#include <bit>
#include <cstdint>
#include <type_traits>

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

}  // namespace bnrelu::kernels
