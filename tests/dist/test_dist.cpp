// Data parallelism over MPI, run by ctest as `mpiexec -np 2`: two ranks with batch 32 each
// must reproduce one process with batch 64 (same seed, same data) in loss, gradients,
// parameters and running statistics over 20 steps. Every rank also trains the one-process
// reference itself, locally, so the comparison needs no extra communication.
//
// In double the two runs go their own ways for all 20 steps. In float they are brought back
// to the reference's parameters and statistics before every step, and a step is compared
// wherever the two runs took the same path: the runs round differently (batch 32 + 32 against
// 64 in the batch-norm sums, and GEMM blocking that follows the matrix sizes and the CPU's
// caches), so where two values of a max-pooling window lie within rounding of each other the
// runs may pick different maxima, and the gradient goes to another pixel. That is a property
// of float arithmetic, not of data parallelism, and where it happens depends on the machine.
// So each step compares every max-pooling's argmax of the two runs (this rank's images); a
// step where any differs is not compared (its loss still is), and at most a few steps of 20
// may be left out. TwoRanksCatchAPlantedError shows that an error of 1e-4 in the averaged
// gradients fails the comparison.
#include <bnrelu/bnrelu.hpp>
#include <bnrelu/dist/mpi.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace {

using bnrelu::Index;
using bnrelu::Tensor;
namespace dist = bnrelu::dist;

// Largest |a - b| relative to the largest |b|, or to floor if larger (so that a tensor that is
// zero up to rounding is not judged by its rounding alone).
template <class A, class B>
double rel_diff(const A& a, const B& b, double floor = 1e-3) {
  double diff = 0, scale = floor;
  for (std::size_t i = 0; i < std::size(b); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
    scale = std::max(scale, std::abs(static_cast<double>(b[i])));
  }
  return diff / scale;
}

// How the distributed run takes its optimizer steps.
enum class Steps {
  averaged,  // average_gradients() or backward_params() (alternately), then opt.step()
  shared,    // backward_and_step(): the ranks share the step's work
};

// Whether every max-pooling of model (this rank's images) chose the same maxima as the
// reference's over the global batch (rank's images at offset rank * local).
template <class M>
bool same_pooling_path(const M& model, const M& reference, int rank, bnrelu::Index local, bnrelu::Index global) {
  auto same = [&](const auto& mine, const auto& all) {
    if (all.size() % static_cast<std::size_t>(global) != 0) return false;
    const std::size_t per_image = all.size() / static_cast<std::size_t>(global);
    if (mine.size() != per_image * static_cast<std::size_t>(local)) return false;
    return std::equal(mine.begin(), mine.end(), all.begin() + static_cast<std::ptrdiff_t>(per_image * rank * local));
  };
  return same(model.template get<3>().argmax(), reference.template get<3>().argmax()) &&
         same(model.template get<7>().argmax(), reference.template get<7>().argmax());
}

// The comparisons run the seed CNN on 12 x 12 images: every layer of the 28 x 28 model, with a
// 1152-wide first Linear where 28 x 28 has a 6272-wide one; the suite runs in 16 s, 49 s at 28 x 28.
constexpr Index kSide = 12;

// What a run compared: the largest relative difference seen, and how many steps were left out
// because the two runs' max-poolings took different paths (only with resync).
struct Comparison {
  double worst = 0;
  int skipped = 0;
};

