// Dropout over a tensor of any rank (PyTorch's nn.Dropout): in training, each element is zeroed
// with probability p and the rest are scaled by 1 / (1 - p); in eval, the identity.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "infer_arena.hpp"
#include "../random.hpp"
#include "../threads.hpp"
#include "layer.hpp"

namespace bnrelu::nn {

struct DropoutOptions {
  double p = 0.5;
};

template <class T>
class Dropout : public Module {
 public:
  using value_type = T;

  explicit Dropout(const DropoutOptions& opt = {}) : p_(opt.p) {
    detail::check_option(opt.p >= 0 && opt.p <= 1, "Dropout", "p must be in [0, 1], got " + std::to_string(opt.p));
  }

  double p() const { return p_; }

  template <std::size_t Rank>
  Dims<Rank> output_dims(const Dims<Rank>& in) const {
    detail::check_rank_dims("Dropout", in);
    return in;
  }

  // Training: one draw from the global generator (manual_seed) seeds this call's mask, so a
  // seeded run gives the same masks on any thread count. Eval: x unchanged.
  template <int Rank>
  Tensor<T, Rank> forward(const Tensor<T, Rank>& x) {
    return forward(Tensor<T, Rank>(x));
  }
  // The eval-mode output (x), computed without touching the layer (any number of threads at once).
  template <int Rank>
  Tensor<T, Rank> infer(const Tensor<T, Rank>& x) const {
    detail::check_rank_dims("Dropout", dims_of(x));
    Tensor<T, Rank> y = detail::infer_output<T>(dims_of(x));
    std::copy_n(x.data(), x.size(), y.data());
    return y;
  }
  // In place: the output takes x's storage.
  template <int Rank>
  Tensor<T, Rank> forward(Tensor<T, Rank>&& x) {
    const auto d = dims_of(x);
    detail::check_rank_dims("Dropout", d);
    dims_.assign(d.begin(), d.end());
    has_cache_ = is_training();
    if (!is_training()) return std::move(x);
    const Index n = x.size();
    mask_.resize(static_cast<std::size_t>(n));
    std::mt19937_64 engine(next_seed());
    // PyTorch's scale; p = 1 zeroes everything (no division by zero)
    const T scale = p_ < 1 ? static_cast<T>(1.0 / (1.0 - p_)) : T(0);
    for (Index i = 0; i < n; ++i) mask_[static_cast<std::size_t>(i)] = !(bnrelu::detail::unit(engine) < p_);
    T* v = x.data();
#pragma omp parallel for simd schedule(static) if (n > (1 << 16)) num_threads(bnrelu::num_threads())
    for (Index i = 0; i < n; ++i) v[i] = mask_[static_cast<std::size_t>(i)] ? v[i] * scale : T(0);
    return std::move(x);
  }

  template <int Rank>
  Tensor<T, Rank> backward(const Tensor<T, Rank>& dy) {
    return backward(Tensor<T, Rank>(dy));
  }
  // dx = dy * mask / (1 - p), in place.
  template <int Rank>
  Tensor<T, Rank> backward(Tensor<T, Rank>&& dy) {
    if (!has_cache_) detail::no_forward("Dropout");
    const auto got = dims_of(dy);
    if (static_cast<std::size_t>(Rank) != dims_.size() || !std::equal(got.begin(), got.end(), dims_.begin()))
      throw shape_error("Dropout: backward expected gradient of shape " + shape_string(dims_) +
                        " (the last forward's output), got " + shape_string(got));
    const T scale = p_ < 1 ? static_cast<T>(1.0 / (1.0 - p_)) : T(0);
    T* g = dy.data();
    const Index n = dy.size();
#pragma omp parallel for simd schedule(static) if (n > (1 << 16)) num_threads(bnrelu::num_threads())
    for (Index i = 0; i < n; ++i) g[i] = mask_[static_cast<std::size_t>(i)] ? g[i] * scale : T(0);
    return std::move(dy);
  }

  // The last training-mode forward's mask: 1 where the element was kept.
  const std::vector<std::uint8_t>& mask() const { return mask_; }

  void zero_grad() {}
  std::vector<ParamRef<T>> named_parameters() { return {}; }
  std::vector<BufferRef<T>> named_buffers() { return {}; }

 private:
  static std::uint64_t next_seed() {
    auto& g = bnrelu::detail::global_generator();
    std::lock_guard lock(g.mutex);
    return g.engine();
  }

  double p_;
  std::vector<std::uint8_t> mask_;  // cache: 1 where kept
  std::vector<Index> dims_;
  bool has_cache_ = false;
};

}  // namespace bnrelu::nn
