// Batch normalisation: one shared base, thin 1d/2d variants that fix the rank.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "infer_arena.hpp"
#include "../kernels/batchnorm.hpp"
#include "layer.hpp"

namespace bnrelu::nn {

struct BatchNormOptions {
  Index num_features = 0;
  double eps = 1e-5;
  double momentum = 0.1;
  bool affine = true;
  bool track_running_stats = true;
};

// Combines batch-norm statistics across data-parallel replicas, which makes a batch norm a
// SyncBatchNorm. The core library has no communication of its own: bnrelu::dist implements
// this over MPI (dist::MpiBatchNormReducer), and tests implement it in process.
class BatchNormReducer {
 public:
  virtual ~BatchNormReducer() = default;
  // In: this replica's value count and per-channel mean and M2 (sum of squared deviations from
  // the mean). Out: the same over all replicas, identical on every replica.
  virtual void combine_statistics(double& count, std::span<double> mean, std::span<double> m2) = 0;
  // Element-wise sum over all replicas, in place.
  virtual void sum(std::span<double> values) = 0;
  // The number of replicas (for sizing work alike on all of them).
  virtual int replicas() const { return 1; }
};

namespace detail {

// State, checks and caching for batch norm over N x C (Rank 2) or N x C x H x W (Rank 4).
// forward_impl(x, relu) also serves the fused BatchNorm+ReLU layers and Sequential's fusion.
template <class T, int Rank>
class BatchNormBase : public Module {
  static_assert(Rank == 2 || Rank == 4, "batch norm takes N x C or N x C x H x W");

 public:
  using value_type = T;
  using input_type = Tensor<T, Rank>;
  using output_type = Tensor<T, Rank>;

  BatchNormBase(const BatchNormOptions& opt, const char* name) : opt_(opt), name_(name) {
    check_extent(opt.num_features, 1, name, "num_features");
    check_option(opt.eps > 0 && std::isfinite(opt.eps), name, "eps must be finite and > 0");
    check_option(opt.momentum >= 0 && opt.momentum <= 1, name, "momentum must be in [0, 1]");
    const Index C = opt.num_features;
    if (opt.affine) {
      weight_.resize(C);
      bias_.resize(C);
      dweight_.resize(C);
      dbias_.resize(C);
      weight_.setConstant(T(1));
      bias_.setZero();
      zero_grad();
    }
    if (opt.track_running_stats) {
      running_mean_.resize(C);
      running_var_.resize(C);
      reset_running_stats();
    }
  }

  const BatchNormOptions& options() const { return opt_; }

  // The eval-mode output for x (relu: then ReLU), in a tensor of its own: reads the layer and
  // changes nothing, so any number of threads may call it at once while nobody changes the
  // layer. Whatever the training flag: the running statistics, or the batch's own without them.
  Tensor<T, Rank> infer_impl(const Tensor<T, Rank>& x, bool relu) const {
    const auto d = output_dims(dims_of(x));
    const kernels::BatchShape shape{d[0], d[1], spatial(d)};
    Tensor<T, Rank> y = detail::infer_output<T>(d);
    if (x.size() == 0) return y;
    const kernels::Epilogue<T> epilogue{relu};
    if (opt_.track_running_stats) {
      kernels::ChannelAffines<T> f;
      running_maps(f);
      kernels::batchnorm_forward_eval(y.data(), x.data(), shape, f, epilogue);
    } else {
      std::vector<double> mean(static_cast<std::size_t>(shape.C)), var(mean), invstd(mean);
      kernels::batchnorm_forward_train(y.data(), static_cast<T*>(nullptr), {mean.data(), var.data(), invstd.data()},
                                       x.data(), shape, affine_params(), opt_.eps, epilogue);
    }
    return y;
  }

