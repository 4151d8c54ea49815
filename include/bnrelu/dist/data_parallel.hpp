// DataParallel: a model trained as replicas over MPI ranks (state broadcast, SyncBatchNorm,
// gradient averaging), and the broadcast of a model's state.
#pragma once

#include "../nn/layer.hpp"
#include "gradient_averager.hpp"
#include "sync_batchnorm.hpp"

namespace bnrelu::dist {

// Copies rank root's parameters, buffers and batch counters to every rank.
template <class Model>
void broadcast_state(Model& model, int root = 0) {
  using T = typename Model::value_type;
  auto bcast = [&](std::span<T> v) {
    detail::check(MPI_Bcast(v.data(), static_cast<int>(v.size()), detail::mpi_type<T>(), root, MPI_COMM_WORLD),
                  "MPI_Bcast of the model state");
  };
  for (auto& p : model.named_parameters()) bcast(p.value);
  for (auto& b : model.named_buffers()) bcast(b.value);
  nn::for_each_batch_counter(model, "", [&](const std::string&, std::int64_t& n) {
    detail::check(MPI_Bcast(&n, 1, MPI_INT64_T, root, MPI_COMM_WORLD), "MPI_Bcast of a batch counter");
  });
}

struct DataParallelOptions {
  // MPI_Allreduce buckets (see GradientAverager).
  std::size_t bucket_bytes = 4u << 20;
  Reduction reduction = Reduction::automatic;
  // Keep one copy of each large weight (of a Linear or Conv2d at the model's top level, from
  // shared_weight_bytes up) for all ranks of a machine, in node-shared memory: the ranks read
  // the same weight, and backward_and_step updates each part of it in place, once, instead of
  // copying it between processes. Each rank's gradient of it lives there too. Training must
  // then step through backward_and_step (backward_params and average_gradients throw), with an
  // optimizer built on model.named_parameters() after the DataParallel (or rebind()-ed to
  // them); the layers' weight() and weight_grad() throw while shared (named_parameters() views
  // them). Without node-shared memory (one rank per machine, Reduction::mpi_allreduce) the
  // weights stay where they are.
  bool share_weights = false;
  std::size_t shared_weight_bytes = 1u << 20;
};

// Wraps a model (a Sequential) for data parallelism over MPI_COMM_WORLD: copies rank 0's state
// to every rank, makes every batch norm a SyncBatchNorm (fused with its ReLU as before), and
// averages gradients after backward. The model stays a plain model: checkpoints saved from any
// rank load into a single process (shared weights go back into their layers when the
// DataParallel is destroyed).
template <class Model>
class DataParallel {
 public:
  using T = typename Model::value_type;

  explicit DataParallel(Model& model, std::size_t bucket_bytes = 4u << 20, Reduction reduction = Reduction::automatic)
      : DataParallel(model, DataParallelOptions{.bucket_bytes = bucket_bytes, .reduction = reduction}) {}
  DataParallel(Model& model, const DataParallelOptions& options)
      : model_(checked(model)),
        sharable_(sharable(model, options)),
        averager_(model.named_parameters(), options.bucket_bytes, options.reduction, MPI_COMM_NULL, sharable_) {
    broadcast_state(model_);
    if (size() > 1) model_.set_batchnorm_reducer(std::make_shared<MpiBatchNormReducer>());
    if (detail::any_marked(sharable_) && averager_.shares_step()) place_weights(true);
  }
  ~DataParallel() {
    if (shares_weights_) place_weights(false);
    model_.set_batchnorm_reducer(nullptr);
  }
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  // Whether weights live in node-shared memory (DataParallelOptions::share_weights).
  bool shares_weights() const { return shares_weights_; }