// Runs the comparison; every difference beyond tol is also reported as a test failure unless
// expect_pass is false. plant scales the averaged gradients by (1 + plant) before each step.
template <class T, class Opt = bnrelu::optim::SGD<T>>
Comparison compare_two_ranks(double tol, bool resync, Steps steps = Steps::averaged,
                             typename Opt::options_type options = {.lr = 0.05, .momentum = 0.9},
                             dist::DataParallelOptions ddp_options = {}, bool expect_pass = true, double plant = 0) {
  Comparison result;
  bool last_compared = true;  // whether the last step was compared
  // records d (a relative difference) and, when expected to pass, checks it
  auto check = [&](double d, const std::string& what) {
    result.worst = std::max(result.worst, d);
    if (expect_pass) {
      EXPECT_LE(d, tol) << what;
    }
  };
  EXPECT_EQ(dist::size(), 2) << "run with mpiexec -np 2";
  if (dist::size() != 2) return result;
  const int rank = dist::rank();
  const Index global = 64, local = global / 2;
  bnrelu::manual_seed(11);
  auto reference = bnrelu::models::seed_cnn<T>(1, 10, kSide, kSide);
  bnrelu::manual_seed(11 + static_cast<std::uint64_t>(rank));  // rank 1 starts different: broadcast must fix it
  auto model = bnrelu::models::seed_cnn<T>(1, 10, kSide, kSide);
  auto ddp_owned = std::make_unique<dist::DataParallel<decltype(model)>>(model, ddp_options);
  auto& ddp = *ddp_owned;
  EXPECT_EQ(ddp.shares_weights(), ddp_options.share_weights);
  Opt opt_ref(reference.named_parameters(), options);
  Opt opt(model.named_parameters(), options);
  bnrelu::nn::CrossEntropyLoss<T> loss_ref, loss;
  bnrelu::manual_seed(99);  // the data: the same on every rank
  for (int step = 0; step < 20; ++step) {
    SCOPED_TRACE(::testing::Message() << "rank " << rank << " step " << step);
    Tensor<T, 4> x(global, 1, kSide, kSide);
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<T>(bnrelu::uniform(-1, 2));
    std::vector<std::int64_t> labels(global);
    for (auto& l : labels) l = static_cast<std::int64_t>(bnrelu::uniform(0, 10)) % 10;
    // this rank's half of the batch
    Tensor<T, 4> xs(local, 1, kSide, kSide);
    std::copy_n(x.data() + rank * local * kSide * kSide, xs.size(), xs.data());
    const std::vector<std::int64_t> ls(labels.begin() + rank * local, labels.begin() + (rank + 1) * local);

    if (resync) {
      // shared weights are one copy for both ranks: no rank may still be reading them
      if (ddp.shares_weights()) MPI_Barrier(MPI_COMM_WORLD);
      auto p = model.named_parameters(), q = reference.named_parameters();
      for (std::size_t i = 0; i < p.size(); ++i) std::copy(q[i].value.begin(), q[i].value.end(), p[i].value.begin());
      auto b = model.named_buffers(), c = reference.named_buffers();
      for (std::size_t i = 0; i < b.size(); ++i) std::copy(c[i].value.begin(), c[i].value.end(), b[i].value.begin());
      // and the optimizer's state (momentum), so that a step left out does not carry into the next
      auto s = opt.state(), r = opt_ref.state();
      for (std::size_t i = 0; i < s.size(); ++i) *s[i].second = *r[i].second;
      if (ddp.shares_weights()) MPI_Barrier(MPI_COMM_WORLD);
    }
    opt_ref.zero_grad();
    const double want = loss_ref.forward(reference.forward(x), labels);
    reference.backward_params(loss_ref.backward());
    opt.zero_grad();
    const double got = dist::DataParallel<decltype(model)>::mean_over_ranks(loss.forward(model.forward(xs), ls));
    check(std::abs(got - want) / std::max(1e-3, std::abs(want)), "loss " + std::to_string(got) + " vs " + std::to_string(want));
    // both ranks must agree on leaving a step out (the shared step's collectives need both)
    const bool same_path = !resync || dist::sum_over_ranks(same_pooling_path(model, reference, rank, local, global) ? 0.0 : 1.0) == 0;
    if (!same_path) ++result.skipped;
    last_compared = same_path;
    auto p = model.named_parameters(), q = reference.named_parameters();
    if (steps == Steps::shared) {
      ddp.backward_and_step(loss.backward(), opt);
      opt_ref.step();
      if (!same_path) continue;
      for (std::size_t i = 0; i < p.size(); ++i) check(rel_diff(p[i].value, q[i].value), p[i].name);
      // the same bits on both ranks
      for (auto& param : p) {
        std::vector<T> root(param.value.begin(), param.value.end());
        MPI_Bcast(root.data(), static_cast<int>(root.size()), dist::detail::mpi_type<T>(), 0, MPI_COMM_WORLD);
        EXPECT_TRUE(std::equal(root.begin(), root.end(), param.value.begin())) << param.name << " differs between ranks";
      }
      auto b = model.named_buffers(), c = reference.named_buffers();
      for (std::size_t i = 0; i < b.size(); ++i) check(rel_diff(b[i].value, c[i].value), b[i].name);
      continue;
    }
    if (step % 2 == 0) {  // both ways of averaging
      model.backward_params(loss.backward());
      ddp.average_gradients();
    } else {
      ddp.backward_params(loss.backward());
    }
    if (plant != 0)
      for (auto& param : p)
        for (auto& g : param.grad) g *= static_cast<T>(1 + plant);
    // gradients relative to the largest gradient of the model: a convolution's bias before a
    // batch norm has a gradient of exactly 0 in exact arithmetic, so only rounding is left of it
    double grad_scale = 0;
    for (auto& g : q)
      for (auto v : g.grad) grad_scale = std::max(grad_scale, std::abs(static_cast<double>(v)));
    if (same_path)
      for (std::size_t i = 0; i < p.size(); ++i) check(rel_diff(p[i].grad, q[i].grad, grad_scale), p[i].name + " grad");
    opt_ref.step();
    opt.step();
    if (!same_path) continue;
    for (std::size_t i = 0; i < p.size(); ++i) check(rel_diff(p[i].value, q[i].value), p[i].name);
    auto b = model.named_buffers(), c = reference.named_buffers();
    for (std::size_t i = 0; i < b.size(); ++i) check(rel_diff(b[i].value, c[i].value), b[i].name);
  }
  // a machine where more steps part ways would leave too little compared
  EXPECT_LE(result.skipped, 4) << "steps whose max-poolings took different paths";
  if (!expect_pass || !last_compared) return result;
  // the optimizer's state, made whole, is the one process's (relative to its largest value, as
  // the gradients: the momentum of a bias before a batch norm holds rounding alone)
  ddp.gather_optimizer_state(opt);
  auto state = opt.state(), want_state = opt_ref.state();
  EXPECT_EQ(state.size(), want_state.size());
  if (state.size() != want_state.size()) return result;
  double state_scale = 0;
  for (auto& [name, values] : want_state)
    for (auto v : *values) state_scale = std::max(state_scale, std::abs(static_cast<double>(v)));
  for (std::size_t i = 0; i < state.size(); ++i)
    EXPECT_LE(rel_diff(*state[i].second, *want_state[i].second, state_scale), tol) << state[i].first;
  EXPECT_EQ(opt.steps(), 20);
  if (ddp.shares_weights()) {
    EXPECT_THROW(ddp.average_gradients(), std::logic_error);
    EXPECT_THROW(model.template get<9>().weight(), std::logic_error);  // fc1: shared in either test
  }
  // the model is a plain model again: eval and checkpoints behave as for one process, and
  // shared weights are back in their layers
  ddp_owned.reset();
  EXPECT_EQ(model.template get<1>().num_batches_tracked(), 20);
  auto p = model.named_parameters(), q = reference.named_parameters();
  for (std::size_t i = 0; i < p.size(); ++i) EXPECT_LE(rel_diff(p[i].value, q[i].value), tol) << p[i].name;
  const auto fc1 = std::find_if(p.begin(), p.end(), [](const auto& param) { return param.name == "9.weight"; });
  EXPECT_NE(fc1, p.end());
  if (fc1 != p.end()) {
    EXPECT_EQ(fc1->value.data(), model.template get<9>().weight().data());  // the layer's own tensor again
  }
  return result;
}

