// Tensor types shared by every bnrelu header.
#pragma once

#include <array>
#include <cstddef>
#include <span>
#include <string>
#include <vector>

#include "detail/eigen.hpp"
#include <unsupported/Eigen/CXX11/Tensor>

namespace bnrelu {

// Row-major, so a Tensor<T, 4> has the memory layout of a contiguous PyTorch N x C x H x W tensor.
template <class T, int Rank>
using Tensor = Eigen::Tensor<T, Rank, Eigen::RowMajor>;

using Index = Eigen::Index;

template <std::size_t Rank>
using Dims = std::array<Index, Rank>;

template <class T, int Rank>
Dims<Rank> dims_of(const Tensor<T, Rank>& t) {
  Dims<Rank> d{};
  for (int i = 0; i < Rank; ++i) d[i] = t.dimension(i);
  return d;
}

// "2 x 3 x 4" for error messages.
template <class Range>
std::string shape_string(const Range& dims) {
  std::string s;
  for (auto d : dims) {
    if (!s.empty()) s += " x ";
    s += std::to_string(d);
  }
  return s.empty() ? std::string("scalar") : s;
}

template <class T, int Rank>
std::string shape_string(const Tensor<T, Rank>& t) {
  return shape_string(dims_of(t));
}

// A named parameter: contiguous views of its value and of its accumulated gradient.
template <class T>
struct ParamRef {
  std::string name;
  std::vector<Index> shape;
  std::span<T> value;
  std::span<T> grad;
};

// A named running buffer (running_mean, running_var).
template <class T>
struct BufferRef {
  std::string name;
  std::vector<Index> shape;
  std::span<T> value;
};

template <class T, int Rank>
std::span<T> span_of(Tensor<T, Rank>& t) {
  return {t.data(), static_cast<std::size_t>(t.size())};
}

template <class T, int Rank>
std::vector<Index> shape_vector(const Tensor<T, Rank>& t) {
  auto d = dims_of(t);
  return {d.begin(), d.end()};
}

}  // namespace bnrelu