  Model& model() { return model_; }
  // After the model's own backward: every gradient becomes the mean over ranks.
  void average_gradients() {
    refuse_with_shared_weights("average_gradients");
    if (size() > 1) averager_.average();
  }
  // The model's backward_params and average_gradients in one, cheaper: dy (the gradient of this
  // rank's mean loss) is divided by the rank count before the backward, which scales every
  // gradient alike (the backward is linear in dy, SyncBatchNorm included), so the allreduce
  // alone leaves the mean and no pass over the gradients is needed to divide them.
  template <class Dy>
  void backward_params(Dy&& dy) {
    refuse_with_shared_weights("backward_params");
    backward_of_mean(std::forward<Dy>(dy));
    if (size() > 1) averager_.average(false);
  }
  // The model's backward, then one step of opt (built on model.named_parameters()) from the
  // gradients' mean over ranks, its work shared among the ranks of each node: see
  // GradientAverager::step. Cheaper than backward_params then opt.step(); afterwards the
  // gradients are not averaged, and the optimizer's state is current only in this rank's part
  // until gather_optimizer_state(opt).
  template <class Dy>
  void backward_and_step(Dy&& dy, optim::Optimizer<T>& opt) {
    averager_.check_parameters(opt);  // before the backward's collectives
    if (shares_weights_ && !opt.has_step_part())
      throw std::logic_error("bnrelu::dist::DataParallel: shared weights need an optimizer with step_part (SGD, Adam, AdamW)");
    backward_of_mean(std::forward<Dy>(dy));
    if (size() > 1)
      averager_.step(opt, false);
    else
      opt.step();
  }
  // Makes the optimizer's state whole on every rank after backward_and_step, before it is
  // saved. Collective: every rank calls it.
  void gather_optimizer_state(optim::Optimizer<T>& opt) {
    if (size() > 1) averager_.gather_state(opt);
  }
  const GradientAverager<T>& averager() const { return averager_; }

  // The mean of a per-rank scalar (such as the local loss) over ranks.
  static double mean_over_ranks(double v) { return sum_over_ranks(v) / dist::size(); }

 private:
  // The model's backward from dy / ranks: the summed gradients are then the mean's.
  template <class Dy>
  void backward_of_mean(Dy&& dy) {
    if (size() == 1) return model_.backward_params(std::forward<Dy>(dy));
    auto scaled = std::remove_cvref_t<Dy>(std::forward<Dy>(dy));
    scaled = scaled * static_cast<T>(1.0 / size());
    model_.backward_params(std::move(scaled));
  }

  static Model& checked(Model& model) {
    if (!running()) throw std::logic_error("bnrelu::dist::DataParallel: MPI is not initialised (use dist::Environment)");
    return model;
  }

  // Calls f(k, layer) for each layer at the top of the model whose weight can be placed
  // elsewhere, k being the index of "<layer>.weight" in named_parameters().
  template <class F>
  static void for_each_placeable(Model& model, F&& f) {
    const auto params = model.named_parameters();
    model.for_each_indexed([&](std::size_t i, auto& layer) {
      if constexpr (requires { layer.place_weight(nullptr, nullptr, true); }) {
        const std::string name = std::to_string(i) + ".weight";
        for (std::size_t k = 0; k < params.size(); ++k)
          if (params[k].name == name) f(k, layer);
      }
    });
  }

  static std::vector<bool> sharable(Model& model, const DataParallelOptions& options) {
    const auto params = model.named_parameters();
    std::vector<bool> shared(params.size(), false);
    if (!options.share_weights) return shared;
    for_each_placeable(model, [&](std::size_t k, auto&) {
      shared[k] = params[k].value.size() * sizeof(T) >= options.shared_weight_bytes;
    });
    return shared;
  }

  // Moves the shared weights into node memory (local rank 0 copies the values: they are the
  // same on every rank after the broadcast), or back into their layers.
  void place_weights(bool shared) {
    for_each_placeable(model_, [&](std::size_t k, auto& layer) {
      if (!sharable_[k]) return;
      if (shared)
        layer.place_weight(averager_.shared_value(k), averager_.shared_grad(k), averager_.local_rank() == 0);
      else
        layer.place_weight(nullptr, nullptr);
    });
    shares_weights_ = shared;
    if (shared) averager_.rebind(model_.named_parameters());
  }

  void refuse_with_shared_weights(const char* what) const {
    if (shares_weights_)
      throw std::logic_error(std::string("bnrelu::dist::DataParallel::") + what +
                             ": the weights are shared between ranks; step with backward_and_step");
  }

  Model& model_;
  std::vector<bool> sharable_;
  GradientAverager<T> averager_;
  bool shares_weights_ = false;
};

}  // namespace bnrelu::dist
