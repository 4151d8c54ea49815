#include <bnrelu/bnrelu.hpp>
#include <bnrelu/testing/gradcheck.hpp>

#include "golden.hpp"

namespace nn = bnrelu::nn;
using bnrelu::Tensor;
using namespace bnrelu::test;

namespace {

auto nine_layer_net() {
  return nn::Sequential{nn::Conv2d<double>({.in_channels = 2, .out_channels = 3, .kernel_size = 3, .padding = 1}),
                        nn::BatchNorm2d<double>({.num_features = 3}), nn::ReLU<double>{},
                        nn::MaxPool2d<double>({.kernel_size = 2}), nn::Flatten<double>{},
                        nn::Linear<double>({.in_features = 12, .out_features = 5}),
                        nn::BatchNorm1d<double>({.num_features = 5}), nn::ReLU<double>{},
                        nn::Linear<double>({.in_features = 5, .out_features = 2})};
}

}  // namespace

TEST(Sequential, DeducesTypesAndNamesLikeTorch) {
  auto net = nine_layer_net();
  static_assert(std::is_same_v<decltype(net)::input_type, Tensor<double, 4>>);
  static_assert(std::is_same_v<decltype(net)::output_type, Tensor<double, 2>>);
  std::vector<std::string> names;
  for (auto& p : net.named_parameters()) names.push_back(p.name);
  EXPECT_EQ(names, (std::vector<std::string>{"0.weight", "0.bias", "1.weight", "1.bias", "5.weight", "5.bias",
                                             "6.weight", "6.bias", "8.weight", "8.bias"}));
  std::vector<std::string> buffers;
  for (auto& b : net.named_buffers()) buffers.push_back(b.name);
  EXPECT_EQ(buffers, (std::vector<std::string>{"1.running_mean", "1.running_var", "6.running_mean", "6.running_var"}));
  // get<I> is the layer the model runs: a change through it shows in named_parameters
  net.get<5>().weight()(0, 0) = 42.0;
  EXPECT_EQ(net.named_parameters()[4].value[0], 42.0);
  EXPECT_EQ(net.named_parameters()[4].name, "5.weight");
  EXPECT_EQ(net.get<5>().options().in_features, 12);
}

TEST(Sequential, NestedSequentialPrefixesNames) {
  nn::Sequential inner{nn::Linear<float>({.in_features = 3, .out_features = 2}), nn::ReLU<float>{}};
  nn::Sequential outer{nn::Linear<float>({.in_features = 4, .out_features = 3}), std::move(inner)};
  std::vector<std::string> names;
  for (auto& p : outer.named_parameters()) names.push_back(p.name);
  EXPECT_EQ(names, (std::vector<std::string>{"0.weight", "0.bias", "1.0.weight", "1.0.bias"}));
  const auto y = outer.forward(random_tensor<float, 2>({2, 4}));
  EXPECT_EQ(y.dimension(1), 2);
}

// A Sequential inside a Sequential, with its own fused BatchNorm + ReLU: input and parameter
// gradients by finite differences, fusion on and off.
TEST(Sequential, GradcheckNested) {
  for (bool fused : {true, false}) {
    bnrelu::manual_seed(22);
    nn::Sequential inner{nn::Linear<double>({.in_features = 5, .out_features = 4}), nn::BatchNorm1d<double>({.num_features = 4}),
                         nn::ReLU<double>{}};
    nn::Sequential outer{nn::Linear<double>({.in_features = 3, .out_features = 5}), std::move(inner),
                         nn::Linear<double>({.in_features = 4, .out_features = 2})};
    outer.set_fusion(fused);
    outer.get<1>().set_fusion(fused);
    const auto r = bnrelu::testing::gradcheck(outer, random_tensor<double, 2>({6, 3}), {.max_checks = 40});
    EXPECT_TRUE(r.ok) << r.worst;
  }
}