  Dims<Rank> output_dims(const Dims<Rank>& in) const {
    check_rank_dims(name_, in);
    if (in[1] != opt_.num_features)
      throw shape_error(std::string(name_) + ": expected input N x " +
                        std::to_string(opt_.num_features) + (Rank == 4 ? " x H x W" : "") +
                        ", got " + shape_string(in));
    // Batch statistics need more than one value per channel (PyTorch raises for exactly one;
    // training on an empty batch is refused too, as its statistics do not exist).
    Index M = in[0];
    for (std::size_t i = 2; i < Rank; ++i) M *= in[i];
    const bool batch_stats = is_training() || !opt_.track_running_stats;
    // a SyncBatchNorm checks the count over all replicas instead, in forward (every replica
    // then throws alike, instead of one leaving the others waiting in a collective)
    const bool synced = reducer_ && is_training();
    if (batch_stats && !synced && (M == 1 || (is_training() && M == 0)))
      throw shape_error(std::string(name_) + ": expected more than 1 value per channel when using batch " +
                        "statistics, got input " + shape_string(in));
    return in;
  }

  void zero_grad() {
    if (opt_.affine) {
      dweight_.setZero();
      dbias_.setZero();
    }
  }

  // running_mean 0, running_var 1, num_batches_tracked 0.
  void reset_running_stats() {
    if (!opt_.track_running_stats) return;
    running_mean_.setZero();
    running_var_.setConstant(T(1));
    num_batches_tracked_ = 0;
  }

  std::vector<ParamRef<T>> named_parameters() {
    if (!opt_.affine) return {};
    return {{"weight", shape_vector(weight_), span_of(weight_), span_of(dweight_)},
            {"bias", shape_vector(bias_), span_of(bias_), span_of(dbias_)}};
  }
  std::vector<BufferRef<T>> named_buffers() {
    if (!opt_.track_running_stats) return {};
    return {{"running_mean", shape_vector(running_mean_), span_of(running_mean_)},
            {"running_var", shape_vector(running_var_), span_of(running_var_)}};
  }

  Tensor<T, 1>& weight() { return weight_; }
  Tensor<T, 1>& bias() { return bias_; }
  const Tensor<T, 1>& weight_grad() const { return dweight_; }
  const Tensor<T, 1>& bias_grad() const { return dbias_; }
  Tensor<T, 1>& running_mean() { return running_mean_; }
  Tensor<T, 1>& running_var() { return running_var_; }
  std::int64_t& num_batches_tracked() { return num_batches_tracked_; }
  std::int64_t num_batches_tracked() const { return num_batches_tracked_; }

  // The eval-mode map y = x * scale + shift per channel, in double; false when eval uses batch
  // statistics (track_running_stats off), which no fixed map reproduces.
  bool eval_affine(std::vector<double>& scale, std::vector<double>& shift) const {
    if (!opt_.track_running_stats) return false;
    const Index C = opt_.num_features;
    scale.resize(static_cast<std::size_t>(C));
    shift.resize(static_cast<std::size_t>(C));
    for (Index c = 0; c < C; ++c) {
      const double invstd = 1.0 / std::sqrt(static_cast<double>(running_var_(c)) + opt_.eps);
      const double s = (opt_.affine ? static_cast<double>(weight_(c)) : 1.0) * invstd;
      scale[c] = s;
      shift[c] = (opt_.affine ? static_cast<double>(bias_(c)) : 0.0) - static_cast<double>(running_mean_(c)) * s;
    }
    return true;
  }

  // Takes back an output of this layer that is no longer needed, for the next output.
  void recycle_output(Tensor<T, Rank>&& y) { y_.give(std::move(y)); }

  // With a reducer, training-mode statistics and the backward's per-channel sums are combined
  // across replicas (SyncBatchNorm): each replica normalises with the statistics of the whole
  // global batch. Null (the default) makes the layer local again.
  void set_reducer(std::shared_ptr<BatchNormReducer> r) { reducer_ = std::move(r); }
  const std::shared_ptr<BatchNormReducer>& reducer() const { return reducer_; }

