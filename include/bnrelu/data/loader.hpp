// Mini-batches over an in-memory image set: seeded shuffling, a last partial batch,
// normalisation, and a position that checkpoints can save and restore.
#pragma once

#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "../error.hpp"
#include "../tensor.hpp"
#include "mnist.hpp"

namespace bnrelu::data {

struct LoaderOptions {
  Index batch_size = 64;
  bool shuffle = true;
  bool drop_last = false;  // drop the last partial batch
  std::uint64_t seed = 0;  // shuffling depends only on (seed, epoch)
  float mean = 0.0f;       // images become (x - mean) / std
  float std = 1.0f;
  // Data parallelism: this process is replica `rank` of `world_size`. Every replica shuffles
  // alike, and batch k of replica r is the r-th of world_size equal parts of global batch k
  // (batch_size * world_size images of the epoch order), so the replicas see disjoint shards
  // and together exactly what one process with the global batch sees. A last partial global
  // batch is cut to a multiple of world_size and split evenly, so that every replica's batch
  // has the same size (averaging the replicas' mean gradients then gives the global mean): at
  // most world_size - 1 images of an epoch are left out. With drop_last it is dropped.
  int rank = 0;
  int world_size = 1;
};

template <class T>
struct Batch {
  Tensor<T, 4> images;
  std::vector<std::int64_t> labels;
};

template <class T = float>
class DataLoader {
 public:
  // Keeps a reference to the data set, which must outlive the loader.
  DataLoader(const Mnist&&, const LoaderOptions&) = delete;  // a temporary would dangle
  DataLoader(const Mnist& set, const LoaderOptions& opt) : set_(&set), opt_(opt) {
    if (opt.world_size < 1 || opt.world_size > (1 << 24) || opt.rank < 0 || opt.rank >= opt.world_size)
      throw shape_error("DataLoader: expected 0 <= rank < world_size <= 2^24, got rank " + std::to_string(opt.rank) +
                        " of " + std::to_string(opt.world_size));
    // the global batch, batch_size * world_size, stays far from overflow
    if (opt.batch_size < 1 || opt.batch_size > (Index{1} << 40) / opt.world_size)
      throw shape_error("DataLoader: batch_size must be in [1, 2^40 / world_size], got " + std::to_string(opt.batch_size));
    if (!(opt.std > 0) || !std::isfinite(opt.std) || !std::isfinite(opt.mean))
      throw shape_error("DataLoader: mean must be finite and std finite and > 0");
    if (static_cast<Index>(set.labels.size()) != set.images.dimension(0))
      throw shape_error("DataLoader: " + std::to_string(set.images.dimension(0)) + " images but " +
                        std::to_string(set.labels.size()) + " labels");
    start_epoch(0);
  }

  // Images in the whole set (every replica's shard together).
  Index size() const { return static_cast<Index>(order_.size()); }
  // Batches of this replica per epoch.
  Index num_batches() const {
    const Index global = opt_.batch_size * opt_.world_size, full = size() / global, rest = size() % global;
    return full + (!opt_.drop_last && rest >= opt_.world_size ? 1 : 0);
  }

  // Begins epoch e: the order is a function of (seed, e) alone.
  void start_epoch(std::int64_t e) {
    epoch_ = e;
    next_ = 0;
    order_.resize(static_cast<std::size_t>(set_->images.dimension(0)));
    std::iota(order_.begin(), order_.end(), Index{0});
    if (!opt_.shuffle) return;
    std::mt19937_64 gen(opt_.seed * 0x9E3779B97F4A7C15ULL + static_cast<std::uint64_t>(e) + 1);
    for (std::size_t i = order_.size(); i > 1; --i) {  // Fisher-Yates, the same on every platform
      const std::size_t j = static_cast<std::size_t>(gen() % i);
      std::swap(order_[i - 1], order_[j]);
    }
  }

  std::int64_t epoch() const { return epoch_; }
  Index batch_index() const { return next_; }
  // Resumes at batch b of epoch e (as saved from epoch() and batch_index()).
  void seek(std::int64_t e, Index b) {
    if (b < 0 || b > num_batches()) throw shape_error("DataLoader: batch " + std::to_string(b) + " is outside the epoch");
    start_epoch(e);
    next_ = b;
  }

  // Fills the next batch of this epoch; false when the epoch is over.
  bool next(Batch<T>& out) {
    if (next_ >= num_batches()) return false;
    const Index global = opt_.batch_size * opt_.world_size;
    const Index count = std::min(global, size() - next_ * global) / opt_.world_size;  // per replica
    const Index begin = next_ * global + opt_.rank * count;
    const Index C = set_->images.dimension(1), H = set_->images.dimension(2), W = set_->images.dimension(3);
    const Index plane = C * H * W;
    out.images.resize(count, C, H, W);
    out.labels.resize(static_cast<std::size_t>(count));
    const float scale = 1.0f / opt_.std;
    for (Index i = 0; i < count; ++i) {
      const Index src = order_[static_cast<std::size_t>(begin + i)];
      const float* from = set_->images.data() + src * plane;
      T* to = out.images.data() + i * plane;
      for (Index k = 0; k < plane; ++k) to[k] = static_cast<T>((from[k] - opt_.mean) * scale);
      out.labels[static_cast<std::size_t>(i)] = set_->labels[static_cast<std::size_t>(src)];
    }
    ++next_;
    return true;
  }

 private:
  const Mnist* set_;
  LoaderOptions opt_;
  std::vector<Index> order_;
  std::int64_t epoch_ = 0;
  Index next_ = 0;
};

// Mean and standard deviation of every pixel of a set, for LoaderOptions.
inline std::pair<float, float> pixel_mean_std(const Mnist& set) {
  double sum = 0, sq = 0;
  const Index n = set.images.size();
  for (Index i = 0; i < n; ++i) sum += set.images.data()[i];
  const double mean = n ? sum / static_cast<double>(n) : 0.0;
  for (Index i = 0; i < n; ++i) sq += (set.images.data()[i] - mean) * (set.images.data()[i] - mean);
  return {static_cast<float>(mean), static_cast<float>(n > 1 ? std::sqrt(sq / static_cast<double>(n)) : 1.0)};
}

}  // namespace bnrelu::data
