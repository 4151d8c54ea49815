// The const inference path: model.infer(x) equals the eval-mode forward bit for bit, changes no
// state, and gives the same outputs when many threads call it at once on one model. Built a
// second time with ThreadSanitizer (bnrelu_tsan_tests), where the concurrent tests must run
// without a report.
#include <bnrelu/models/resnet.hpp>
#include <bnrelu/models/seed_cnn.hpp>
#include <bnrelu/nn/loss.hpp>
#include <bnrelu/random.hpp>
#include <bnrelu/threads.hpp>

#include <gtest/gtest.h>

#include <cstring>
#include <limits>
#include <thread>
#include <vector>

namespace nn = bnrelu::nn;
using bnrelu::Index;
using bnrelu::Tensor;

namespace {

template <int R>
Tensor<float, R> random_input(const bnrelu::Dims<R>& d) {
  Tensor<float, R> x(d);
  bnrelu::fill_uniform(x.data(), x.size(), -1, 1);
  return x;
}

template <class A, class B>
bool same_bits(const A& a, const B& b) {
  return a.dimensions() == b.dimensions() &&
         std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(float)) == 0;
}

// Two training steps, so that the running statistics are the batch's and not 0 and 1.
template <class Model>
void train_two_steps(Model& model, const bnrelu::Dims<4>& d) {
  nn::CrossEntropyLoss<float> ce;
  std::vector<std::int64_t> labels(static_cast<std::size_t>(d[0]));
  for (std::size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<std::int64_t>(i % 10);
  model.train();
  for (int step = 0; step < 2; ++step) {
    const auto logits = model.forward(random_input<4>(d));
    ce.forward(logits, labels);
    model.backward(ce.backward());
  }
}

template <class Model>
void expect_infer_is_eval_forward(Model& model, const bnrelu::Dims<4>& d) {
  const auto x = random_input<4>(d);
  const auto buffers_before = model.named_buffers();
  std::vector<std::vector<float>> before;
  for (const auto& b : buffers_before) before.emplace_back(b.value.begin(), b.value.end());
  const auto inferred = model.infer(x);  // in training mode: still the eval-mode output
  EXPECT_TRUE(model.is_training());
  const auto buffers_after = model.named_buffers();
  for (std::size_t i = 0; i < before.size(); ++i)
    EXPECT_EQ(std::vector<float>(buffers_after[i].value.begin(), buffers_after[i].value.end()), before[i])
        << buffers_after[i].name << " changed";
  model.eval();
  EXPECT_TRUE(same_bits(inferred, model.forward(x)));
  model.fuse_for_inference();
  EXPECT_TRUE(same_bits(model.infer(x), model.forward(x)));
}

TEST(Infer, SeedCnnEqualsTheEvalForwardAndChangesNothing) {
  bnrelu::manual_seed(3);
  auto model = bnrelu::models::seed_cnn<float>(1, 10);
  train_two_steps(model, {8, 1, 28, 28});
  expect_infer_is_eval_forward(model, {5, 1, 28, 28});
}

TEST(Infer, ResNet20EqualsTheEvalForwardAndChangesNothing) {
  bnrelu::manual_seed(4);
  auto model = bnrelu::models::resnet20<float>(3, 10);
  train_two_steps(model, {4, 3, 16, 16});
  expect_infer_is_eval_forward(model, {3, 3, 16, 16});
}

// fuse_for_inference keeps each 3x3 Conv2d's Winograd filter transform; a weight changed
// afterwards must be seen, not the kept transform of the old one.
TEST(Infer, AWeightChangedAfterFoldingIsSeen) {
  bnrelu::manual_seed(9);
  auto model = bnrelu::models::seed_cnn<float>(1, 10);
  train_two_steps(model, {8, 1, 28, 28});
  model.fuse_for_inference();
  auto& conv2 = model.get<4>();
  ASSERT_TRUE(conv2.prepared_for_inference());
  const auto x = random_input<4>({2, 1, 28, 28});
  const auto before = model.infer(x);
  conv2.weight()(3, 5, 1, 1) += 0.5f;
  EXPECT_FALSE(conv2.prepared_for_inference());
  const auto after = model.infer(x);
  EXPECT_FALSE(same_bits(after, before));
  conv2.prepare_inference();
  EXPECT_TRUE(same_bits(model.infer(x), after));
  EXPECT_TRUE(same_bits(model.forward(x), after));
  for (auto& p : model.named_parameters()) (void)p;  // a writable view drops it too
  EXPECT_FALSE(conv2.prepared_for_inference());
}

TEST(Infer, BatchNormWithoutRunningStatisticsUsesTheBatchs) {
  nn::Sequential model(nn::BatchNorm2d<float>({.num_features = 3, .track_running_stats = false}), nn::ReLU<float>{});
  const auto x = random_input<4>({4, 3, 5, 5});
  const auto inferred = model.infer(x);
  model.eval();
  EXPECT_TRUE(same_bits(inferred, model.forward(x)));
}

TEST(Infer, RefusesABadShapeLikeForward) {
  const auto model = bnrelu::models::seed_cnn<float>(1, 10);
  EXPECT_THROW(model.infer(random_input<4>({2, 3, 28, 28})), bnrelu::shape_error);
}

// A convolution's infer followed by a max pool, computed in one pass (Conv2d::infer_max_pooled,
// which Sequential's infer takes for a Conv2d, with or without a folded batch norm and ReLU,
// followed by a MaxPool2d): the bits of the two layers' infer one after the other, for the
// pools Winograd's 2x2 tiles compute (odd outputs too) and those pooled from scratch, for
// inputs holding NaN and infinities, on one thread and on a team sharing a batch of one.
template <class T>
void expect_pooled_infer_is_infer_then_pool(const nn::Conv2dOptions& conv_opt, const nn::MaxPool2dOptions& pool_opt,
                                            const bnrelu::Dims<4>& d) {
  SCOPED_TRACE("kernel " + std::to_string(conv_opt.kernel_size) + ", " + std::to_string(conv_opt.in_channels) +
               " -> " + std::to_string(conv_opt.out_channels) + ", pool " + std::to_string(pool_opt.kernel_size) +
               ", input " + bnrelu::shape_string(d));
  bnrelu::manual_seed(11);
  nn::Conv2d<T> conv(conv_opt);
  nn::MaxPool2d<T> pool(pool_opt);
  Tensor<T, 4> x(d);
  bnrelu::fill_uniform(x.data(), x.size(), -1, 1);
  x(0, 0, 1, 2) = std::numeric_limits<T>::quiet_NaN();  // NaN and infinities reach some windows
  x(d[0] - 1, d[1] - 1, d[2] - 2, 0) = std::numeric_limits<T>::infinity();
  x(d[0] - 1, 0, 3, d[3] - 1) = -std::numeric_limits<T>::infinity();
  auto bits_equal = [](const Tensor<T, 4>& a, const Tensor<T, 4>& b) {
    return a.dimensions() == b.dimensions() &&
           std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(T)) == 0;
  };
  const int saved = bnrelu::num_threads();
  for (int threads : {1, 2}) {
    for (bool prepared : {false, true}) {
      SCOPED_TRACE("threads " + std::to_string(threads) + (prepared ? ", kept Winograd filters" : ""));
      bnrelu::set_num_threads(threads);
      if (prepared) conv.prepare_inference();
      const auto expected = pool.infer(conv.infer(x));
      EXPECT_TRUE(bits_equal(conv.infer_max_pooled(x, pool), expected));
      const auto one = x.slice(bnrelu::Dims<4>{0, 0, 0, 0}, bnrelu::Dims<4>{1, d[1], d[2], d[3]});
      const Tensor<T, 4> first = one;  // a batch of one: a team shares the image
      EXPECT_TRUE(bits_equal(conv.infer_max_pooled(first, pool),
                             pool.infer(conv.infer(first))));
    }
  }
  bnrelu::set_num_threads(saved);
  nn::Sequential chain(conv, pool);
  static_assert(nn::detail::PoolsInto<nn::Conv2d<T>, nn::MaxPool2d<T>>);
  const auto expected = pool.infer(conv.infer(x));
  EXPECT_TRUE(bits_equal(chain.infer(x), expected));
  const auto out = conv.output_dims(bnrelu::dims_of(x));  // a window larger than the output
  const nn::MaxPool2d<T> too_big({.kernel_size = std::max(out[2], out[3]) + 1});
  EXPECT_THROW(conv.infer_max_pooled(x, too_big), bnrelu::shape_error);
}