  // Whether the last forward was a training forward_add_relu that kept its ReLU's mask (maps
  // larger than 1 x 1): backward_add_relu_deferred and add_shortcut_grad may follow it.
  bool keeps_add_mask() const { return has_cache_ && !mask_.empty(); }

  // Bytes this layer holds for backward after a training-mode forward.
  std::size_t cache_bytes() const {
    return sizeof(T) * static_cast<std::size_t>(x_.size()) + sizeof(double) * (mean_.size() + invstd_.size()) +
           sizeof(std::uint64_t) * mask_.size();
  }

 protected:
  // y = [relu](batchnorm(x)), or relu(batchnorm(x) + *addend) when addend is given (relu set;
  // not with a reducer); owned (== &x or null): x may be moved into the cache.
  Tensor<T, Rank> forward_impl(const Tensor<T, Rank>& x, Tensor<T, Rank>* owned, bool relu,
                               const Tensor<T, Rank>* addend = nullptr) {
    const auto d = output_dims(dims_of(x));
    if (addend && dims_of(*addend) != d)
      throw shape_error(std::string(name_) + ": the shortcut added before the ReLU has shape " +
                        shape_string(*addend) + ", the batch norm's output " + shape_string(d));
    if (addend && reducer_ && is_training())
      throw std::logic_error(std::string(name_) + ": a SyncBatchNorm does not fuse a shortcut's add");
    kernels::Epilogue<T> epilogue{relu, {addend ? addend->data() : nullptr}};
    const kernels::BatchShape shape{d[0], d[1], spatial(d)};
    const Index C = shape.C;
    const bool batch_stats = is_training() || !opt_.track_running_stats;
    Tensor<T, Rank> y = y_.take(d);
    const bool synced = reducer_ && is_training();
    if (x.size() == 0 && !synced) {  // eval on an empty batch (training rejected it above): nothing to do
      drop_cache();
      return y;
    }
    if (!batch_stats) {
      running_maps(affine_);
      kernels::batchnorm_forward_eval(y.data(), x.data(), shape, affine_, epilogue);
      drop_cache();
      return y;
    }
    // the statistics go straight into the cache: nothing below can fail
    mean_.resize(static_cast<std::size_t>(C));
    var_.resize(static_cast<std::size_t>(C));
    invstd_.resize(static_cast<std::size_t>(C));
    const bool keep = is_training();
    // the ReLU's mask for a shortcut's add, one bit per value (the S = 1 kernels recompute it)
    const Index mask_words = keep && addend && shape.S > 1 ? shape.N * C * kernels::mask_words(shape.S) : 0;
    mask_.resize(static_cast<std::size_t>(mask_words));
    epilogue.add.mask = kept_mask();
    if (keep) {
      if (owned) {  // compute from the buffer backward will read; the old one stores the next dx
        dx_.give(std::move(x_));
        x_ = std::move(*owned);
      } else {
        x_.resize(x.dimensions());  // the kernel copies x into it
      }
    }
    double M = shape.count();
    if (synced) {
      if (keep && !owned) std::copy_n(x.data(), x.size(), x_.data());
      M = forward_synced(y.data(), keep ? x_.data() : x.data(), M, shape, relu);
    } else {
      kernels::batchnorm_forward_train(y.data(), keep && !owned ? x_.data() : nullptr,
                                       {mean_.data(), var_.data(), invstd_.data()},
                                       keep && owned ? x_.data() : x.data(), shape, affine_params(), opt_.eps, epilogue);
    }
    count_ = M;
    if (is_training() && opt_.track_running_stats) {
      const double m = opt_.momentum;
      for (Index c = 0; c < C; ++c) {
        running_mean_(c) = static_cast<T>((1 - m) * running_mean_(c) + m * mean_[c]);
        running_var_(c) = static_cast<T>((1 - m) * running_var_(c) + m * var_[c] * M / (M - 1));
      }
      ++num_batches_tracked_;
    }
    if (!keep) {
      drop_cache();
      return y;
    }
    has_cache_ = true;
    cached_relu_ = relu;
    cached_add_ = addend != nullptr;
    cached_synced_ = synced;
    return y;
  }