template <class T, class Opt = bnrelu::optim::SGD<T>>
void two_ranks_equal_one_process(double tol, bool resync, Steps steps = Steps::averaged,
                                 typename Opt::options_type options = {.lr = 0.05, .momentum = 0.9},
                                 dist::DataParallelOptions ddp_options = {}) {
  const auto result = compare_two_ranks<T, Opt>(tol, resync, steps, options, ddp_options);
  if (resync) ::testing::Test::RecordProperty("steps_left_out", result.skipped);
}

TEST(DataParallel, TwoRanksOfBatch32EqualOneProcessOfBatch64Double) { two_ranks_equal_one_process<double>(1e-9, false); }
TEST(DataParallel, TwoRanksOfBatch32EqualOneProcessOfBatch64FloatEachStep) {
  two_ranks_equal_one_process<float>(1e-5, true);
}

// The float comparison is sharp enough to see an error of 1e-4 in the averaged gradients.
TEST(DataParallel, TwoRanksCatchAPlantedError) {
  const auto result = compare_two_ranks<float>(1e-5, true, Steps::averaged, {.lr = 0.05, .momentum = 0.9}, {},
                                               /*expect_pass=*/false, /*plant=*/1e-4);
  EXPECT_GT(result.worst, 1e-5);
}

TEST(DataParallel, SharedStepsEqualOneProcessDouble) { two_ranks_equal_one_process<double>(1e-9, false, Steps::shared); }
TEST(DataParallel, SharedStepsEqualOneProcessFloatEachStep) { two_ranks_equal_one_process<float>(1e-5, true, Steps::shared); }
TEST(DataParallel, SharedAdamStepsEqualOneProcessDouble) {
  two_ranks_equal_one_process<double, bnrelu::optim::Adam<double>>(1e-9, false, Steps::shared, {.lr = 1e-3, .weight_decay = 1e-2});
}
TEST(DataParallel, SharedWeightsEqualOneProcessDouble) {
  // every weight of the model placed in node memory, between parameters that are not
  two_ranks_equal_one_process<double>(1e-9, false, Steps::shared, {.lr = 0.05, .momentum = 0.9},
                                      {.share_weights = true, .shared_weight_bytes = 0});
}
TEST(DataParallel, SharedWeightsEqualOneProcessFloatEachStep) {
  // fc1's weight alone (12.8 MB) placed in node memory
  two_ranks_equal_one_process<float>(1e-5, true, Steps::shared, {.lr = 0.05, .momentum = 0.9}, {.share_weights = true});
}
// An optimizer built before the weights moved to node memory is refused until rebound.
TEST(DataParallel, SharedWeightsNeedTheOptimizerRebound) {
  bnrelu::manual_seed(3);
  auto model = bnrelu::models::seed_cnn<float>(1, 10);
  bnrelu::optim::SGD<float> opt(model.named_parameters(), {.lr = 0.01, .momentum = 0.9});
  dist::DataParallel ddp(model, {.share_weights = true});
  ASSERT_TRUE(ddp.shares_weights());
  Tensor<float, 4> x(4, 1, 28, 28);
  x.setConstant(0.5f);
  x(0, 0, 3, 3) = static_cast<float>(dist::rank());
  const std::vector<std::int64_t> labels{1, 2, 3, 4};
  bnrelu::nn::CrossEntropyLoss<float> loss;
  loss.forward(model.forward(x), labels);
  opt.zero_grad();  // writes where the weights were: still valid memory, unused
  EXPECT_THROW(ddp.backward_and_step(loss.backward(), opt), std::invalid_argument);
  auto other = bnrelu::models::seed_cnn<float>(1, 7);  // fc2 of another size
  EXPECT_THROW(opt.rebind(other.named_parameters()), bnrelu::shape_error);
  opt.rebind(model.named_parameters());
  opt.zero_grad();
  loss.forward(model.forward(x), labels);
  EXPECT_NO_THROW(ddp.backward_and_step(loss.backward(), opt));
  EXPECT_EQ(opt.steps(), 1);
  EXPECT_THROW(ddp.backward_params(loss.backward()), std::logic_error);
  // a copy of the model owns its weights: the next step leaves it as it was
  auto snapshot = model;
  const auto& kept = snapshot.template get<9>().weight();
  const std::vector<float> before(kept.data(), kept.data() + kept.size());
  opt.zero_grad();
  loss.forward(model.forward(x), labels);
  ddp.backward_and_step(loss.backward(), opt);
  EXPECT_EQ(std::vector<float>(kept.data(), kept.data() + kept.size()), before);
  EXPECT_NE(std::vector<float>(model.named_parameters()[8].value.begin(), model.named_parameters()[8].value.end()), before);
}