TEST(Sequential, GradcheckFusedAndUnfused) {
  for (bool fused : {true, false}) {
    bnrelu::manual_seed(21);
    auto net = nine_layer_net();
    net.set_fusion(fused);
    const auto r = bnrelu::testing::gradcheck(net, random_tensor<double, 4>({3, 2, 4, 4}), {.max_checks = 40});
    EXPECT_TRUE(r.ok) << r.worst;
  }
}

TEST(Sequential, FusionChangesNothingButSpeed) {
  bnrelu::manual_seed(3);
  auto a = nine_layer_net();
  bnrelu::manual_seed(3);
  auto b = nine_layer_net();
  b.set_fusion(false);
  const auto x = random_tensor<double, 4>({4, 2, 4, 4});
  const auto dy = random_tensor<double, 2>({4, 2});
  EXPECT_TRUE(close_to(a.forward(x), b.forward(x), 1e-14));
  EXPECT_TRUE(close_to(a.backward(dy), b.backward(dy), 1e-13));
  auto pa = a.named_parameters(), pb = b.named_parameters();
  for (std::size_t i = 0; i < pa.size(); ++i) EXPECT_TRUE(close_to(pa[i].grad, std::vector<double>(pb[i].grad.begin(), pb[i].grad.end()), 1e-13)) << pa[i].name;
  auto ba = a.named_buffers(), bb = b.named_buffers();
  for (std::size_t i = 0; i < ba.size(); ++i) EXPECT_TRUE(close_to(ba[i].value, std::vector<double>(bb[i].value.begin(), bb[i].value.end()), 0)) << ba[i].name;
}

TEST(Sequential, ModePropagatesAndZeroGrad) {
  auto net = nine_layer_net();
  net.eval();
  EXPECT_FALSE(net.get<1>().is_training());
  EXPECT_FALSE(net.get<8>().is_training());
  const auto x = random_tensor<double, 4>({2, 2, 4, 4});
  net.forward(x);
  EXPECT_THROW(net.backward(Tensor<double, 2>(2, 2).setZero()), std::logic_error);
  net.train();
  EXPECT_TRUE(net.get<6>().is_training());
  net.forward(x);
  net.backward(random_tensor<double, 2>({2, 2}));
  net.zero_grad();
  for (auto& p : net.named_parameters())
    for (double g : p.grad) EXPECT_EQ(g, 0.0);
}

TEST(Sequential, ShapeErrorBeforeAnyLayerRuns) {
  auto net = nine_layer_net();
  const auto x = random_tensor<double, 4>({2, 2, 4, 4});
  net.forward(x);
  net.backward(random_tensor<double, 2>({2, 2}));
  const auto before = state_of(net);
  // 6 x 6 images pass the conv, BN and pool but give 27 features to a Linear of 12
  try {
    net.forward(random_tensor<double, 4>({2, 2, 6, 6}));
    FAIL();
  } catch (const bnrelu::shape_error& e) {
    EXPECT_NE(std::string(e.what()).find("Linear"), std::string::npos) << e.what();
  }
  EXPECT_EQ(state_of(net), before);
  EXPECT_EQ(net.get<1>().num_batches_tracked(), 1);
  EXPECT_THROW(net.backward(Tensor<double, 2>(3, 2)), bnrelu::shape_error);
  EXPECT_EQ(state_of(net), before);
  // found in review: one image in training passes the 2-D batch norms (16 values per channel)
  // but not the 1-D one; the whole chain must refuse it before the 2-D layers update their
  // running statistics
  EXPECT_THROW(net.forward(random_tensor<double, 4>({1, 2, 4, 4})), bnrelu::shape_error);
  EXPECT_EQ(state_of(net), before);
  EXPECT_EQ(net.get<1>().num_batches_tracked(), 1);
  EXPECT_NO_THROW(net.backward(random_tensor<double, 2>({2, 2})));  // the last good forward's caches
}