  // dx for dy; after a forward with an addend s, also the shortcut's gradient into *ds (s: the
  // same tensor as in forward).
  Tensor<T, Rank> backward_impl(const Tensor<T, Rank>& dy, bool relu, const Tensor<T, Rank>* s = nullptr,
                                Tensor<T, Rank>* ds = nullptr) {
    const kernels::BatchShape shape = check_backward(dy, relu, s);
    if (s) ds->resize(dims_of(x_));
    return backward_checked(dy, shape, relu, s, s ? ds->data() : nullptr);
  }

  // Gives dy's storage to the next forward's output. After a forward that kept the mask of a
  // shortcut's add, the shortcut's gradient is written over dy instead (each value read before
  // it is written; its cache lines are already there, where a separate ds would first be read
  // in), *ds takes dy's storage and ds's storage goes to the next output.
  Tensor<T, Rank> backward_impl(Tensor<T, Rank>&& dy, bool relu, const Tensor<T, Rank>* s = nullptr,
                                Tensor<T, Rank>* ds = nullptr) {
    if (!s || !kept_mask()) {
      auto dx = backward_impl(std::as_const(dy), relu, s, ds);
      y_.give(std::move(dy));
      return dx;
    }
    auto dx = backward_checked(dy, check_backward(dy, relu, s), relu, s, dy.data());
    y_.give(std::exchange(*ds, std::move(dy)));
    return dx;
  }

  // dx for dy after a forward that added s and kept the mask, with the shortcut's gradient left
  // unwritten, for add_shortcut_grad.
  Tensor<T, Rank> backward_deferred_impl(const Tensor<T, Rank>& dy, const Tensor<T, Rank>& s) {
    const kernels::BatchShape shape = check_backward(dy, true, &s);
    require_mask("backward_add_relu_deferred");
    return backward_checked(dy, shape, true, &s, nullptr);
  }

  // t += the shortcut's gradient: dy masked by the kept ReLU mask.
  void add_shortcut_grad_impl(Tensor<T, Rank>& t, const Tensor<T, Rank>& dy) const {
    require_mask("add_shortcut_grad");
    check_grad_dims(name_, dims_of(x_), dims_of(dy));
    check_grad_dims(name_, dims_of(x_), dims_of(t));
    kernels::add_shortcut_grad(t.data(), dy.data(), mask_.data(), {x_.dimension(0), x_.dimension(1), spatial(dims_of(x_))});
  }

 private:
  // dx for dy after check_backward gave shape; with the shortcut s, its gradient into ds_out.
  Tensor<T, Rank> backward_checked(const Tensor<T, Rank>& dy, const kernels::BatchShape& shape, bool relu,
                                   const Tensor<T, Rank>* s, T* ds_out) {
    Tensor<T, Rank> dx = dx_.take(dims_of(x_));
    if (cached_synced_) {  // as the forward ran, whatever the reducer is now
      backward_synced(dx, dy, shape, relu);
      return dx;
    }
    kernels::Epilogue<T> epilogue{relu};
    if (s) epilogue.add = {s->data(), ds_out, kept_mask()};
    kernels::AffineGrads<T> grads;
    if (opt_.affine) grads = {dweight_.data(), dbias_.data()};
    kernels::batchnorm_backward(dx.data(), grads, dy.data(), x_.data(), shape, normalisation(), epilogue);
    return dx;
  }

  // The cached forward's ReLU mask after a shortcut's add, or null (none kept).
  std::uint64_t* kept_mask() { return mask_.empty() ? nullptr : mask_.data(); }

  // std::logic_error unless the cached forward kept a mask (what, the caller, named).
  void require_mask(const char* what) const {
    if (!has_cache_) no_forward(name_);
    if (mask_.empty())
      throw std::logic_error(std::string(name_) + ": " + what +
                             " needs the mask of a training forward_add_relu over maps larger than 1 x 1");
  }

