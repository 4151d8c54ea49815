// Helpers shared by the tests: PyTorch fixtures, tolerance checks, and tuning values forced for
// a scope.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <string>

#include <bnrelu/io/safetensors.hpp>
#include <bnrelu/kernels/tuning.hpp>
#include <bnrelu/random.hpp>
#include <bnrelu/tensor.hpp>

namespace bnrelu::test {

// float: 2e-4, double: 1e-9, relative to the reference tensor's largest magnitude.
template <class T>
constexpr double tolerance() {
  return std::is_same_v<T, float> ? 2e-4 : 1e-9;
}

struct Fixture {
  io::SafetensorsFile file;
  nlohmann::json options;

  explicit Fixture(const std::string& name)
      : file(io::read_safetensors(std::string(BNRELU_GOLDEN_DIR) + "/" + name + ".safetensors")),
        options(nlohmann::json::parse(file.metadata.at("options"))) {}

  const io::RawTensor& raw(const std::string& key) const {
    const auto it = file.tensors.find(key);
    if (it == file.tensors.end()) throw std::runtime_error("fixture has no tensor " + key);
    return it->second;
  }
  bool has(const std::string& key) const { return file.tensors.count(key) != 0; }

  template <class T, int Rank>
  Tensor<T, Rank> tensor(const std::string& key) const {
    const auto& r = raw(key);
    if (static_cast<int>(r.shape.size()) != Rank)
      throw std::runtime_error(key + " has rank " + std::to_string(r.shape.size()));
    Dims<Rank> d{};
    std::copy(r.shape.begin(), r.shape.end(), d.begin());
    Tensor<T, Rank> t(d);
    const auto v = r.as<T>();
    std::copy(v.begin(), v.end(), t.data());
    return t;
  }
  template <class T>
  std::vector<T> values(const std::string& key) const {
    return raw(key).as<T>();
  }
};

// max |a - b| <= tol * max(max |b|, 1e-30): a PyTorch-relative check for a whole tensor.
// A given min_scale replaces a smaller largest magnitude: for tensors that are zero up to
// rounding (the bias of a layer feeding batch norm), whose error is measured against a
// related tensor's scale.
template <class A, class B>
::testing::AssertionResult close_to(const A* a, std::size_t na, const B* b, std::size_t nb, double tol,
                                    double min_scale = 0) {
  if (na != nb)
    return ::testing::AssertionFailure() << "sizes differ: " << na << " vs " << nb;
  double scale = min_scale, worst = 0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < nb; ++i) scale = std::max(scale, std::abs(static_cast<double>(b[i])));
  for (std::size_t i = 0; i < na; ++i) {
    const double d = std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i]));
    if (!(d <= worst) || std::isnan(d)) {
      worst = std::isnan(d) ? INFINITY : d;
      at = i;
    }
  }
  if (worst <= tol * std::max(scale, 1e-30)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "max error " << worst << " at [" << at << "] (" << static_cast<double>(a[at]) << " vs "
         << static_cast<double>(b[at]) << "), allowed " << tol * scale << " (scale " << scale << ")";
}

template <class TA, int RA, class TB, int RB>
::testing::AssertionResult close_to(const Tensor<TA, RA>& a, const Tensor<TB, RB>& b, double tol) {
  if (RA != RB || dims_of(a) != dims_of(b))
    return ::testing::AssertionFailure() << "shapes differ: " << shape_string(a) << " vs " << shape_string(b);
  return close_to(a.data(), static_cast<std::size_t>(a.size()), b.data(), static_cast<std::size_t>(b.size()), tol);
}

template <class A, class B>
::testing::AssertionResult close_to(std::span<A> a, const std::vector<B>& b, double tol, double min_scale = 0) {
  return close_to(a.data(), a.size(), b.data(), b.size(), tol, min_scale);
}

// Copies values into a parameter or buffer found by name.
template <class Refs, class V>
void assign(Refs&& refs, const std::string& name, const V& values) {
  for (auto& r : refs)
    if (r.name == name) {
      ASSERT_EQ(r.value.size(), values.size()) << name;
      std::copy(values.begin(), values.end(), r.value.begin());
      return;
    }
  FAIL() << "no parameter or buffer named " << name;
}

template <class Refs>
auto& find(Refs& refs, const std::string& name) {
  for (auto& r : refs)
    if (r.name == name) return r;
  throw std::runtime_error("no entry named " + name);
}

// Snapshot of everything a layer holds, to prove a failed call changed nothing.
template <class L>
std::vector<double> state_of(L& layer) {
  std::vector<double> s;
  for (auto& p : layer.named_parameters()) {
    s.insert(s.end(), p.value.begin(), p.value.end());
    s.insert(s.end(), p.grad.begin(), p.grad.end());
  }
  for (auto& b : layer.named_buffers()) s.insert(s.end(), b.value.begin(), b.value.end());
  return s;
}

template <class T, int Rank>
Tensor<T, Rank> random_tensor(const Dims<Rank>& d, double lo = -1, double hi = 1) {
  Tensor<T, Rank> t(d);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<T>(uniform(lo, hi));
  return t;
}

using FloatTypes = ::testing::Types<float, double>;

// The parameters of formula_fill_by_name() in tests/golden/make_golden.py, bit for bit: weights
// of rank > 1 scaled by their fan-in, 1-D weights near 1, biases near 0; salt is the
// parameter's position in named_parameters().
template <class Model>
void formula_fill_by_name(Model& model) {
  std::int64_t salt = 0;
  for (auto& p : model.named_parameters()) {
    const auto n = static_cast<std::int64_t>(p.value.size());
    std::int64_t fan_in = 1;
    for (std::size_t d = 1; d < p.shape.size(); ++d) fan_in *= p.shape[d];
    const bool weight = p.name.size() >= 6 && p.name.compare(p.name.size() - 6, 6, "weight") == 0;
    for (std::int64_t i = 0; i < n; ++i) {
      const double u = static_cast<double>((i * 7919 + salt * 104729) % 2003) / 2003.0 - 0.5;
      double v;
      if (p.shape.size() > 1) v = u * (2.0 / std::sqrt(static_cast<double>(fan_in)));
      else if (weight) v = 1.0 + 0.4 * u;
      else v = 0.4 * u;
      p.value[static_cast<std::size_t>(i)] = static_cast<typename Model::value_type>(v);
    }
    ++salt;
  }
}

// Sets one of the kernels' tuning values (kernels/tuning.hpp) for a scope.
using ForcedTuning = kernels::detail::ScopedTuning;

}  // namespace bnrelu::test
