// ReLU arithmetic.
#pragma once

#include <cstdint>

#include "../tensor.hpp"
#include "../threads.hpp"
#include "activation.hpp"

namespace bnrelu::kernels {

// x, y: [n]; mask[i] = 1 where !(y[i] <= 0) (the elements that pass gradient, NaN included),
// as PyTorch's threshold_backward decides.
template <class T>
void relu_forward(T* y, std::uint8_t* mask, const T* x, Index n) {
#pragma omp parallel for simd schedule(static) if (n > (1 << 16)) num_threads(bnrelu::num_threads())
  for (Index i = 0; i < n; ++i) {
    y[i] = relu_value(x[i]);
    if (mask) mask[i] = !(y[i] <= T(0));
  }
}

// dx = dy where the forward output was positive, else 0.
template <class T>
void relu_backward(T* dx, const T* dy, const std::uint8_t* mask, Index n) {
#pragma omp parallel for simd schedule(static) if (n > (1 << 16)) num_threads(bnrelu::num_threads())
  for (Index i = 0; i < n; ++i) dx[i] = mask[i] ? dy[i] : T(0);
}

// a[i] += b[i] (a residual block's two branches, or their input gradients).
template <class T>
void add_into(T* a, const T* b, Index n) {
#pragma omp parallel for simd schedule(static) if (n > (1 << 16)) num_threads(bnrelu::num_threads())
  for (Index i = 0; i < n; ++i) a[i] += b[i];
}

// a[i] = relu(a[i] + b[i]) in one pass (a residual block's end in eval, where no mask is kept).
template <class T>
void add_relu_into(T* a, const T* b, Index n) {
#pragma omp parallel for simd schedule(static) if (n > (1 << 16)) num_threads(bnrelu::num_threads())
  for (Index i = 0; i < n; ++i) a[i] = relu_value(a[i] + b[i]);
}

}  // namespace bnrelu::kernels
