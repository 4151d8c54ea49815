// A residual block's end, relu(BatchNorm(x) + s), fused into one pass each way versus the
// unfused chain of this library's own kernels (BatchNorm, an in-place add, in-place ReLU with
// its one-byte mask; backward: the mask applied to dy in place, then BatchNorm's backward),
// each as Residual runs it with fusion on and off, next to the machine's STREAM triad; and
// the whole ResNet-20 training step and eval forward (see bench_training for the seed CNN).
// Fused, two rows: `fused` as a block with an identity shortcut runs it (the shortcut's
// gradient is not written: the block's final add reads dy and the mask), `fused_ds` as a
// block with a projection shortcut does (the shortcut's gradient written over dy, for the
// projection's backward to read). Unfused, the ReLU's backward writes that gradient either way.
//
// The memory_pass rows (bench/common.hpp) give what one pass over memory costs by the way it
// writes: in place, around the caches, or through them.
//
// bytes_per_second counts 8 tensors for every row alike: forward reads x and s and writes y (3
// tensors); backward reads x, s and dy and writes dx and the shortcut's gradient ds (5). The
// fused passes move less: the forward writes the ReLU's mask (1/32 of x), and the backward
// reads that instead of s and writes ds over dy (fused_ds) or not at all (fused).
#include <bnrelu/kernels/batchnorm.hpp>
#include <bnrelu/kernels/relu.hpp>
#include <bnrelu/models/resnet.hpp>
#include <bnrelu/nn/loss.hpp>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common.hpp"