TEST(DataParallel, SharedNesterovStepsEqualOneProcessDouble) {
  two_ranks_equal_one_process<double>(1e-9, false, Steps::shared,
                                      {.lr = 0.05, .momentum = 0.9, .weight_decay = 1e-3, .nesterov = true});
}

// Random gradients of odd sizes (parts of the flat gradient cut tensors anywhere), different on
// each rank.
template <class T>
struct Gradients {
  std::vector<std::vector<T>> values, grads;
  std::vector<bnrelu::ParamRef<T>> refs;
  explicit Gradients(std::uint64_t seed) {
    bnrelu::manual_seed(seed + static_cast<std::uint64_t>(dist::rank()));
    for (std::size_t n : {7u, 1u, 4099u, 33u, 130001u, 3u}) {
      values.emplace_back(n, T(1));
      grads.emplace_back(n);
      for (auto& g : grads.back()) g = static_cast<T>(bnrelu::uniform(-1, 1));
    }
    for (std::size_t k = 0; k < values.size(); ++k)
      refs.push_back({"p" + std::to_string(k), {static_cast<Index>(values[k].size())}, values[k], grads[k]});
  }
};

// The ranks as one node (MPI_COMM_NULL: found by MPI), or as one node each (the parts are then
// allreduced between "nodes").
std::vector<MPI_Comm> node_layouts(std::vector<MPI_Comm>& owned) {
  MPI_Comm alone = MPI_COMM_NULL;
  MPI_Comm_split(MPI_COMM_WORLD, dist::rank(), 0, &alone);
  owned.push_back(alone);
  return {MPI_COMM_NULL, alone};
}