  // The cached forward's shape, after checking that a backward with dy (and the shortcut s) may
  // follow it.
  kernels::BatchShape check_backward(const Tensor<T, Rank>& dy, bool relu, const Tensor<T, Rank>* s) const {
    if (!has_cache_) no_forward(name_);
    if (relu != cached_relu_ || (s != nullptr) != cached_add_)
      throw std::logic_error(std::string(name_) + ": backward " + (relu ? "with" : "without") + " ReLU" +
                             (s ? " and add" : "") + " after a forward " + (cached_relu_ ? "with" : "without") +
                             " it" + (cached_add_ ? " and add" : ""));
    check_grad_dims(name_, dims_of(x_), dims_of(dy));
    if (s) check_grad_dims(name_, dims_of(x_), dims_of(*s));
    if (cached_synced_ && !reducer_)
      throw std::logic_error(std::string(name_) + ": the reducer was removed between forward and backward");
    return {x_.dimension(0), x_.dimension(1), spatial(dims_of(x_))};
  }

  // Values per channel and image: H * W, or 1 for N x C (from the shape: N may be 0).
  static Index spatial(const Dims<Rank>& d) {
    Index S = 1;
    for (std::size_t i = 2; i < Rank; ++i) S *= d[i];
    return S;
  }

  kernels::AffineParams<T> affine_params() const {
    if (!opt_.affine) return {};
    return {weight_.data(), bias_.data()};
  }
  // The eval-mode map of every channel, from the running statistics.
  void running_maps(kernels::ChannelAffines<T>& f) const {
    const Index C = opt_.num_features;
    f.resize(C);
    for (Index c = 0; c < C; ++c)
      f.set(c, kernels::ChannelAffine<T>(static_cast<double>(running_mean_(c)),
                                         1.0 / std::sqrt(static_cast<double>(running_var_(c)) + opt_.eps),
                                         affine_params(), c));
  }
  // The last training forward's normalisation, for backward.
  kernels::Normalisation<T> normalisation() const { return {mean_.data(), invstd_.data(), affine_params()}; }

  // SyncBatchNorm forward: local statistics, combined across replicas, then the normalising
  // pass (x read from memory twice, as the reduction sits between). Returns the global count.
  double forward_synced(T* y, const T* x, double count, const kernels::BatchShape& shape, bool relu) {
    const Index C = shape.C;
    if (count > 0) {
      kernels::batchnorm_statistics(mean_.data(), var_.data(), x, shape);
      for (Index c = 0; c < C; ++c) var_[c] *= count;  // M2
    } else {  // an empty shard still takes part in the reduction
      std::fill(mean_.begin(), mean_.end(), 0.0);
      std::fill(var_.begin(), var_.end(), 0.0);
    }
    reducer_->combine_statistics(count, mean_, var_);
    if (count <= 1) {
      has_cache_ = false;
      throw shape_error(std::string(name_) + ": expected more than 1 value per channel over all replicas, got " +
                        std::to_string(static_cast<long long>(count)));
    }
    affine_.resize(C);
    for (Index c = 0; c < C; ++c) {
      var_[c] /= count;
      invstd_[c] = 1.0 / std::sqrt(var_[c] + opt_.eps);
      affine_.set(c, kernels::ChannelAffine<T>(mean_[c], invstd_[c], affine_params(), c));
    }
    kernels::batchnorm_forward_eval(y, x, shape, affine_, kernels::Epilogue<T>{relu});
    return count;
  }