namespace {

using bnrelu::Index;
using bnrelu::bench::AlignedVector;
using bnrelu::Tensor;
namespace k = bnrelu::kernels;

struct Shape {
  Index N, C, H, W;
  std::string name;
  Index S() const { return H * W; }
  Index n() const { return N * C * H * W; }
};

enum class Chain { fused, fused_ds, unfused };

struct Buffers {
  Shape sh;
  AlignedVector<float> x, s, y, dy, dx, weight, bias, dweight, dbias;
  AlignedVector<std::uint8_t> mask;   // the unfused ReLU's
  AlignedVector<std::uint64_t> bits;  // the fused pass's (kernels::Addend)
  std::vector<double> mean, var, invstd;
  explicit Buffers(const Shape& shape) : sh(shape) {
    auto fill = [](AlignedVector<float>& v, Index size, double lo, double hi) {
      v.resize(static_cast<std::size_t>(size));
      bnrelu::fill_uniform(v.data(), size, lo, hi);
    };
    fill(x, sh.n(), -2, 3);
    fill(s, sh.n(), -1, 1);
    fill(dy, sh.n(), -1, 1);
    y.assign(static_cast<std::size_t>(sh.n()), 0);
    dx = y;
    mask.assign(static_cast<std::size_t>(sh.n()), 0);
    bits.assign(static_cast<std::size_t>(sh.N * sh.C * k::mask_words(sh.S())), 0);
    fill(weight, sh.C, 0.5, 1.5);
    fill(bias, sh.C, -0.3, 0.3);
    dweight.assign(static_cast<std::size_t>(sh.C), 0);
    dbias = dweight;
    mean.assign(static_cast<std::size_t>(sh.C), 0);
    var = invstd = mean;
  }
  void forward(bool fused) {
    const k::Addend<float> add{s.data(), nullptr, bits.data()};
    k::batchnorm_forward_train(y.data(), static_cast<float*>(nullptr), stats(), x.data(), shape(), params(), 1e-5,
                               fused ? k::Epilogue<float>{true, add} : k::Epilogue<float>{});
    if (fused) return;
    k::add_into(y.data(), s.data(), sh.n());
    k::relu_forward(y.data(), mask.data(), y.data(), sh.n());
  }
  // As Residual runs them: fused, the mask from the forward's bits, the shortcut's gradient
  // not written (fused) or written over dy in place (fused_ds); unfused, ReLU's backward masks
  // dy in place, and that one tensor is the shortcut's gradient and the batch norm's dy. (Those
  // that overwrite dy, an input of the next step, write values of the same kind.)
  void backward(Chain chain) {
    if (chain != Chain::unfused) {
      float* ds = chain == Chain::fused_ds ? dy.data() : nullptr;
      k::batchnorm_backward(dx.data(), grads(), dy.data(), x.data(), shape(), norm(),
                            k::Epilogue<float>{true, {s.data(), ds, bits.data()}});
      return;
    }
    k::relu_backward(dy.data(), dy.data(), mask.data(), sh.n());
    k::batchnorm_backward(dx.data(), grads(), dy.data(), x.data(), shape(), norm(), k::Epilogue<float>{false});
  }
  k::BatchShape shape() const { return {sh.N, sh.C, sh.S()}; }
  k::BatchStats stats() { return {mean.data(), var.data(), invstd.data()}; }
  k::AffineParams<float> params() const { return {weight.data(), bias.data()}; }
  k::AffineGrads<float> grads() { return {dweight.data(), dbias.data()}; }
  k::Normalisation<float> norm() const { return {mean.data(), invstd.data(), params()}; }
};

void bn_add_relu(benchmark::State& state, const Shape& sh, Chain chain) {
  const bool fused = chain != Chain::unfused;
  const int threads = static_cast<int>(state.range(0));
  bnrelu::set_num_threads(threads);
  Buffers b(sh);
  b.forward(fused);
  for (auto _ : state) {
    b.forward(fused);
    b.backward(chain);
    benchmark::DoNotOptimize(b.dx.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * 8 * sh.n() * static_cast<Index>(sizeof(float)));
  state.counters["threads"] = threads;
}

enum class Run { train_step, eval, infer };

// One training step of ResNet-20 (forward, cross-entropy, backward; no optimizer, as in
// bench/torch_resnet.py), one eval forward, or one infer after fuse_for_inference (every
// batch norm folded into its convolution, each block's add and ReLU in the last
// convolution's epilogue), N x 3 x 32 x 32, after two untimed ones.
void resnet20(benchmark::State& state, Run run) {
  const int threads = static_cast<int>(state.range(0));
  const Index N = state.range(1);
  const bool train = run == Run::train_step;
  bnrelu::set_num_threads(threads);
  bnrelu::manual_seed(1);
  auto model = bnrelu::models::resnet20<float>(3, 10);
  const auto x = bnrelu::bench::random_tensor<4>({N, 3, 32, 32});
  std::vector<std::int64_t> labels(static_cast<std::size_t>(N));
  for (Index i = 0; i < N; ++i) labels[static_cast<std::size_t>(i)] = i % 10;
  bnrelu::nn::CrossEntropyLoss<float> ce;
  if (run == Run::infer) {
    model.forward(x);  // a training forward: running statistics that are not the initial ones
    model.fuse_for_inference();
  }
  model.train(train);
  auto step = [&] {
    auto logits = run == Run::infer ? model.infer(x) : model.forward(x);
    if (train) {
      ce.forward(logits, labels);
      model.zero_grad();
      model.backward_params(ce.backward());
    }
    benchmark::DoNotOptimize(logits.data());
  };
  for (int i = 0; i < 2; ++i) step();  // steady state: every buffer allocated and touched
  for (auto _ : state) step();
  state.counters["threads"] = threads;
  state.counters["images_per_second"] =
      benchmark::Counter(static_cast<double>(N), benchmark::Counter::kIsIterationInvariantRate);
}

int register_all() {
  benchmark::RegisterBenchmark("stream_triad", bnrelu::bench::stream_triad)
      ->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);
  for (auto [pass, name] : {std::pair{bnrelu::bench::MemoryPass::read, "memory_pass/read"},
                            std::pair{bnrelu::bench::MemoryPass::write_in_place, "memory_pass/read+write_in_place"},
                            std::pair{bnrelu::bench::MemoryPass::write, "memory_pass/read+write"},
                            std::pair{bnrelu::bench::MemoryPass::stream_write, "memory_pass/read+stream_write"}})
    benchmark::RegisterBenchmark(name, [pass](benchmark::State& s) { bnrelu::bench::memory_pass(s, pass); })
        ->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);
  const std::vector<Shape> shapes{{128, 16, 32, 32, "128x16x32x32"},
                                  {128, 32, 16, 16, "128x32x16x16"},
                                  {128, 64, 8, 8, "128x64x8x8"},
                                  {256, 64, 56, 56, "256x64x56x56"}};
  for (const auto& sh : shapes)
    for (auto [chain, label] : {std::pair{Chain::fused, "fused"}, std::pair{Chain::fused_ds, "fused_ds"},
                                std::pair{Chain::unfused, "unfused"}}) {
      const std::string name = std::string(label) + "/bn_add_relu_fwd+bwd/" + sh.name;
      benchmark::RegisterBenchmark(name.c_str(), [sh, chain](benchmark::State& s) { bn_add_relu(s, sh, chain); })
          ->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);
    }
  for (auto [run, name] : {std::pair{Run::train_step, "resnet20/train_step"}, std::pair{Run::eval, "resnet20/eval"},
                           std::pair{Run::infer, "resnet20/infer"}})
    benchmark::RegisterBenchmark(name, [run](benchmark::State& s) { resnet20(s, run); })
        ->Args({1, 128})->Args({2, 128})->UseRealTime()->Unit(benchmark::kMillisecond);
  return 0;
}
const int registered = register_all();

}  // namespace

BENCHMARK_MAIN();
