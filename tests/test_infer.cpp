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