  // SyncBatchNorm backward: the parameter gradients from this replica's sums (data-parallel
  // gradient averaging combines them), the input gradient from the sums of all replicas. In
  // groups of channels whose x and dy fit in a core's L2: a group's sums, their reduction,
  // then its dx while the group is still in cache, instead of a second read of the whole
  // tensor from memory.
  void backward_synced(Tensor<T, Rank>& dx, const Tensor<T, Rank>& dy, const kernels::BatchShape& shape, bool relu) {
    const Index C = shape.C;
    const kernels::Normalisation<T> norm = normalisation();
    const Index group = sync_group_channels(C);
    for (Index c0 = 0; c0 < C; c0 += group) {
      const Index c1 = std::min(C, c0 + group), n = c1 - c0;
      // the group's sums then its dots, side by side as the reducer takes them
      sums_.resize(2 * static_cast<std::size_t>(n));
      double* sum = sums_.data();
      double* dot = sum + n;
      kernels::batchnorm_backward_sums(sum, dot, dy.data(), x_.data(), shape, norm, relu, {c0, c1});
      if (opt_.affine)
        for (Index c = c0; c < c1; ++c) {
          dbias_(c) += static_cast<T>(sum[c - c0]);
          dweight_(c) += static_cast<T>(dot[c - c0] * invstd_[c]);
        }
      reducer_->sum(sums_);
      kernels::batchnorm_backward_dx(dx.data(), {sum, dot, count_}, dy.data(), x_.data(), shape, norm, relu,
                                     {c0, c1});
    }
  }

  // Channels per group of the SyncBatchNorm backward: as many as keep a replica's share of x and
  // dy (the global count over the replicas) within 512 KiB, as channel_block does in one
  // process. From global figures only, so that every replica makes the same groups: their
  // reductions must pair up.
  Index sync_group_channels(Index C) const {
    const double share = count_ / std::max(1, reducer_->replicas());
    const double bytes = std::max(1.0, share) * 2.0 * static_cast<double>(sizeof(T));
    return std::clamp<Index>(static_cast<Index>(static_cast<double>(512 << 10) / bytes), 1, std::max<Index>(C, 1));
  }

  void drop_cache() {
    has_cache_ = false;
    x_ = Tensor<T, Rank>();
    mask_ = {};
    dx_.clear();
  }

  BatchNormOptions opt_;
  const char* name_;
  Tensor<T, 1> weight_, bias_, dweight_, dbias_;  // parameters, empty when !affine
  Tensor<T, 1> running_mean_, running_var_;       // buffers, empty when !track_running_stats
  std::int64_t num_batches_tracked_ = 0;
  Tensor<T, Rank> x_;  // cache for backward: the input (the ReLU mask is recomputed from it)
  std::vector<double> mean_, var_, invstd_;  // batch statistics of the cached forward
  std::vector<std::uint64_t> mask_;          // its ReLU's mask after a shortcut's add (kernels::Addend)
  kernels::ChannelAffines<T> affine_;        // eval's (and the synced forward's) per-channel maps
  std::vector<double> sums_;                 // SyncBatchNorm backward: a group's sum(g), then sum(g * (x - mean))
  double count_ = 0;                         // values per channel in the cached forward (all replicas)
  std::shared_ptr<BatchNormReducer> reducer_;
  Recycler<T, Rank> y_, dx_;                 // storage for the next output and input gradient
  bool has_cache_ = false;
  bool cached_relu_ = false;
  bool cached_add_ = false;     // the cached forward added a shortcut before its ReLU
  bool cached_synced_ = false;  // the cached forward combined statistics across replicas
};

}  // namespace detail

// Batch norm over N x C x H x W, per channel.
template <class T>
class BatchNorm2d : public detail::BatchNormBase<T, 4> {
  using Base = detail::BatchNormBase<T, 4>;

