// PyTorch's default initialisation.
#pragma once

#include <cmath>

#include "../random.hpp"
#include "../tensor.hpp"

namespace bnrelu::nn::init {

// kaiming_uniform_(a = sqrt(5)) reduces to U(-1/sqrt(fan_in), 1/sqrt(fan_in)); PyTorch draws
// Conv2d/Linear biases from the same bound.
template <class T, int Rank>
void uniform_fan_in(Tensor<T, Rank>& t, Index fan_in) {
  const double bound = fan_in > 0 ? 1.0 / std::sqrt(static_cast<double>(fan_in)) : 0.0;
  fill_uniform(t.data(), t.size(), -bound, bound);
}

}  // namespace bnrelu::nn::init
