// Cross-entropy loss: log-softmax plus the mean negative log-likelihood.
#pragma once

#include <cmath>
#include <cstdint>
#include <iterator>
#include <ranges>
#include <string>
#include <utility>
#include <vector>

#include "layer.hpp"

namespace bnrelu::nn {

template <class T>
class CrossEntropyLoss {
 public:
  // logits: N x K; labels: N class ids in [0, K). Returns the mean over the batch.
  template <std::ranges::contiguous_range Labels>
    requires std::integral<std::ranges::range_value_t<Labels>>
  T forward(const Tensor<T, 2>& logits, const Labels& labels) {
    const Index N = logits.dimension(0), K = logits.dimension(1);
    const auto count = static_cast<Index>(std::ranges::size(labels));
    if (count != N)
      throw shape_error("CrossEntropyLoss: expected " + std::to_string(N) +
                        " labels for logits of shape " + shape_string(logits) + ", got " +
                        std::to_string(count));
    if (N == 0 || K == 0)
      throw shape_error("CrossEntropyLoss: expected non-empty logits, got " + shape_string(logits));
    const auto* lab = std::ranges::data(labels);
    for (Index n = 0; n < N; ++n)
      if (std::cmp_less(lab[n], 0) || std::cmp_greater_equal(lab[n], K))
        throw shape_error("CrossEntropyLoss: label " + std::to_string(lab[n]) + " at row " +
                          std::to_string(n) + " is outside [0, " + std::to_string(K) + ")");
    // probs = softmax(logits) row by row, shifted by the row maximum for stability
    probs_.resize(N, K);
    labels_.assign(lab, lab + N);
    double total = 0;
    for (Index n = 0; n < N; ++n) {
      const T* z = logits.data() + n * K;
      T* p = probs_.data() + n * K;
      T zmax = z[0];
      for (Index k = 1; k < K; ++k) zmax = std::max(zmax, z[k]);
      double sum = 0;
      for (Index k = 0; k < K; ++k) sum += std::exp(static_cast<double>(z[k] - zmax));
      const double log_sum = std::log(sum);
      for (Index k = 0; k < K; ++k) p[k] = static_cast<T>(std::exp(static_cast<double>(z[k] - zmax) - log_sum));
      total += log_sum - static_cast<double>(z[labels_[n]] - zmax);
    }
    has_cache_ = true;
    return static_cast<T>(total / static_cast<double>(N));
  }

  // dLoss/dlogits = (softmax - onehot) / N, N x K.
  Tensor<T, 2> backward() const {
    Tensor<T, 2> dlogits;
    backward(dlogits);
    return dlogits;
  }
  // The same into dlogits, whose storage is reused when it already holds N x K elements.
  void backward(Tensor<T, 2>& dlogits) const {
    if (!has_cache_) detail::no_forward("CrossEntropyLoss");
    const Index N = probs_.dimension(0);
    const Index K = probs_.dimension(1);
    dlogits.resize(probs_.dimensions());
    const T scale = static_cast<T>(1.0 / static_cast<double>(N));
    for (Index n = 0; n < N; ++n)
      for (Index k = 0; k < K; ++k) {
        const T p = probs_(n, k);
        dlogits(n, k) = (k == labels_[static_cast<std::size_t>(n)] ? p - T(1) : p) * scale;
      }
  }

  // Softmax of the last forward's logits.
  const Tensor<T, 2>& probabilities() const { return probs_; }

 private:
  Tensor<T, 2> probs_;
  std::vector<std::int64_t> labels_;
  bool has_cache_ = false;
};

}  // namespace bnrelu::nn