 public:
  static constexpr bool fusable_with_relu = true;
  explicit BatchNorm2d(const BatchNormOptions& opt) : Base(opt, "BatchNorm2d") {}
  Tensor<T, 4> forward(const Tensor<T, 4>& x) { return this->forward_impl(x, nullptr, false); }
  Tensor<T, 4> forward(Tensor<T, 4>&& x) { return this->forward_impl(x, &x, false); }
  Tensor<T, 4> infer(const Tensor<T, 4>& x) const { return this->infer_impl(x, false); }
  Tensor<T, 4> backward(const Tensor<T, 4>& dy) { return this->backward_impl(dy, false); }
  Tensor<T, 4> backward(Tensor<T, 4>&& dy) { return this->backward_impl(std::move(dy), false); }
  // BatchNorm then ReLU in one pass; Sequential uses these when fusion is on.
  Tensor<T, 4> forward_fused_relu(Tensor<T, 4>&& x) { return this->forward_impl(x, &x, true); }
  Tensor<T, 4> forward_fused_relu(const Tensor<T, 4>& x) { return this->forward_impl(x, nullptr, true); }
  Tensor<T, 4> backward_fused_relu(const Tensor<T, 4>& dy) { return this->backward_impl(dy, true); }
  Tensor<T, 4> backward_fused_relu(Tensor<T, 4>&& dy) { return this->backward_impl(std::move(dy), true); }
  // relu(BatchNorm(x) + s) in one pass (a residual block's end; Residual uses these). Not for a
  // SyncBatchNorm in training (std::logic_error). Backward returns dx and writes the shortcut's
  // gradient, dy masked by the ReLU, into ds (which may take dy's storage, the old ds's going to
  // the next output); s must be the forward's.
  static constexpr bool fusable_with_add_relu = true;
  Tensor<T, 4> forward_add_relu(Tensor<T, 4>&& x, const Tensor<T, 4>& s) { return this->forward_impl(x, &x, true, &s); }
  Tensor<T, 4> backward_add_relu(Tensor<T, 4>&& dy, const Tensor<T, 4>& s, Tensor<T, 4>& ds) {
    return this->backward_impl(std::move(dy), true, &s, &ds);
  }
  // The same backward without writing the shortcut's gradient, for a shortcut whose gradient is
  // only added to another tensor (an identity shortcut's, to the block's input gradient):
  // add_shortcut_grad(t, dy) adds it to t later, from the same dy, before the next forward.
  // Only where keeps_add_mask() (std::logic_error otherwise).
  Tensor<T, 4> backward_add_relu_deferred(const Tensor<T, 4>& dy, const Tensor<T, 4>& s) {
    return this->backward_deferred_impl(dy, s);
  }
  void add_shortcut_grad(Tensor<T, 4>& t, const Tensor<T, 4>& dy) const { this->add_shortcut_grad_impl(t, dy); }
};

// Batch norm over N x C, per feature.
template <class T>
class BatchNorm1d : public detail::BatchNormBase<T, 2> {
  using Base = detail::BatchNormBase<T, 2>;

 public:
  static constexpr bool fusable_with_relu = true;
  explicit BatchNorm1d(const BatchNormOptions& opt) : Base(opt, "BatchNorm1d") {}
  Tensor<T, 2> forward(const Tensor<T, 2>& x) { return this->forward_impl(x, nullptr, false); }
  Tensor<T, 2> forward(Tensor<T, 2>&& x) { return this->forward_impl(x, &x, false); }
  Tensor<T, 2> infer(const Tensor<T, 2>& x) const { return this->infer_impl(x, false); }
  Tensor<T, 2> backward(const Tensor<T, 2>& dy) { return this->backward_impl(dy, false); }
  Tensor<T, 2> backward(Tensor<T, 2>&& dy) { return this->backward_impl(std::move(dy), false); }
  Tensor<T, 2> forward_fused_relu(Tensor<T, 2>&& x) { return this->forward_impl(x, &x, true); }
  Tensor<T, 2> forward_fused_relu(const Tensor<T, 2>& x) { return this->forward_impl(x, nullptr, true); }
  Tensor<T, 2> backward_fused_relu(const Tensor<T, 2>& dy) { return this->backward_impl(dy, true); }
  Tensor<T, 2> backward_fused_relu(Tensor<T, 2>&& dy) { return this->backward_impl(std::move(dy), true); }
};

}  // namespace bnrelu::nn