// Through Sequential after fuse_for_inference: a batch norm folded into the convolution, with and
// without a ReLU, then the pool: infer's bits are the eval forward's, which runs the layers apart.
TEST(Infer, FoldedConvolutionBatchNormReLUAndPoolGiveTheEvalForwardsBits) {
  bnrelu::manual_seed(12);
  const nn::Conv2dOptions conv{.in_channels = 8, .out_channels = 16, .kernel_size = 3, .padding = 1};
  nn::Sequential with_relu(nn::Conv2d<float>(conv), nn::BatchNorm2d<float>({.num_features = 16}), nn::ReLU<float>{},
                           nn::MaxPool2d<float>({.kernel_size = 2}));
  nn::Sequential without_relu(nn::Conv2d<float>(conv), nn::BatchNorm2d<float>({.num_features = 16}),
                              nn::MaxPool2d<float>({.kernel_size = 3, .stride = 2, .padding = 1}));
  const auto x = random_input<4>({3, 8, 11, 12});
  for (int i = 0; i < 2; ++i) {  // running statistics other than 0 and 1
    with_relu.forward(random_input<4>({4, 8, 11, 12}));
    without_relu.forward(random_input<4>({4, 8, 11, 12}));
  }
  with_relu.fuse_for_inference();
  without_relu.fuse_for_inference();
  ASSERT_EQ(with_relu.layers_folded_into(0), 3u);
  ASSERT_EQ(without_relu.layers_folded_into(0), 2u);
  EXPECT_TRUE(same_bits(with_relu.infer(x), with_relu.forward(x)));
  EXPECT_TRUE(same_bits(without_relu.infer(x), without_relu.forward(x)));
}

