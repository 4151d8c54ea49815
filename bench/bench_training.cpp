// The seed CNN's whole training step (forward, loss, backward, SGD with momentum) and its eval
// forward (as is, and after fuse_for_inference), at batch 1 to 256 on 1 and 2 threads, reported as images/s; a per-layer time
// breakdown of the training step; Conv2d's GFLOP/s next to a plain GEMM's measured in the
// same binary; Winograd against im2col by shape (what Conv2d's automatic choice rests on); and
// Winograd's input transform alone.
//
// bench/torch_training.py runs the same model and steps in PyTorch; bench/training_table.py
// prints both side by side.
#include <bnrelu/kernels/winograd.hpp>
#include <bnrelu/models/seed_cnn.hpp>
#include <bnrelu/nn/loss.hpp>
#include <bnrelu/optim/sgd.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "common.hpp"

namespace {

using bnrelu::Index;
using bnrelu::Tensor;
using Clock = std::chrono::steady_clock;

struct Batch {
  Tensor<float, 4> x;
  std::vector<std::int64_t> labels;
};

Batch random_batch(Index n) {
  bnrelu::manual_seed(1);
  Batch b{bnrelu::bench::random_tensor<4>({n, 1, 28, 28}), std::vector<std::int64_t>(static_cast<std::size_t>(n))};
  for (Index i = 0; i < n; ++i) b.labels[static_cast<std::size_t>(i)] = i % 10;
  return b;
}

// The seed CNN with seed 0, on the threads of the benchmark's second argument (batch, threads).
bnrelu::models::SeedCNN<float> seeded_model(const benchmark::State& state) {
  bnrelu::set_num_threads(static_cast<int>(state.range(1)));
  bnrelu::manual_seed(0);
  return bnrelu::models::seed_cnn<float>(1, 10);
}

void report_images(benchmark::State& state) {
  state.counters["images/s"] =
      benchmark::Counter(static_cast<double>(state.range(0)), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["threads"] = static_cast<double>(state.range(1));
}

void training_step(benchmark::State& state) {
  auto model = seeded_model(state);
  bnrelu::nn::CrossEntropyLoss<float> loss;
  bnrelu::optim::SGD<float> opt(model.named_parameters(), {.lr = 0.01, .momentum = 0.9});
  const Batch b = random_batch(state.range(0));
  auto step = [&] {
    opt.zero_grad();
    auto logits = model.forward(b.x);
    benchmark::DoNotOptimize(loss.forward(logits, b.labels));
    model.backward_params(loss.backward());
    opt.step();
  };
  step();  // untimed: the first step allocates and first touches every buffer
  for (auto _ : state) step();
  report_images(state);
}

template <bool Folded>
void eval_forward(benchmark::State& state) {
  auto model = seeded_model(state);
  model.eval();
  if (Folded) model.fuse_for_inference();
  const Batch b = random_batch(state.range(0));
  model.forward(b.x);  // untimed: the first forward allocates and first touches every buffer
  for (auto _ : state) benchmark::DoNotOptimize(model.forward(b.x).data());
  report_images(state);
}

// The training step layer by layer, each forward and backward timed on its own; counters are
// milliseconds per step. Runs the same calls as Sequential's forward and backward_params
// (BatchNorm+ReLU fused).
void step_breakdown(benchmark::State& state) {
  auto m = seeded_model(state);
  bnrelu::nn::CrossEntropyLoss<float> loss;
  bnrelu::optim::SGD<float> opt(m.named_parameters(), {.lr = 0.01, .momentum = 0.9});
  const Batch b = random_batch(state.range(0));

  enum Part { conv1_f, bnrelu1_f, pool1_f, conv2_f, bnrelu2_f, pool2_f, fc1_f, bnrelu3_f, fc2_f, loss_fb,
              fc2_b, bnrelu3_b, fc1_b, pool2_b, bnrelu2_b, conv2_b, pool1_b, bnrelu1_b, conv1_b, sgd, parts };
  static constexpr std::array<const char*, parts> names = {
      "conv1_fwd", "bnrelu1_fwd", "pool1_fwd", "conv2_fwd", "bnrelu2_fwd", "pool2_fwd", "fc1_fwd", "bnrelu3_fwd",
      "fc2_fwd",   "loss",        "fc2_bwd",   "bnrelu3_bwd", "fc1_bwd", "pool2_bwd", "bnrelu2_bwd", "conv2_bwd",
      "pool1_bwd", "bnrelu1_bwd", "conv1_bwd", "sgd"};
  std::array<double, parts> seconds{};
  auto t = Clock::now();
  auto lap = [&](Part p) {
    const auto now = Clock::now();
    seconds[p] += std::chrono::duration<double>(now - t).count();
    t = now;
  };
  for (auto _ : state) {
    opt.zero_grad();
    t = Clock::now();
    auto a1 = m.get<0>().forward(b.x);                 lap(conv1_f);
    auto r1 = m.get<1>().forward_fused_relu(std::move(a1)); lap(bnrelu1_f);
    auto p1 = m.get<3>().forward(std::move(r1));        lap(pool1_f);
    auto a2 = m.get<4>().forward(std::move(p1));        lap(conv2_f);
    auto r2 = m.get<5>().forward_fused_relu(std::move(a2)); lap(bnrelu2_f);
    auto p2 = m.get<7>().forward(std::move(r2));        lap(pool2_f);
    auto f = m.get<8>().forward(std::move(p2));
    auto h1 = m.get<9>().forward(std::move(f));         lap(fc1_f);
    auto r3 = m.get<10>().forward_fused_relu(std::move(h1)); lap(bnrelu3_f);
    auto logits = m.get<12>().forward(std::move(r3));   lap(fc2_f);
    benchmark::DoNotOptimize(loss.forward(logits, b.labels));
    auto dlogits = loss.backward();                     lap(loss_fb);
    auto d3 = m.get<12>().backward(std::move(dlogits)); lap(fc2_b);
    auto dh1 = m.get<10>().backward_fused_relu(std::move(d3)); lap(bnrelu3_b);
    auto df = m.get<9>().backward(std::move(dh1));      lap(fc1_b);
    auto dp2 = m.get<7>().backward(m.get<8>().backward(std::move(df))); lap(pool2_b);
    auto da2 = m.get<5>().backward_fused_relu(std::move(dp2)); lap(bnrelu2_b);
    auto dp1 = m.get<4>().backward(std::move(da2));     lap(conv2_b);
    auto dr1 = m.get<3>().backward(std::move(dp1));     lap(pool1_b);
    auto da1 = m.get<1>().backward_fused_relu(std::move(dr1)); lap(bnrelu1_b);
    m.get<0>().backward_params(std::move(da1));         lap(conv1_b);
    opt.step();                                         lap(sgd);
  }
  const double n = static_cast<double>(state.iterations());
  for (int p = 0; p < parts; ++p) state.counters[names[static_cast<std::size_t>(p)]] = 1e3 * seconds[static_cast<std::size_t>(p)] / n;
  state.counters["threads"] = static_cast<double>(state.range(1));
}

// conv2 of the seed CNN (64 -> 128, 3x3, pad 1, 14x14) forward, and Eigen's GEMM at the same
// total size, both as GFLOP/s. A convolution's GFLOP/s count the multiply-adds of direct
// convolution (2 * O * C * 9 per output), whatever the algorithm: Winograd does 2.25x fewer,
// so it can pass the GEMM's rate.
constexpr Index kConvN = 64, kConvC = 64, kConvO = 128, kConvHW = 14;
constexpr double kConvFlop = 2.0 * kConvN * kConvO * (kConvC * 9) * (kConvHW * kConvHW);

void conv2_forward(benchmark::State& state) {
  bnrelu::set_num_threads(static_cast<int>(state.range(0)));
  bnrelu::manual_seed(0);
  bnrelu::nn::Conv2d<float> conv({.in_channels = kConvC, .out_channels = kConvO, .kernel_size = 3, .padding = 1});
  conv.eval();
  const auto x = bnrelu::bench::random_tensor<4>({kConvN, kConvC, kConvHW, kConvHW});
  for (auto _ : state) benchmark::DoNotOptimize(conv.forward(x).data());
  state.counters["GFLOP/s"] = benchmark::Counter(kConvFlop * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["threads"] = static_cast<double>(state.range(0));
}

void conv2_backward(benchmark::State& state) {
  bnrelu::set_num_threads(static_cast<int>(state.range(0)));
  bnrelu::manual_seed(0);
  bnrelu::nn::Conv2d<float> conv({.in_channels = kConvC, .out_channels = kConvO, .kernel_size = 3, .padding = 1});
  const auto x = bnrelu::bench::random_tensor<4>({kConvN, kConvC, kConvHW, kConvHW});
  const auto dy = bnrelu::bench::random_tensor<4>({kConvN, kConvO, kConvHW, kConvHW});
  conv.forward(x);
  for (auto _ : state) benchmark::DoNotOptimize(conv.backward(dy).data());
  // input gradient and weight gradient: two GEMMs of the forward's size
  state.counters["GFLOP/s"] = benchmark::Counter(2 * kConvFlop * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["threads"] = static_cast<double>(state.range(0));
}

// Winograd against im2col + GEMM on one thread, forward and backward (input and weight
// gradients), at 3x3, pad 1, batch 64 and the shapes of the automatic choice's threshold.
// Arguments: C, O, H (= W), winograd (0/1), backward (0/1).
void conv_algorithm(benchmark::State& state) {
  bnrelu::set_num_threads(1);
  const Index C = state.range(0), O = state.range(1), HW = state.range(2), N = 64;
  bnrelu::manual_seed(0);
  bnrelu::nn::Conv2d<float> conv({.in_channels = C, .out_channels = O, .kernel_size = 3, .padding = 1});
  conv.set_algorithm(state.range(3) ? bnrelu::nn::ConvAlgorithm::winograd : bnrelu::nn::ConvAlgorithm::im2col);
  const auto x = bnrelu::bench::random_tensor<4>({N, C, HW, HW});
  const auto dy = bnrelu::bench::random_tensor<4>({N, O, HW, HW});
  const bool backward = state.range(4) != 0;
  if (backward) conv.forward(x);
  for (auto _ : state)
    benchmark::DoNotOptimize(backward ? conv.backward(dy).data() : conv.forward(x).data());
  const double flop = 2.0 * N * O * C * 9 * HW * HW * (backward ? 2 : 1);
  state.counters["GFLOP/s"] = benchmark::Counter(flop * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// Winograd's input transform alone (kernels/winograd.hpp), 3x3, pad 1, over a batch of 128
// images of C x HW x HW, one thread: the transform of the forward (of x) and of the input
// gradient (of dy). Arguments: C, HW. Bytes: the images read.
void winograd_input_transform(benchmark::State& state) {
  const Index C = state.range(0), HW = state.range(1), N = 128;
  const bnrelu::kernels::WinogradGeometry g(N, C, HW, HW, C, 1);
  const bnrelu::kernels::WinogradScratch s(g, bnrelu::kernels::simd::width<float>);
  const auto x = bnrelu::bench::random_tensor<4>({N, C, HW, HW});
  bnrelu::bench::AlignedVector<float> v(static_cast<std::size_t>(16 * s.v_stride)),
      scratch(static_cast<std::size_t>(s.planes(g)));
  for (auto _ : state) {
    for (Index n = 0; n < N; ++n)
      bnrelu::kernels::winograd_input_transform(v.data(), s.v_stride, x.data() + n * C * HW * HW, g, scratch.data());
    benchmark::DoNotOptimize(v.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * x.size() * static_cast<Index>(sizeof(float)));
}

// The machine's GEMM rate for this library: [O x K] * [K x N*P] row-major, Eigen.
void gemm(benchmark::State& state) {
  bnrelu::set_num_threads(static_cast<int>(state.range(0)));
  using M = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Index K = kConvC * 9, P = kConvN * kConvHW * kConvHW;
  M a = M::Random(kConvO, K), b = M::Random(K, P), c(kConvO, P);
  // Eigen's products run on one thread (EIGEN_DONT_PARALLELIZE): one column block per thread
  const int threads = static_cast<int>(state.range(0));
  const Index width = (P + threads - 1) / threads;
  for (auto _ : state) {
#pragma omp parallel for num_threads(threads)
    for (int t = 0; t < threads; ++t) {
      const Index begin = t * width, cols = std::min(width, P - begin);
      c.middleCols(begin, cols).noalias() = a * b.middleCols(begin, cols);
    }
    benchmark::DoNotOptimize(c.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(kConvFlop * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["threads"] = static_cast<double>(state.range(0));
}

}  // namespace

int main(int argc, char** argv) {
  using benchmark::RegisterBenchmark;
  using Fn = void (*)(benchmark::State&);
  // small batches too: more threads than images must never be slower than one thread (training
  // from 2 images: BatchNorm1d needs more than one value per feature)
  for (auto [name, fn, smallest] : {std::tuple<const char*, Fn, Index>{"training_step", training_step, 2},
                                    {"eval_forward", eval_forward<false>, 1},
                                    {"eval_forward_folded", eval_forward<true>, 1}}) {
    std::vector<std::int64_t> batches;
    for (Index n : {1, 2, 4, 8, 64, 256})
      if (n >= smallest) batches.push_back(n);
    RegisterBenchmark(name, fn)
        ->ArgNames({"batch", "threads"})
        ->ArgsProduct({batches, {1, 2}})
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
  RegisterBenchmark("step_breakdown", step_breakdown)
      ->ArgNames({"batch", "threads"})
      ->ArgsProduct({{64, 256}, {1, 2}})
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  for (auto [name, fn] : {std::pair<const char*, Fn>{"gemm_128x576x12544", gemm}, {"conv2_forward_64x64x14x14", conv2_forward},
                          {"conv2_backward_64x64x14x14", conv2_backward}})
    RegisterBenchmark(name, fn)->ArgName("threads")->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);
  auto* transform = RegisterBenchmark("winograd_input_transform", winograd_input_transform)
                        ->ArgNames({"C", "HW"})
                        ->Unit(benchmark::kMillisecond);
  for (auto [C, HW] : {std::array<Index, 2>{16, 32}, {32, 16}, {64, 8}, {64, 14}}) transform->Args({C, HW});
  auto* algorithms = RegisterBenchmark("conv_algorithm", conv_algorithm)
                         ->ArgNames({"C", "O", "HW", "winograd", "backward"})
                         ->UseRealTime()
                         ->Unit(benchmark::kMillisecond);
  for (auto [C, O, HW] : {std::array<Index, 3>{64, 128, 14}, {32, 32, 28}, {16, 16, 28}, {8, 8, 28}, {4, 4, 28}, {4, 64, 28}, {1, 64, 28}})
    for (Index winograd : {0, 1})
      for (Index backward : {0, 1}) algorithms->Args({C, O, HW, winograd, backward});
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