// Layers reuse the storage of the gradients they are handed and of the inputs they no longer
// need. A model driven with rvalues through changing batch sizes, fused and unfused, must give
// exactly what a model driven with copies gives.
TEST(Sequential, RecycledBuffersChangeNoResult) {
  for (bool fused : {true, false}) {
    SCOPED_TRACE(fused ? "fused" : "unfused");
    bnrelu::manual_seed(4);
    auto a = nine_layer_net();
    bnrelu::manual_seed(4);
    auto b = nine_layer_net();
    a.set_fusion(fused);
    b.set_fusion(fused);
    for (bnrelu::Index n : {4, 4, 3, 6, 4}) {
      const auto x = random_tensor<double, 4>({n, 2, 4, 4});
      const auto dy = random_tensor<double, 2>({n, 2});
      a.zero_grad();
      b.zero_grad();
      const Tensor<double, 2> ya = a.forward(Tensor<double, 4>(x));
      EXPECT_TRUE(close_to(ya, b.forward(x), 0));
      const Tensor<double, 4> dxa = a.backward(Tensor<double, 2>(dy));
      EXPECT_TRUE(close_to(dxa, b.backward(dy), 0));
      auto pa = a.named_parameters(), pb = b.named_parameters();
      for (std::size_t i = 0; i < pa.size(); ++i)
        EXPECT_TRUE(close_to(pa[i].grad, std::vector<double>(pb[i].grad.begin(), pb[i].grad.end()), 0)) << pa[i].name;
    }
  }
}

// backward_params accumulates exactly backward's parameter gradients.
TEST(Sequential, BackwardParamsGivesBackwardsGradients) {
  bnrelu::manual_seed(5);
  auto a = nine_layer_net();
  bnrelu::manual_seed(5);
  auto b = nine_layer_net();
  const auto x = random_tensor<double, 4>({4, 2, 4, 4});
  const auto dy = random_tensor<double, 2>({4, 2});
  a.forward(x);
  a.backward(dy);
  b.forward(x);
  b.backward_params(dy);
  auto pa = a.named_parameters(), pb = b.named_parameters();
  for (std::size_t i = 0; i < pa.size(); ++i)
    EXPECT_TRUE(close_to(pa[i].grad, std::vector<double>(pb[i].grad.begin(), pb[i].grad.end()), 0)) << pa[i].name;
  nn::Sequential untrained{nn::Linear<double>({.in_features = 3, .out_features = 2})};
  EXPECT_THROW(untrained.backward_params(Tensor<double, 2>(1, 2)), std::logic_error);
}

// fuse_for_inference folds each eval-mode batch norm (and its ReLU) into the layer before it.
template <class T>
void expect_folded_equals_eval(double tol) {
  bnrelu::manual_seed(6);
  auto model = bnrelu::models::seed_cnn<T>(1, 10);
  bnrelu::nn::CrossEntropyLoss<T> loss;
  bnrelu::optim::SGD<T> opt(model.named_parameters(), {.lr = 0.05, .momentum = 0.9});
  std::vector<std::int64_t> labels{1, 2, 3, 4, 5, 6};
  for (int step = 0; step < 3; ++step) {  // running statistics and weights away from their init
    opt.zero_grad();
    loss.forward(model.forward(random_tensor<T, 4>({6, 1, 28, 28})), labels);
    model.backward_params(loss.backward());
    opt.step();
  }
  const auto x = random_tensor<T, 4>({5, 1, 28, 28});
  model.eval();
  const Tensor<T, 2> want = model.forward(x);
  model.fuse_for_inference();
  const Tensor<T, 2> got = model.forward(x);
  EXPECT_TRUE(close_to(got, want, tol));
  EXPECT_THROW(model.train(), std::logic_error);
  auto& conv = model.template get<0>();
  conv.train();
  EXPECT_THROW(conv.forward(x), std::logic_error);
}

TEST(Sequential, FuseForInferenceEqualsEvalFloat) { expect_folded_equals_eval<float>(2e-5); }
TEST(Sequential, FuseForInferenceEqualsEvalDouble) { expect_folded_equals_eval<double>(1e-12); }