template <class T>
void shared_memory_sums_equal_allreduce() {
  std::vector<MPI_Comm> owned;
  for (MPI_Comm node : node_layouts(owned)) {
    SCOPED_TRACE(node == MPI_COMM_NULL ? "one node" : "a node per rank");
    for (bool divide : {true, false}) {
      Gradients<T> a(5), b(5);
      dist::GradientAverager<T> shared(a.refs, 4u << 20, dist::Reduction::node_shared_memory, node);
      dist::GradientAverager<T> mpi(b.refs, 4u << 10, dist::Reduction::mpi_allreduce);
      ASSERT_EQ(shared.reduction(), dist::Reduction::node_shared_memory);
      ASSERT_EQ(mpi.reduction(), dist::Reduction::mpi_allreduce);
      for (int round = 0; round < 2; ++round) {  // the slots are reused
        shared.average(divide);
        mpi.average(divide);
        for (std::size_t k = 0; k < a.grads.size(); ++k) EXPECT_EQ(a.grads[k], b.grads[k]) << "tensor " << k;
      }
    }
  }
  for (MPI_Comm c : owned) MPI_Comm_free(&c);
}
TEST(GradientAverager, SharedMemorySumsEqualAllreduceFloat) { shared_memory_sums_equal_allreduce<float>(); }
TEST(GradientAverager, SharedMemorySumsEqualAllreduceDouble) { shared_memory_sums_equal_allreduce<double>(); }

