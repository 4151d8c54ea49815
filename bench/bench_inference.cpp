// Inference of the seed CNN (1 x 28 x 28 in, 10 classes) after fuse_for_inference, through the
// const path (infer) and the eval forward, at batch 64 and 1 on 1 and 2 threads; and one model
// shared by several calling threads, each call on one bnrelu thread.
//
//   bench_inference [Google Benchmark flags]
//   bench_inference --export-onnx PATH   writes the benchmarked model as ONNX (for
//                                        bench/inference_table.py, which runs it in ONNX Runtime)
#include <benchmark/benchmark.h>

#include <cstring>
#include <iostream>

#include <bnrelu/models/seed_cnn.hpp>
#ifdef BNRELU_HAVE_ONNX
#include <bnrelu/io/onnx.hpp>
#endif

#include "common.hpp"

namespace {

using bnrelu::Index;
using Model = bnrelu::models::SeedCNN<float>;

// The model every benchmark runs: seeded weights, running statistics from two training-mode
// forwards (so that folding sees real ones), folded for inference.
Model& model() {
  static Model m = [] {
    bnrelu::manual_seed(1);
    Model built = bnrelu::models::seed_cnn<float>(1, 10);
    for (int i = 0; i < 2; ++i) built.forward(bnrelu::bench::random_tensor<4>({32, 1, 28, 28}));
    built.fuse_for_inference();
    return built;
  }();
  return m;
}

void run(benchmark::State& state, bool const_path) {
  const int threads = static_cast<int>(state.range(0));
  const Index batch = state.range(1);
  bnrelu::set_num_threads(threads);
  Model& m = model();
  const auto x = bnrelu::bench::random_tensor<4>({batch, 1, 28, 28});
  std::as_const(m).infer(x);  // untimed: first touches of the workspaces and outputs
  m.forward(x);
  for (auto _ : state) {
    if (const_path) {
      const auto y = std::as_const(m).infer(x);
      benchmark::DoNotOptimize(y.data());
    } else {
      const auto y = m.forward(x);
      benchmark::DoNotOptimize(y.data());
    }
  }
  state.SetItemsProcessed(state.iterations() * batch);
  state.counters["threads"] = threads;
}

void infer(benchmark::State& state) { run(state, true); }
void eval_forward(benchmark::State& state) { run(state, false); }

// Several calling threads share the model; each call runs on one bnrelu thread.
void infer_shared(benchmark::State& state) {
  const Index batch = state.range(0);
  if (state.thread_index() == 0) {
    bnrelu::set_num_threads(1);
    model();
  }
  const auto x = bnrelu::bench::random_tensor<4>({batch, 1, 28, 28});
  const Model& m = model();
  for (auto _ : state) {
    const auto y = m.infer(x);
    benchmark::DoNotOptimize(y.data());
  }
  state.SetItemsProcessed(state.iterations() * batch);
}

void sizes(benchmark::internal::Benchmark* b) {
  for (Index batch : {64, 1})
    for (int threads : {1, 2}) b->Args({threads, batch});
}

BENCHMARK(infer)->Apply(sizes)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(eval_forward)->Apply(sizes)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(infer_shared)->Arg(1)->Arg(16)->Threads(1)->Threads(2)->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "--export-onnx") == 0) {
#ifdef BNRELU_HAVE_ONNX
    bnrelu::io::save_onnx(model(), argv[2], bnrelu::Dims<4>{1, 1, 28, 28});
    return 0;
#else
    std::cerr << "bench_inference: built without bnrelu::onnx (BNRELU_WITH_ONNX, libonnx-dev)\n";
    return 1;
#endif
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
