// A finite-difference gradient checker for any bnrelu layer (or Sequential) in double.
//
// The scalar checked is L = sum(r * forward(x)) for a fixed random r, so backward(r) must
// return dL/dx and add dL/dparam into the parameter grads. Each input element and each
// parameter element (up to max_checks per tensor, evenly spread) is perturbed by +-eps and
// the central difference compared with the analytic value:
//   |numeric - analytic| <= atol + rtol * |analytic|.
// Running buffers and num_batches_tracked are restored after every forward, so the layer
// ends as it started apart from its parameter grads, which hold the analytic gradient.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "../nn/layer.hpp"
#include "../random.hpp"
#include "../tensor.hpp"

namespace bnrelu::testing {

struct GradcheckOptions {
  double eps = 1e-6;
  double atol = 1e-6;
  double rtol = 1e-5;
  Index max_checks = 200;  // per tensor
};

struct GradcheckResult {
  bool ok = true;
  double max_error = 0;  // largest |numeric - analytic| seen
  std::string worst;     // "input[17]" or "<param>[i]" where the largest error was, with values
  Index checked = 0;
};

template <class LayerT, class X>
GradcheckResult gradcheck(LayerT& layer, const X& x, const GradcheckOptions& opt = {}) {
  using T = typename LayerT::value_type;
  static_assert(std::is_same_v<T, double>, "gradcheck needs a double layer");
  auto buffers = layer.named_buffers();
  std::vector<std::vector<T>> saved;
  for (auto& b : buffers) saved.emplace_back(b.value.begin(), b.value.end());
  std::vector<std::pair<std::int64_t*, std::int64_t>> counters;
  nn::for_each_batch_counter(layer, "", [&](const std::string&, std::int64_t& c) { counters.emplace_back(&c, c); });
  auto restore = [&] {
    for (std::size_t i = 0; i < buffers.size(); ++i)
      std::copy(saved[i].begin(), saved[i].end(), buffers[i].value.begin());
    for (auto& [counter, value] : counters) *counter = value;
  };

  auto y0 = layer.forward(x);
  restore();
  auto r = y0;
  fill_uniform(r.data(), r.size(), -1, 1);
  auto loss = [&](const X& xin) {
    auto y = layer.forward(xin);
    restore();
    double s = 0;
    for (Index i = 0; i < y.size(); ++i) s += r.data()[i] * y.data()[i];
    return s;
  };

  layer.zero_grad();
  layer.forward(x);
  restore();
  const auto dx = layer.backward(r);
  auto params = layer.named_parameters();
  std::vector<std::vector<T>> analytic;
  for (auto& p : params) analytic.emplace_back(p.grad.begin(), p.grad.end());

  GradcheckResult res;
  auto compare = [&](double num, double ana, const std::string& where) {
    const double err = std::abs(num - ana);
    ++res.checked;
    if (err > res.max_error) {
      res.max_error = err;
      res.worst = where + ": numeric " + std::to_string(num) + " analytic " + std::to_string(ana);
    }
    if (!(err <= opt.atol + opt.rtol * std::abs(ana))) res.ok = false;
  };
  auto step = [&](Index n) { return std::max<Index>(1, n / opt.max_checks); };

  X xp = x;
  for (Index i = 0; i < x.size(); i += step(x.size())) {
    const T v = xp.data()[i];
    xp.data()[i] = v + opt.eps;
    const double lp = loss(xp);
    xp.data()[i] = v - opt.eps;
    const double lm = loss(xp);
    xp.data()[i] = v;
    compare((lp - lm) / (2 * opt.eps), dx.data()[i], "input[" + std::to_string(i) + "]");
  }
  for (std::size_t k = 0; k < params.size(); ++k) {
    auto& p = params[k];
    const Index n = static_cast<Index>(p.value.size());
    for (Index i = 0; i < n; i += step(n)) {
      const T v = p.value[i];
      p.value[i] = v + opt.eps;
      const double lp = loss(x);
      p.value[i] = v - opt.eps;
      const double lm = loss(x);
      p.value[i] = v;
      compare((lp - lm) / (2 * opt.eps), analytic[k][i], p.name + "[" + std::to_string(i) + "]");
    }
  }
  return res;
}

}  // namespace bnrelu::testing