// A shared step gives the bits of averaging then stepping, on every rank.
TEST(GradientAverager, SharedStepEqualsAverageThenStep) {
  std::vector<MPI_Comm> owned;
  for (MPI_Comm node : node_layouts(owned)) {
    SCOPED_TRACE(node == MPI_COMM_NULL ? "one node" : "a node per rank");
    Gradients<float> a(8), b(8);
    dist::GradientAverager<float> shared(a.refs, 4u << 20, dist::Reduction::node_shared_memory, node);
    dist::GradientAverager<float> mpi(b.refs, 4u << 20, dist::Reduction::mpi_allreduce);
    ASSERT_TRUE(shared.shares_step());
    ASSERT_FALSE(mpi.shares_step());
    bnrelu::optim::SGD<float> opt_a(a.refs, {.lr = 0.1, .momentum = 0.9}), opt_b(b.refs, {.lr = 0.1, .momentum = 0.9});
    for (int round = 0; round < 3; ++round) {
      shared.step(opt_a);
      mpi.step(opt_b);
      for (std::size_t k = 0; k < a.values.size(); ++k) EXPECT_EQ(a.values[k], b.values[k]) << "tensor " << k;
      Gradients<float> next(20 + static_cast<std::uint64_t>(round));  // new gradients, different on each rank
      for (std::size_t k = 0; k < next.grads.size(); ++k) {  // in place: the optimizers view them
        std::copy(next.grads[k].begin(), next.grads[k].end(), a.grads[k].begin());
        std::copy(next.grads[k].begin(), next.grads[k].end(), b.grads[k].begin());
      }
    }
    EXPECT_EQ(opt_a.steps(), 3);
    shared.gather_state(opt_a);
    auto sa = opt_a.state(), sb = opt_b.state();
    for (std::size_t k = 0; k < sa.size(); ++k) EXPECT_EQ(*sa[k].second, *sb[k].second) << sa[k].first;
    // an optimizer over other parameters is refused
    Gradients<float> c(9);
    bnrelu::optim::SGD<float> other(c.refs, {.lr = 0.1});
    EXPECT_THROW(shared.step(other), std::invalid_argument);
  }
  for (MPI_Comm c : owned) MPI_Comm_free(&c);
}

// An optimizer that updates whole tensors only (no step_part): plain SGD written as step().
template <class T>
class WholeTensorSGD : public bnrelu::optim::Optimizer<T> {
 public:
  WholeTensorSGD(std::vector<bnrelu::ParamRef<T>> params, double lr) : bnrelu::optim::Optimizer<T>(std::move(params)) {
    this->lr_ = lr;
  }
  void step() override {
    for (auto& p : this->params_)
      for (std::size_t i = 0; i < p.value.size(); ++i) p.value[i] -= static_cast<T>(this->lr_) * p.grad[i];
    this->set_steps(this->steps() + 1);
  }
  std::vector<std::pair<std::string, std::vector<T>*>> state() override { return {}; }
};

