// Data-parallel training steps of the seed CNN over MPI: global batch 64 split over the ranks
// (SyncBatchNorm; DataParallel::backward_and_step with fc1's weight kept once in node memory
// and the optimizer step shared among the ranks; for comparison the same with a copy of the
// weights per rank, and bucketed MPI_Allreduce then a whole step on every rank), images/s of
// the whole job and the time each step spends reducing gradients (and, when shared, stepping).
// Run under mpirun; every rank runs the same fixed number of steps (collectives need it), and
// rank 0 reports. bench/dist_table.py runs the configurations (1 rank x 1 thread, 1 rank x 2
// threads, 2 ranks x 1 thread) and prints the README table and the cost model.
#include <bnrelu/dist/mpi.hpp>
#include <bnrelu/models/seed_cnn.hpp>
#include <bnrelu/nn/loss.hpp>
#include <bnrelu/optim/sgd.hpp>

#include <cstdio>
#include <cstdint>
#include <vector>

#include "common.hpp"

namespace {

using bnrelu::Index;
namespace dist = bnrelu::dist;

enum class Mode {
  shared_weights,  // backward_and_step, large weights kept once in node memory (the default)
  shared_step,     // backward_and_step, every rank with its own weights
  allreduce,       // backward_params (MPI_Allreduce), then opt.step() on every rank
};

void data_parallel_step(benchmark::State& state, Mode mode) {
  const bool shared_step = mode != Mode::allreduce;
  const Index global = state.range(0);
  const int ranks = dist::size();
  const Index local = global / ranks;
  bnrelu::manual_seed(0);
  auto model = bnrelu::models::seed_cnn<float>(1, 10);
  dist::DataParallel ddp(model, dist::DataParallelOptions{.share_weights = mode == Mode::shared_weights});
  bnrelu::nn::CrossEntropyLoss<float> loss;
  bnrelu::optim::SGD<float> opt(model.named_parameters(), {.lr = 0.01, .momentum = 0.9});
  bnrelu::manual_seed(1 + static_cast<std::uint64_t>(dist::rank()));
  const auto x = bnrelu::bench::random_tensor<4>({local, 1, 28, 28});
  std::vector<std::int64_t> labels(static_cast<std::size_t>(local));
  for (Index i = 0; i < local; ++i) labels[static_cast<std::size_t>(i)] = i % 10;
  auto step = [&] {
    opt.zero_grad();
    loss.forward(model.forward(x), labels);
    if (shared_step) {
      ddp.backward_and_step(loss.backward(), opt);
    } else {
      ddp.backward_params(loss.backward());
      opt.step();
    }
  };
  for (int i = 0; i < 3; ++i) step();  // warm-up
  const double mpi_before = ddp.averager().seconds();
  MPI_Barrier(MPI_COMM_WORLD);
  for (auto _ : state) step();
  MPI_Barrier(MPI_COMM_WORLD);
  const double steps = static_cast<double>(state.iterations());
  state.counters["images/s"] = benchmark::Counter(static_cast<double>(global), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["reduce_ms"] = 1e3 * (ddp.averager().seconds() - mpi_before) / steps;
  state.counters["gradient_MB"] = ranks > 1 ? static_cast<double>(ddp.averager().bytes()) / 1e6 : 0.0;
  state.counters["buckets"] = static_cast<double>(ddp.averager().num_buckets());
  state.counters["shared_step"] = shared_step && ddp.averager().shares_step();
  state.counters["shared_weights"] = ddp.shares_weights();
  state.counters["ranks"] = ranks;
  state.counters["threads"] = bnrelu::num_threads();
}

}  // namespace

int main(int argc, char** argv) {
  dist::Environment mpi(&argc, &argv);
  if (mpi.rank() != 0 && !std::freopen("/dev/null", "w", stdout)) return 1;  // rank 0 reports
  // every rank must run the same steps: a fixed count
  auto steps = [](const char* name, Mode mode) {
    return benchmark::RegisterBenchmark(name, data_parallel_step, mode)
        ->ArgName("global_batch")
        ->Arg(64)
        ->Iterations(25)
        ->Repetitions(3)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  };
  steps("data_parallel_step", Mode::shared_weights)->Arg(32);  // on one rank: a rank's share of two, alone
  // for comparison: the shared step with a copy of the weights per rank, and MPI_Allreduce
  // then a whole step on every rank
  steps("data_parallel_step_copied_weights", Mode::shared_step);
  steps("data_parallel_step_allreduce", Mode::allreduce);
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