TEST(Sequential, FuseForInferenceFoldsOnlyWhatItCan) {
  bnrelu::manual_seed(7);
  // conv without bias + fused BatchNormReLU2d; linear + BatchNorm1d without running stats
  nn::Sequential model{nn::Conv2d<double>({.in_channels = 1, .out_channels = 2, .kernel_size = 3, .bias = false}),
                       nn::BatchNormReLU2d<double>({.num_features = 2}), nn::Flatten<double>{},
                       nn::Linear<double>({.in_features = 8, .out_features = 3}),
                       nn::BatchNorm1d<double>({.num_features = 3, .track_running_stats = false}),
                       nn::ReLU<double>{}};
  for (int step = 0; step < 2; ++step) model.forward(random_tensor<double, 4>({4, 1, 4, 4}));
  const auto x = random_tensor<double, 4>({3, 1, 4, 4});
  model.eval();
  const auto want = model.forward(x);
  model.fuse_for_inference();
  EXPECT_TRUE(close_to(model.forward(x), want, 1e-12));
  EXPECT_EQ(model.get<0>().named_parameters().size(), 2u);  // gained the folded bias
  model.fuse_for_inference();  // a second call folds nothing again
  EXPECT_TRUE(close_to(model.forward(x), want, 1e-12));
  EXPECT_TRUE(model.get<0>().folded_relu());
  EXPECT_FALSE(model.get<3>().folded_relu());  // batch statistics: not folded
}

TEST(Sequential, FuseForInferenceRefusesMismatchedChannelsAndChangesNothing) {
  bnrelu::manual_seed(8);
  nn::Sequential model{nn::Linear<double>({.in_features = 3, .out_features = 4}),
                       nn::BatchNorm1d<double>({.num_features = 2})};  // forward would reject it too
  const std::vector<double> before(model.get<0>().weight().data(), model.get<0>().weight().data() + 12);
  EXPECT_THROW(model.fuse_for_inference(), bnrelu::shape_error);
  EXPECT_TRUE(model.is_training());
  EXPECT_EQ(std::vector<double>(model.get<0>().weight().data(), model.get<0>().weight().data() + 12), before);
  EXPECT_FALSE(model.get<0>().folded_relu());
}

// The same for the float seed CNN (whose max-pooling takes the AVX2 path): every step of a
// model that recycles its buffers equals the step of a fresh model with the same state.
TEST(Sequential, RecycledBuffersChangeNoResultSeedCnnFloat) {
  bnrelu::manual_seed(9);
  auto a = bnrelu::models::seed_cnn<float>(1, 10);
  bnrelu::nn::CrossEntropyLoss<float> la, lb;
  for (int step = 0; step < 3; ++step) {
    SCOPED_TRACE(step);
    bnrelu::manual_seed(100 + static_cast<std::uint64_t>(step));
    auto b = bnrelu::models::seed_cnn<float>(1, 10);
    auto pa = a.named_parameters(), pb = b.named_parameters();
    for (std::size_t i = 0; i < pa.size(); ++i) std::copy(pa[i].value.begin(), pa[i].value.end(), pb[i].value.begin());
    auto ba = a.named_buffers(), bb = b.named_buffers();
    for (std::size_t i = 0; i < ba.size(); ++i) std::copy(ba[i].value.begin(), ba[i].value.end(), bb[i].value.begin());
    const auto x = random_tensor<float, 4>({6 + step, 1, 28, 28});
    std::vector<std::int64_t> labels;
    for (int i = 0; i < 6 + step; ++i) labels.push_back(i % 10);
    a.zero_grad();
    b.zero_grad();
    EXPECT_EQ(la.forward(a.forward(x), labels), lb.forward(b.forward(x), labels));
    a.backward_params(la.backward());
    b.backward_params(lb.backward());
    for (std::size_t i = 0; i < pa.size(); ++i)
      EXPECT_TRUE(close_to(pa[i].grad, std::vector<float>(pb[i].grad.begin(), pb[i].grad.end()), 0)) << pa[i].name;
    for (std::size_t i = 0; i < pa.size(); ++i)  // a plain SGD step keeps the two apart from here on
      for (std::size_t k = 0; k < pa[i].value.size(); ++k) pa[i].value[k] -= 0.05f * pa[i].grad[k];
  }
}