// Such an optimizer still takes shared steps, as average() then step(); shared weights refuse it.
TEST(GradientAverager, OptimizersWithoutStepPartAverageThenStep) {
  Gradients<float> a(30), b(30);
  dist::GradientAverager<float> shared(a.refs, 4u << 20, dist::Reduction::node_shared_memory);
  dist::GradientAverager<float> mpi(b.refs, 4u << 20, dist::Reduction::mpi_allreduce);
  WholeTensorSGD<float> whole(a.refs, 0.1);
  bnrelu::optim::SGD<float> sgd(b.refs, {.lr = 0.1});
  ASSERT_FALSE(whole.has_step_part());
  shared.step(whole);
  mpi.step(sgd);
  for (std::size_t k = 0; k < a.values.size(); ++k) EXPECT_EQ(a.values[k], b.values[k]) << "tensor " << k;

  bnrelu::manual_seed(3);
  auto model = bnrelu::models::seed_cnn<float>(1, 10);
  dist::DataParallel ddp(model, {.share_weights = true});
  WholeTensorSGD<float> opt(model.named_parameters(), 0.1);
  Tensor<float, 4> x(2, 1, 28, 28);
  x.setConstant(0.25f);
  bnrelu::nn::CrossEntropyLoss<float> loss;
  loss.forward(model.forward(x), std::vector<std::int64_t>{0, 1});
  EXPECT_THROW(ddp.backward_and_step(loss.backward(), opt), std::logic_error);
}

