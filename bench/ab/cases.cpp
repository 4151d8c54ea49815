// The cases bench/ab.py times, compiled once per version of the library into a shared library
// of its own (-DAB_PREFIX=base or work, hidden visibility), so that one process can hold two
// versions of the same header-only templates and run their cases interleaved. C entry points:
//   <prefix>_cases()           the number of cases
//   <prefix>_name(i)           case i's name
//   <prefix>_make(i, threads)  its model and inputs, after two untimed runs
//   <prefix>_run(c, threads)   one timed run
//   <prefix>_free(c)
// Every case must compile against both versions: the public API only (bn_add_relu, a Residual
// whose main branch is one layer, compiles against cbe6303 and later).
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <bnrelu/bnrelu.hpp>

#include "../common.hpp"

namespace {

using bnrelu::Index;

struct Case {
  std::function<void()> run;
  std::shared_ptr<void> state;  // whatever run refers to
};

template <class S, class F>
Case make_case(std::shared_ptr<S> s, F f) {
  return {[s, f] { f(*s); }, s};
}

// A 3x3, pad-1 convolution of 128 images of C x HW x HW into C channels: forward or backward.
Case conv(Index C, Index HW, bool backward) {
  struct S {
    bnrelu::nn::Conv2d<float> conv;
    bnrelu::Tensor<float, 4> x, dy;
  };
  auto s = std::make_shared<S>(S{bnrelu::nn::Conv2d<float>({.in_channels = C, .out_channels = C, .kernel_size = 3, .padding = 1}),
                                 bnrelu::bench::random_tensor<4>({128, C, HW, HW}),
                                 bnrelu::bench::random_tensor<4>({128, C, HW, HW})});
  if (backward) s->conv.forward(s->x);  // the input backward's weight gradient reads
  return make_case(s, [backward](S& s) {
    benchmark::DoNotOptimize((backward ? s.conv.backward(s.dy) : s.conv.forward(s.x)).data());
  });
}

// One training step (forward, cross-entropy, backward, SGD with momentum) of a model on a
// random batch.
template <class Model>
Case train_step(Model model, Index N, Index C, Index HW) {
  struct S {
    Model model;
    bnrelu::nn::CrossEntropyLoss<float> loss;
    bnrelu::optim::SGD<float> opt;
    bnrelu::Tensor<float, 4> x;
    std::vector<std::int64_t> labels;
    S(Model m, Index N, Index C, Index HW)
        : model(std::move(m)), opt(model.named_parameters(), {.lr = 0.01, .momentum = 0.9}),
          x(bnrelu::bench::random_tensor<4>({N, C, HW, HW})) {
      for (Index i = 0; i < N; ++i) labels.push_back(i % 10);
    }
  };
  return make_case(std::make_shared<S>(std::move(model), N, C, HW), [](S& s) {
    s.opt.zero_grad();
    auto logits = s.model.forward(s.x);
    benchmark::DoNotOptimize(s.loss.forward(logits, s.labels));
    s.model.backward_params(s.loss.backward());
    s.opt.step();
  });
}

// A layer's forward and backward through the public API on a random N x C x HW x HW input,
// whose output has the input's shape.
template <class L>
Case forward_backward(L layer, Index N, Index C, Index HW) {
  struct S {
    L layer;
    bnrelu::Tensor<float, 4> x, dy;
  };
  auto s = std::make_shared<S>(S{std::move(layer), bnrelu::bench::random_tensor<4>({N, C, HW, HW}),
                                 bnrelu::bench::random_tensor<4>({N, C, HW, HW})});
  return make_case(s, [](S& s) {
    s.layer.forward(s.x);
    benchmark::DoNotOptimize(s.layer.backward(s.dy).data());
  });
}

// BatchNorm2d+ReLU fused.
Case bn_relu(Index N, Index C, Index HW) {
  return forward_backward(bnrelu::nn::BatchNormReLU2d<float>({.num_features = C}), N, C, HW);
}

// A residual block's end, relu(BatchNorm2d(x) + x) (Residual of one BatchNorm2d, identity
// shortcut: the fused BatchNorm+Add+ReLU).
Case bn_add_relu(Index N, Index C, Index HW) {
  using Block = bnrelu::nn::Residual<bnrelu::nn::Sequential<bnrelu::nn::BatchNorm2d<float>>>;
  return forward_backward(Block(bnrelu::nn::Sequential{bnrelu::nn::BatchNorm2d<float>({.num_features = C})}), N, C,
                          HW);
}

struct Entry {
  const char* name;
  std::function<Case()> make;
};

const std::vector<Entry>& entries() {
  static const std::vector<Entry> all = {
      {"conv_fwd/16x32x32", [] { return conv(16, 32, false); }},
      {"conv_bwd/16x32x32", [] { return conv(16, 32, true); }},
      {"conv_fwd/32x16x16", [] { return conv(32, 16, false); }},
      {"conv_bwd/32x16x16", [] { return conv(32, 16, true); }},
      {"conv_fwd/64x8x8", [] { return conv(64, 8, false); }},
      {"conv_bwd/64x8x8", [] { return conv(64, 8, true); }},
      {"bn_relu_fwd+bwd/64x64x28x28", [] { return bn_relu(64, 64, 28); }},
      {"bn_add_relu_fwd+bwd/128x16x32x32", [] { return bn_add_relu(128, 16, 32); }},
      {"bn_add_relu_fwd+bwd/256x64x56x56", [] { return bn_add_relu(256, 64, 56); }},
      {"seed_cnn_train_step/64", [] { return train_step(bnrelu::models::seed_cnn<float>(1, 10), 64, 1, 28); }},
      {"resnet20_train_step/128", [] { return train_step(bnrelu::models::resnet20<float>(3, 10), 128, 3, 32); }},
  };
  return all;
}

}  // namespace

#define AB_JOIN2(a, b) a##_##b
#define AB_JOIN(a, b) AB_JOIN2(a, b)
#define AB_EXPORT extern "C" __attribute__((visibility("default")))

AB_EXPORT int AB_JOIN(AB_PREFIX, cases)() { return static_cast<int>(entries().size()); }
AB_EXPORT const char* AB_JOIN(AB_PREFIX, name)(int i) { return entries()[static_cast<std::size_t>(i)].name; }
AB_EXPORT void* AB_JOIN(AB_PREFIX, make)(int i, int threads) {
  bnrelu::set_num_threads(threads);
  bnrelu::manual_seed(1);
  auto* c = new Case(entries()[static_cast<std::size_t>(i)].make());
  for (int k = 0; k < 2; ++k) c->run();  // untimed: every buffer allocated and first touched
  return c;
}
AB_EXPORT void AB_JOIN(AB_PREFIX, run)(void* c, int threads) {
  bnrelu::set_num_threads(threads);
  static_cast<Case*>(c)->run();
}
AB_EXPORT void AB_JOIN(AB_PREFIX, free)(void* c) { delete static_cast<Case*>(c); }
