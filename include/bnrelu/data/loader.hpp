// Mini-batches over an in-memory image set: seeded shuffling, a last partial batch,
// normalisation (one mean and std, or one per channel), training-time augmentation (random crop
// after zero padding, horizontal flip), and a position that checkpoints can save and restore.
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
  // Per-channel normalisation: one value per image channel each, replacing mean and std when
  // given (x - channel_mean[c]) / channel_std[c].
  std::vector<float> channel_mean = {};
  std::vector<float> channel_std = {};
  // Augmentation, drawn for each image from (seed, epoch, its position in the epoch) alone, so
  // it is the same for any world_size and after a resume: a crop of the image's own size at a
  // random offset from the image zero-padded by crop_padding pixels on each side (padding is
  // raw 0, normalised like any pixel; 0: no crop), then a horizontal flip with probability 1/2.
  Index crop_padding = 0;
  bool horizontal_flip = false;
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
    const auto C = static_cast<std::size_t>(set.images.dimension(1));
    if (opt.channel_mean.size() != opt.channel_std.size() || (!opt.channel_mean.empty() && opt.channel_mean.size() != C))
      throw shape_error("DataLoader: channel_mean and channel_std need one value per channel (" + std::to_string(C) +
                        "), got " + std::to_string(opt.channel_mean.size()) + " and " +
                        std::to_string(opt.channel_std.size()));
    for (std::size_t c = 0; c < opt.channel_mean.size(); ++c)
      if (!(opt.channel_std[c] > 0) || !std::isfinite(opt.channel_std[c]) || !std::isfinite(opt.channel_mean[c]))
        throw shape_error("DataLoader: channel_mean must be finite and channel_std finite and > 0");
    if (opt.crop_padding < 0 || opt.crop_padding > (Index{1} << 20))
      throw shape_error("DataLoader: crop_padding must be in [0, 2^20], got " + std::to_string(opt.crop_padding));
    for (std::size_t c = 0; c < C; ++c) {
      mean_.push_back(opt.channel_mean.empty() ? opt.mean : opt.channel_mean[c]);
      scale_.push_back(1.0f / (opt.channel_std.empty() ? opt.std : opt.channel_std[c]));
    }
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
    const bool augment = opt_.crop_padding > 0 || opt_.horizontal_flip;
    for (Index i = 0; i < count; ++i) {
      const Index src = order_[static_cast<std::size_t>(begin + i)];
      const float* from = set_->images.data() + src * plane;
      T* to = out.images.data() + i * plane;
      if (augment) {
        copy_augmented(to, from, C, H, W, begin + i);
      } else {
        for (Index c = 0; c < C; ++c) {
          const float m = mean_[static_cast<std::size_t>(c)], s = scale_[static_cast<std::size_t>(c)];
          for (Index k = c * H * W; k < (c + 1) * H * W; ++k) to[k] = static_cast<T>((from[k] - m) * s);
        }
      }
      out.labels[static_cast<std::size_t>(i)] = set_->labels[static_cast<std::size_t>(src)];
    }
    ++next_;
    return true;
  }

  // The crop offset (each in [0, 2 * crop_padding]) and flip of the image at position p of
  // this epoch's order; what next() applies.
  struct Augmentation {
    Index dy = 0, dx = 0;
    bool flip = false;
  };
  Augmentation augmentation(Index p) const {
    std::mt19937_64 gen(opt_.seed * 0x9E3779B97F4A7C15ULL ^ (static_cast<std::uint64_t>(epoch_) * 0xD1B54A32D192ED03ULL) ^
                        (static_cast<std::uint64_t>(p) * 0x94D049BB133111EBULL + 0x2545F4914F6CDD1DULL));
    Augmentation a;
    const auto span = static_cast<std::uint64_t>(2 * opt_.crop_padding + 1);
    if (opt_.crop_padding > 0) {
      a.dy = static_cast<Index>(gen() % span);
      a.dx = static_cast<Index>(gen() % span);
    }
    if (opt_.horizontal_flip) a.flip = (gen() >> 63) != 0;
    return a;
  }

 private:
  // One image, cropped from its zero-padded self and flipped as augmentation(p) says, normalised.
  template <class U>
  void copy_augmented(U* to, const float* from, Index C, Index H, Index W, Index p) const {
    const auto a = augmentation(p);
    const Index pad = opt_.crop_padding;
    for (Index c = 0; c < C; ++c) {
      const float m = mean_[static_cast<std::size_t>(c)], s = scale_[static_cast<std::size_t>(c)];
      for (Index y = 0; y < H; ++y) {
        const Index sy = y + a.dy - pad;
        for (Index x = 0; x < W; ++x) {
          const Index sx = (a.flip ? W - 1 - x : x) + a.dx - pad;
          const float v = sy >= 0 && sy < H && sx >= 0 && sx < W ? from[(c * H + sy) * W + sx] : 0.0f;
          to[(c * H + y) * W + x] = static_cast<U>((v - m) * s);
        }
      }
    }
  }

  const Mnist* set_;
  LoaderOptions opt_;
  std::vector<float> mean_, scale_;  // per channel
  std::vector<Index> order_;
  std::int64_t epoch_ = 0;
  Index next_ = 0;
};

// Per-channel mean and standard deviation of a set, for LoaderOptions' channel_mean and
// channel_std.
inline std::pair<std::vector<float>, std::vector<float>> channel_mean_std(const ImageSet& set) {
  const Index N = set.images.dimension(0), C = set.images.dimension(1), S = set.images.dimension(2) * set.images.dimension(3);
  std::vector<float> mean(static_cast<std::size_t>(C)), stdev(static_cast<std::size_t>(C));
  for (Index c = 0; c < C; ++c) {
    double sum = 0, sq = 0;
    for (Index n = 0; n < N; ++n)
      for (Index k = 0; k < S; ++k) sum += set.images.data()[(n * C + c) * S + k];
    const double count = static_cast<double>(N * S), m = count > 0 ? sum / count : 0.0;
    for (Index n = 0; n < N; ++n)
      for (Index k = 0; k < S; ++k) {
        const double d = set.images.data()[(n * C + c) * S + k] - m;
        sq += d * d;
      }
    mean[static_cast<std::size_t>(c)] = static_cast<float>(m);
    stdev[static_cast<std::size_t>(c)] = static_cast<float>(count > 1 && sq > 0 ? std::sqrt(sq / count) : 1.0);
  }
  return {mean, stdev};
}

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