// The SyncBatchNorm backward works in groups of channels (here 8 groups of 2), each with its own
// reduction: ranks with different batches must still make the same groups, and the result is the
// whole batch's.
TEST(DataParallel, SyncBatchNormGroupsChannelsAlikeOnUnevenRanks) {
  const Index rows0 = 1, rows1 = 5, total = rows0 + rows1, C = 16, H = 64, W = 64;
  bnrelu::manual_seed(23);
  Tensor<double, 4> x(total, C, H, W), dy(total, C, H, W);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = bnrelu::uniform(-2, 2);
  for (Index i = 0; i < dy.size(); ++i) dy.data()[i] = bnrelu::uniform(-1, 1);
  bnrelu::nn::BatchNormReLU2d<double> whole({.num_features = C}), mine({.num_features = C});
  const auto want = whole.forward(x);
  const auto want_dx = whole.backward(dy);
  mine.set_reducer(std::make_shared<dist::MpiBatchNormReducer>());
  const Index first = dist::rank() == 0 ? 0 : rows0, n = dist::rank() == 0 ? rows0 : rows1, image = C * H * W;
  Tensor<double, 4> xs(n, C, H, W), dys(n, C, H, W);
  std::copy_n(x.data() + first * image, n * image, xs.data());
  std::copy_n(dy.data() + first * image, n * image, dys.data());
  const auto got = mine.forward(xs);
  const auto got_dx = mine.backward(dys);
  double err = 0, err_dx = 0;
  for (Index i = 0; i < got.size(); ++i) err = std::max(err, std::abs(got.data()[i] - want.data()[first * image + i]));
  for (Index i = 0; i < got_dx.size(); ++i)
    err_dx = std::max(err_dx, std::abs(got_dx.data()[i] - want_dx.data()[first * image + i]));
  EXPECT_LE(err, 1e-12);
  EXPECT_LE(err_dx, 1e-12);
  // the parameter gradients are this rank's share: summed over ranks, the whole batch's
  std::vector<double> dw(mine.weight_grad().data(), mine.weight_grad().data() + C);
  MPI_Allreduce(MPI_IN_PLACE, dw.data(), static_cast<int>(C), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  for (Index c = 0; c < C; ++c) EXPECT_NEAR(dw[static_cast<std::size_t>(c)], whole.weight_grad()(c), 1e-9);
}

TEST(DataParallel, ShardsAreDisjointAndMakeTheGlobalBatch) {
  bnrelu::data::Mnist set;
  set.images = Tensor<float, 4>(103, 1, 2, 2);
  for (Index i = 0; i < set.images.size(); ++i) set.images.data()[i] = static_cast<float>(i / 4);  // image id
  set.labels.assign(103, 0);
  bnrelu::data::DataLoader<float> one(set, {.batch_size = 16, .seed = 3});
  bnrelu::data::DataLoader<float> mine(set, {.batch_size = 8, .seed = 3, .rank = dist::rank(), .world_size = 2});
  one.start_epoch(2);
  mine.start_epoch(2);
  EXPECT_EQ(mine.num_batches(), one.num_batches());  // 6 full global batches and 7 images cut to 3 + 3
  bnrelu::data::Batch<float> a, b;
  std::vector<float> seen;
  while (one.next(a)) {
    ASSERT_TRUE(mine.next(b));
    std::vector<float> mine_ids;
    for (Index i = 0; i < b.images.dimension(0); ++i) mine_ids.push_back(b.images(i, 0, 0, 0));
    // gather both ranks' ids of this batch on every rank
    std::vector<int> counts(2), displs{0, 0};
    int n = static_cast<int>(mine_ids.size());
    MPI_Allgather(&n, 1, MPI_INT, counts.data(), 1, MPI_INT, MPI_COMM_WORLD);
    displs[1] = counts[0];
    std::vector<float> all(static_cast<std::size_t>(counts[0] + counts[1]));
    MPI_Allgatherv(mine_ids.data(), n, MPI_FLOAT, all.data(), counts.data(), displs.data(), MPI_FLOAT, MPI_COMM_WORLD);
    std::vector<float> want;
    for (Index i = 0; i < a.images.dimension(0) / 2 * 2; ++i) want.push_back(a.images(i, 0, 0, 0));
    EXPECT_EQ(all, want);  // rank 0's part then rank 1's part is the one-process batch, in order
  }
  EXPECT_FALSE(mine.next(b));
}

// SyncBatchNorm checks the batch over all ranks: one row, or none, on a rank is fine when the
// global batch has more than one, and the result is the one-process batch norm of all rows.
TEST(DataParallel, SyncBatchNormTakesOneOrNoRowOnARank) {
  for (Index rows0 : {1, 0}) {
    SCOPED_TRACE(rows0);
    const Index rows1 = 3, total = rows0 + rows1;
    bnrelu::manual_seed(21);
    Tensor<double, 2> x(total, 4), dy(total, 4);
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = bnrelu::uniform(-2, 2);
    for (Index i = 0; i < dy.size(); ++i) dy.data()[i] = bnrelu::uniform(-1, 1);
    bnrelu::nn::BatchNormReLU1d<double> whole({.num_features = 4}), mine({.num_features = 4});
    const auto want = whole.forward(x);
    const auto want_dx = whole.backward(dy);
    mine.set_reducer(std::make_shared<dist::MpiBatchNormReducer>());
    const Index first = dist::rank() == 0 ? 0 : rows0, n = dist::rank() == 0 ? rows0 : rows1;
    Tensor<double, 2> xs(n, 4), dys(n, 4);
    std::copy_n(x.data() + first * 4, n * 4, xs.data());
    std::copy_n(dy.data() + first * 4, n * 4, dys.data());
    const auto got = mine.forward(xs);
    // each rank's dy rows are the whole batch's, so the summed channel sums are the whole's
    const auto got_dx = mine.backward(dys);
    for (Index i = 0; i < got.size(); ++i) EXPECT_NEAR(got.data()[i], want.data()[first * 4 + i], 1e-12);
    for (Index i = 0; i < got_dx.size(); ++i) EXPECT_NEAR(got_dx.data()[i], want_dx.data()[first * 4 + i], 1e-12);
    for (Index c = 0; c < 4; ++c) EXPECT_NEAR(mine.running_var()(c), whole.running_var()(c), 1e-12);
  }
  // a global batch of one row throws on every rank alike
  bnrelu::nn::BatchNorm1d<double> bn({.num_features = 2});
  bn.set_reducer(std::make_shared<dist::MpiBatchNormReducer>());
  Tensor<double, 2> one(dist::rank() == 0 ? 1 : 0, 2);
  one.setConstant(1.0);
  EXPECT_THROW(bn.forward(one), bnrelu::shape_error);
}

}  // namespace

int main(int argc, char** argv) {
  dist::Environment mpi(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  // every rank reports (a failure may show on one rank only), and any failure fails the run
  const int failed = RUN_ALL_TESTS();
  int any = failed;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return any;
}