TEST(Infer, ConvolutionAndMaxPoolInOnePassGiveTheTwoLayersBits) {
  // Winograd (3x3, 8+ channels): the pool's windows are its tiles, outputs of 14 and 13 (odd)
  expect_pooled_infer_is_infer_then_pool<float>({.in_channels = 8, .out_channels = 16, .kernel_size = 3, .padding = 1},
                                                {.kernel_size = 2}, {3, 8, 14, 14});
  expect_pooled_infer_is_infer_then_pool<float>({.in_channels = 9, .out_channels = 8, .kernel_size = 3, .padding = 1},
                                                {.kernel_size = 2}, {2, 9, 13, 11});
  expect_pooled_infer_is_infer_then_pool<double>({.in_channels = 8, .out_channels = 8, .kernel_size = 3, .padding = 1},
                                                 {.kernel_size = 2}, {2, 8, 10, 9});
  // pooled from scratch: Winograd with an overlapping, padded pool; im2col (one input channel,
  // the seed CNN's first layer; a 5x5 kernel at stride 2)
  expect_pooled_infer_is_infer_then_pool<float>({.in_channels = 8, .out_channels = 8, .kernel_size = 3, .padding = 1},
                                                {.kernel_size = 3, .stride = 2, .padding = 1}, {2, 8, 12, 12});
  expect_pooled_infer_is_infer_then_pool<float>({.in_channels = 1, .out_channels = 64, .kernel_size = 3, .padding = 1},
                                                {.kernel_size = 2}, {3, 1, 28, 28});
  expect_pooled_infer_is_infer_then_pool<double>(
      {.in_channels = 3, .out_channels = 5, .kernel_size = 5, .stride = 2, .padding = 2}, {.kernel_size = 2},
      {2, 3, 15, 15});
}

// Each of `threads` threads runs infer on its own inputs `rounds` times on the one shared model;
// every output must equal the one-thread result for that input.
template <class Model>
void expect_concurrent_infer_matches(const Model& model, const bnrelu::Dims<4>& d, int threads, int rounds) {
  std::vector<Tensor<float, 4>> inputs;
  std::vector<Tensor<float, 2>> expected;
  for (int t = 0; t < threads; ++t) {
    inputs.push_back(random_input<4>(d));
    expected.push_back(model.infer(inputs.back()));
  }
  std::vector<int> mismatches(static_cast<std::size_t>(threads), 0);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (int r = 0; r < rounds; ++r)
        if (!same_bits(model.infer(inputs[static_cast<std::size_t>(t)]), expected[static_cast<std::size_t>(t)]))
          ++mismatches[static_cast<std::size_t>(t)];
    });
  for (auto& th : pool) th.join();
  for (int t = 0; t < threads; ++t) EXPECT_EQ(mismatches[static_cast<std::size_t>(t)], 0) << "thread " << t;
}

TEST(InferThreads, ManyThreadsShareOneSeedCnn) {
  bnrelu::manual_seed(5);
  auto model = bnrelu::models::seed_cnn<float>(1, 10);
  train_two_steps(model, {8, 1, 28, 28});
  model.eval();
  const auto& shared = model;
#ifdef __SANITIZE_THREAD__
  const std::vector<int> inner_threads{1};  // libgomp's threads are not instrumented
#else
  const std::vector<int> inner_threads{1, 2};
#endif
  for (int inner : inner_threads) {  // bnrelu's own threads inside each call
    SCOPED_TRACE("num_threads " + std::to_string(inner));
    bnrelu::set_num_threads(inner);
    expect_concurrent_infer_matches(shared, {2, 1, 28, 28}, 2, 3);
    expect_concurrent_infer_matches(shared, {1, 1, 28, 28}, 4, 2);
  }
  model.fuse_for_inference();
  bnrelu::set_num_threads(1);
  expect_concurrent_infer_matches(shared, {3, 1, 28, 28}, 3, 2);
}

TEST(InferThreads, ManyThreadsShareOneResNet20) {
  bnrelu::manual_seed(6);
  auto model = bnrelu::models::resnet20<float>(3, 10);
  train_two_steps(model, {4, 3, 16, 16});
  model.fuse_for_inference();
  bnrelu::set_num_threads(1);
  expect_concurrent_infer_matches(std::as_const(model), {2, 3, 16, 16}, 2, 2);
}

}  // namespace
