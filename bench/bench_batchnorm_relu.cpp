// Fused BatchNorm+ReLU versus the unfused pair (this library's own BatchNorm then its own ReLU,
// each vectorised and parallel), next to the machine's STREAM triad and, where oneDNN is
// installed, oneDNN's fused batch normalisation in its blocked nChw8c layout.
//
// bytes_per_second counts the bytes the ideal algorithm must move, for every row alike:
//   forward (training) and eval: read x, write y            = 2 tensors
//   backward:                     read x and dy, write dx     = 3 tensors
//   forward+backward:                                         = 5 tensors
// so rows compare directly with each other and with the triad. "kept_bytes" is the memory a
// layer holds between forward and backward.
#include <bnrelu/kernels/batchnorm.hpp>
#include <bnrelu/kernels/relu.hpp>
#include <bnrelu/nn/batchnorm_relu.hpp>
#include <bnrelu/nn/relu.hpp>
#include <bnrelu/nn/sequential.hpp>

#include <cmath>
#include <cstdint>
#include <optional>
#include <unordered_map>
#include <string>
#include <vector>

#include "common.hpp"

#ifdef BNRELU_HAVE_DNNL
#include <omp.h>
#include <oneapi/dnnl/dnnl.hpp>
#endif

namespace {

using bnrelu::Dims;
using bnrelu::Index;
using bnrelu::bench::AlignedVector;
using bnrelu::Tensor;
namespace k = bnrelu::kernels;

enum class Pass { forward, backward, forward_backward, eval };

const char* pass_name(Pass p) {
  switch (p) {
    case Pass::forward: return "forward";
    case Pass::backward: return "backward";
    case Pass::forward_backward: return "fwd+bwd";
    case Pass::eval: return "eval";
  }
  return "";
}

Index ideal_tensors(Pass p) {
  return p == Pass::backward ? 3 : p == Pass::forward_backward ? 5 : 2;
}

struct Shape {
  Index N, C, S;  // S = H*W, 1 for N x C
  std::string name;
  Index H() const { return std::lround(std::sqrt(static_cast<double>(S))); }  // the shapes below are square
};

// Everything one BN-ReLU layer touches, allocated once outside the timed loop.
struct Buffers {
  Shape sh;
  AlignedVector<float> x, y, dy, dx, weight, bias, dweight, dbias, t;
  bnrelu::kernels::ChannelAffines<float> eval_maps;  // the eval pass's per-channel maps
  AlignedVector<std::uint8_t> mask;
  std::vector<double> mean, var, invstd;
  explicit Buffers(const Shape& s) : sh(s) {
    const Index n = s.N * s.C * s.S;
    auto fill = [](auto& v, Index size, double lo, double hi) {
      v.resize(size);
      for (auto& e : v) e = static_cast<float>(bnrelu::uniform(lo, hi));
    };
    fill(x, n, -2, 3);
    fill(dy, n, -1, 1);
    y.assign(n, 0);
    dx.assign(n, 0);
    t.assign(n, 0);
    mask.assign(n, 0);
    fill(weight, s.C, 0.5, 1.5);
    fill(bias, s.C, -0.3, 0.3);
    eval_maps.resize(s.C);
    fill(eval_maps.centre, s.C, -0.3, 0.3);
    fill(eval_maps.scale, s.C, 0.5, 1.5);
    fill(eval_maps.shift, s.C, -0.3, 0.3);
    dweight.assign(s.C, 0);
    dbias.assign(s.C, 0);
    mean.assign(s.C, 0);
    var.assign(s.C, 0);
    invstd.assign(s.C, 0);
  }
  // Fused: one kernel each way; the layer keeps x (its own copy or the moved input).
  void fused_forward() {
    k::batchnorm_forward_train(y.data(), static_cast<float*>(nullptr), stats(), x.data(), shape(), params(), 1e-5,
                               k::Epilogue<float>{true});
  }
  void fused_backward() {
    k::batchnorm_backward(dx.data(), grads(), dy.data(), x.data(), shape(), norm(), k::Epilogue<float>{true});
  }
  // Unfused: BatchNorm writes t, ReLU reads t and writes y and its mask; backward in reverse.
  void unfused_forward() {
    k::batchnorm_forward_train(t.data(), static_cast<float*>(nullptr), stats(), x.data(), shape(), params(), 1e-5);
    k::relu_forward(y.data(), mask.data(), t.data(), static_cast<Index>(t.size()));
  }
  void unfused_backward() {
    k::relu_backward(t.data(), dy.data(), mask.data(), static_cast<Index>(t.size()));
    k::batchnorm_backward(dx.data(), grads(), t.data(), x.data(), shape(), norm(), k::Epilogue<float>{false});
  }
  void fused_eval() {
    k::batchnorm_forward_eval(y.data(), x.data(), shape(), eval_maps, k::Epilogue<float>{true});
  }
  void unfused_eval() {
    k::batchnorm_forward_eval(t.data(), x.data(), shape(), eval_maps);
    k::relu_forward(y.data(), static_cast<std::uint8_t*>(nullptr), t.data(), static_cast<Index>(t.size()));
  }
  k::BatchShape shape() const { return {sh.N, sh.C, sh.S}; }
  k::BatchStats stats() { return {mean.data(), var.data(), invstd.data()}; }
  k::AffineParams<float> params() const { return {weight.data(), bias.data()}; }
  k::AffineGrads<float> grads() { return {dweight.data(), dbias.data()}; }
  k::Normalisation<float> norm() const { return {mean.data(), invstd.data(), params()}; }
};

void run(benchmark::State& state, const Shape& sh, Pass pass, bool fused) {
  const int threads = static_cast<int>(state.range(0));
  bnrelu::set_num_threads(threads);
  Buffers b(sh);
  b.fused_forward();  // statistics for backward-only rows, and warm pages
  for (auto _ : state) {
    switch (pass) {
      case Pass::forward: fused ? b.fused_forward() : b.unfused_forward(); break;
      case Pass::backward: fused ? b.fused_backward() : b.unfused_backward(); break;
      case Pass::forward_backward:
        if (fused) {
          b.fused_forward();
          b.fused_backward();
        } else {
          b.unfused_forward();
          b.unfused_backward();
        }
        break;
      case Pass::eval: fused ? b.fused_eval() : b.unfused_eval(); break;
    }
    benchmark::DoNotOptimize(b.y.data());
    benchmark::DoNotOptimize(b.dx.data());
    benchmark::ClobberMemory();
  }
  const Index n = sh.N * sh.C * sh.S;
  state.SetBytesProcessed(state.iterations() * ideal_tensors(pass) * n * static_cast<Index>(sizeof(float)));
  state.counters["threads"] = threads;
  // kept for backward: fused = x; unfused = x for BatchNorm + a byte per element for ReLU
  state.counters["kept_bytes"] = static_cast<double>(n * sizeof(float) + (fused ? 0 : n));
}

#ifdef BNRELU_HAVE_DNNL
// oneDNN 2.6 batch normalisation with fuse_norm_relu in nChw8c (its fastest layout), f32.
void run_onednn(benchmark::State& state, const Shape& sh, Pass pass) {
  using namespace dnnl;
  using tag = memory::format_tag;
  using dt = memory::data_type;
  const int threads = static_cast<int>(state.range(0));
  bnrelu::set_num_threads(threads);
  // oneDNN's primitives run on OpenMP's thread count of the calling thread, which bnrelu's does
  // not set
  omp_set_num_threads(threads);
  engine eng(engine::kind::cpu, 0);
  stream s(eng);
  const Index H = sh.H();
  const memory::dims dims{sh.N, sh.C, H, sh.S / H};
  const auto layout = sh.S == 1 ? tag::nchw : tag::nChw8c;
  memory::desc md(dims, dt::f32, layout);
  const auto flags = normalization_flags::use_scale | normalization_flags::use_shift |
                     (pass == Pass::eval ? normalization_flags::use_global_stats : normalization_flags::none) |
                     normalization_flags::fuse_norm_relu;
  batch_normalization_forward::primitive_desc fpd(
      batch_normalization_forward::desc(pass == Pass::eval ? prop_kind::forward_inference : prop_kind::forward_training,
                                        md, 1e-5f, flags),
      eng);
  memory src(md, eng), dst(md, eng), diff_dst(md, eng), diff_src(md, eng);
  memory mean(fpd.mean_desc(), eng), var(fpd.variance_desc(), eng), ws(fpd.workspace_desc(), eng);
  memory::desc cd({sh.C}, dt::f32, tag::x);
  memory scale(cd, eng), shift(cd, eng), dscale(cd, eng), dshift(cd, eng);
  auto fill = [](memory& m, double lo, double hi) {
    auto* p = static_cast<float*>(m.get_data_handle());
    for (std::size_t i = 0; i < m.get_desc().get_size() / sizeof(float); ++i) p[i] = static_cast<float>(bnrelu::uniform(lo, hi));
  };
  fill(src, -2, 3);
  fill(diff_dst, -1, 1);
  fill(scale, 0.5, 1.5);
  fill(shift, -0.3, 0.3);
  fill(mean, -0.1, 0.1);
  fill(var, 0.5, 1.5);
  batch_normalization_forward fwd(fpd);
  std::unordered_map<int, memory> fargs{{DNNL_ARG_SRC, src},     {DNNL_ARG_DST, dst},     {DNNL_ARG_MEAN, mean},
                                        {DNNL_ARG_VARIANCE, var}, {DNNL_ARG_SCALE, scale}, {DNNL_ARG_SHIFT, shift},
                                        {DNNL_ARG_WORKSPACE, ws}};
  std::optional<batch_normalization_backward> bwd;
  std::unordered_map<int, memory> bargs;
  if (pass != Pass::eval) {
    batch_normalization_backward::primitive_desc bpd(
        batch_normalization_backward::desc(prop_kind::backward, md, md, 1e-5f, flags), eng, fpd);
    bwd.emplace(bpd);
    bargs = {{DNNL_ARG_SRC, src},           {DNNL_ARG_MEAN, mean},         {DNNL_ARG_VARIANCE, var},
             {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_SCALE, scale},       {DNNL_ARG_SHIFT, shift},  {DNNL_ARG_WORKSPACE, ws},
             {DNNL_ARG_DIFF_SRC, diff_src}, {DNNL_ARG_DIFF_SCALE, dscale}, {DNNL_ARG_DIFF_SHIFT, dshift}};
  }
  fwd.execute(s, fargs);
  s.wait();
  for (auto _ : state) {
    if (pass != Pass::backward) fwd.execute(s, fargs);
    if (pass == Pass::backward || pass == Pass::forward_backward) bwd->execute(s, bargs);
    s.wait();
  }
  const Index n = sh.N * sh.C * sh.S;
  state.SetBytesProcessed(state.iterations() * ideal_tensors(pass) * n * static_cast<Index>(sizeof(float)));
  state.counters["threads"] = threads;
}
#endif

// Reading one buffer of state.range(0) MiB again and again: the rate the caches deliver it at
// while it fits in what they keep, memory's rate beyond (what kernels/tuning.hpp's streaming
// threshold rests on).
void cache_reread(benchmark::State& state) {
  const Index n = (state.range(0) << 20) / static_cast<Index>(sizeof(float));
  AlignedVector<float> a(static_cast<std::size_t>(n), 1.0f);
  for (auto _ : state) {
    float sum = 0;
#pragma omp simd reduction(+ : sum)
    for (Index i = 0; i < n; ++i) sum += a[static_cast<std::size_t>(i)];
    benchmark::DoNotOptimize(sum);
  }
  state.SetBytesProcessed(state.iterations() * n * static_cast<Index>(sizeof(float)));
}

// The real layer, for the memory it keeps between forward and backward.
void layer_memory(benchmark::State& state) {
  bnrelu::nn::BatchNormReLU2d<float> layer({.num_features = 64});
  const auto x = bnrelu::bench::random_tensor<4>({64, 64, 28, 28});
  for (auto _ : state) benchmark::DoNotOptimize(layer.forward(x));
  state.counters["kept_bytes"] = static_cast<double>(layer.cache_bytes());
  state.counters["input_bytes"] = static_cast<double>(x.size() * sizeof(float));
}

// The public API as a training loop calls it, results dropped each step, after two untimed
// steps; a Sequential(BatchNorm2d, ReLU) with fusion on (one kernel each way) or off
// (BatchNorm, then ReLU with its mask).
//   lvalue: y = model.forward(x) on the caller's x, which stays the caller's: forward keeps
//           its own copy for backward (README's quick start, which reuses one batch);
//   moved:  y = model.forward(std::move(x)) on a fresh x each step (written outside the timed
//           region, as the layer before or the data loader writes it): forward keeps x itself
//           (train_mnist's loop, and every layer after the first inside a Sequential).
// Then dx = model.backward(dy). Fused and unfused rows pay the same copy or move, so their
// ratio is what fusion saves through the API.
void layer_api(benchmark::State& state, const Shape& sh, bool fused, bool moved) {
  const int threads = static_cast<int>(state.range(0));
  bnrelu::set_num_threads(threads);
  const Index H = sh.H();
  auto model = bnrelu::nn::Sequential(bnrelu::nn::BatchNorm2d<float>({.num_features = sh.C}),
                                      bnrelu::nn::ReLU<float>());
  model.set_fusion(fused);
  const auto x0 = bnrelu::bench::random_tensor<4>({sh.N, sh.C, H, sh.S / H});
  const auto dy = bnrelu::bench::random_tensor<4>({sh.N, sh.C, H, sh.S / H});
  Tensor<float, 4> x;
  auto step = [&] {
    auto y = moved ? model.forward(std::move(x)) : model.forward(x0);
    auto dx = model.backward(dy);
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  };
  for (int i = 0; i < 2; ++i) {
    if (moved) x = x0;
    step();
  }
  for (auto _ : state) {
    if (moved) {
      state.PauseTiming();
      x = x0;
      state.ResumeTiming();
    }
    step();
  }
  state.SetBytesProcessed(state.iterations() * ideal_tensors(Pass::forward_backward) * sh.N * sh.C * sh.S *
                          static_cast<Index>(sizeof(float)));
  state.counters["threads"] = threads;
}

const std::vector<Shape> kShapes{{64, 64, 784, "64x64x28x28"},
                                 {64, 128, 196, "64x128x14x14"},
                                 {256, 64, 784, "256x64x28x28"},
                                 {64, 512, 1, "64x512"},
                                 {1024, 512, 1, "1024x512"}};

int register_all() {
  benchmark::RegisterBenchmark("stream_triad", bnrelu::bench::stream_triad)
      ->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);
  for (const auto& sh : kShapes)
    for (Pass pass : {Pass::forward_backward, Pass::forward, Pass::backward, Pass::eval}) {
      for (bool fused : {true, false}) {
        const std::string name = std::string(fused ? "fused/" : "unfused/") + pass_name(pass) + "/" + sh.name;
        benchmark::RegisterBenchmark(name.c_str(), [sh, pass, fused](benchmark::State& s) { run(s, sh, pass, fused); })
            ->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);
      }
#ifdef BNRELU_HAVE_DNNL
      const std::string name = std::string("onednn_nChw8c/") + pass_name(pass) + "/" + sh.name;
      benchmark::RegisterBenchmark(name.c_str(), [sh, pass](benchmark::State& s) { run_onednn(s, sh, pass); })
          ->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);
#endif
    }
  for (const auto& sh : kShapes)
    if (sh.S > 1)
      for (bool moved : {false, true})
        for (bool fused : {true, false}) {
          const std::string name = std::string(fused ? "api_fused" : "api_unfused") + (moved ? "/moved" : "/lvalue") +
                                   "/fwd+bwd/" + sh.name;
          benchmark::RegisterBenchmark(name.c_str(),
                                       [sh, fused, moved](benchmark::State& s) { layer_api(s, sh, fused, moved); })
              ->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);
        }
  benchmark::RegisterBenchmark("cache_reread", cache_reread)
      ->Arg(1)->Arg(4)->Arg(8)->Arg(12)->Arg(16)->Arg(24)->Arg(32)->Arg(64)->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("layer_memory/BatchNormReLU2d/64x64x28x28", layer_memory)->Iterations(1);
  return 0;
}
const int registered = register_all();

}  // namespace

BENCHMARK_MAIN();
