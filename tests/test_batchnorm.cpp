#include <bnrelu/nn/batchnorm.hpp>
#include <bnrelu/nn/relu.hpp>
#include <bnrelu/testing/gradcheck.hpp>

#include "golden.hpp"

namespace nn = bnrelu::nn;
using bnrelu::Tensor;
using namespace bnrelu::test;

namespace {

nn::BatchNormOptions options_of(const nlohmann::json& o) {
  return {.num_features = o["num_features"].get<bnrelu::Index>(), .eps = o["eps"].get<double>(),
          .momentum = o["momentum"].get<double>(), .affine = o["affine"].get<bool>(),
          .track_running_stats = o["track_running_stats"].get<bool>()};
}

// Replays the fixture: per step a plain forward/backward, then BatchNorm+ReLU, on one layer
// (so running statistics and gradients accumulate as in the PyTorch script); then eval.
// mode 0: the pair through forward_fused_relu; mode 1: the layer then a separate ReLU.
template <class T, class BN, int Rank>
void replay(const std::string& name, int mode) {
  SCOPED_TRACE(name + " mode " + std::to_string(mode));
  Fixture f(name);
  const auto& o = f.options;
  BN bn(options_of(o));
  nn::ReLU<T> relu;
  if (o["affine"]) {
    assign(bn.named_parameters(), "weight", f.values<T>("weight"));
    assign(bn.named_parameters(), "bias", f.values<T>("bias"));
  }
  const double tol = tolerance<T>();
  for (int s = 0; s < o["steps"].get<int>(); ++s) {
    const auto k = std::to_string(s);
    const auto x = f.tensor<T, Rank>("x" + k);
    const auto dy = f.tensor<T, Rank>("dy" + k);
    EXPECT_TRUE(close_to(bn.forward(x), f.tensor<double, Rank>("y" + k), tol));
    EXPECT_TRUE(close_to(bn.backward(dy), f.tensor<double, Rank>("dx" + k), tol));
    Tensor<T, Rank> y, dx;
    if (mode == 0) {
      y = bn.forward_fused_relu(Tensor<T, Rank>(x));
      dx = bn.backward_fused_relu(dy);
    } else {
      y = relu.forward(bn.forward(x));
      dx = bn.backward(relu.backward(dy));
    }
    EXPECT_TRUE(close_to(y, f.tensor<double, Rank>("y_relu" + k), tol));
    EXPECT_TRUE(close_to(dx, f.tensor<double, Rank>("dx_relu" + k), tol));
  }
  if (o["affine"]) {
    EXPECT_TRUE(close_to(bn.weight_grad(), f.tensor<double, 1>("dweight"), tol));
    EXPECT_TRUE(close_to(bn.bias_grad(), f.tensor<double, 1>("dbias"), tol));
  } else {
    EXPECT_TRUE(bn.named_parameters().empty());
  }
  if (o["track_running_stats"]) {
    EXPECT_TRUE(close_to(bn.running_mean(), f.tensor<double, 1>("running_mean"), tol));
    EXPECT_TRUE(close_to(bn.running_var(), f.tensor<double, 1>("running_var"), tol));
    EXPECT_EQ(bn.num_batches_tracked(), f.values<std::int64_t>("num_batches_tracked")[0]);
  } else {
    EXPECT_TRUE(bn.named_buffers().empty());
  }
  bn.eval();
  const auto xe = f.tensor<T, Rank>("x_eval");
  EXPECT_TRUE(close_to(bn.forward(xe), f.tensor<double, Rank>("y_eval"), tol));
  EXPECT_TRUE(close_to(bn.forward_fused_relu(Tensor<T, Rank>(xe)), f.tensor<double, Rank>("y_eval_relu"), tol));
  EXPECT_THROW(bn.backward(f.tensor<T, Rank>("dy0")), std::logic_error);  // eval caches nothing
}

}  // namespace

template <class T>
class BatchNormGolden : public ::testing::Test {};
TYPED_TEST_SUITE(BatchNormGolden, FloatTypes);

TYPED_TEST(BatchNormGolden, BatchNorm2dMatchesPyTorch) {
  using T = TypeParam;
  for (const char* name : {"bn2d_basic", "bn2d_options", "bn2d_noaffine", "bn2d_notrack",
                           "bn2d_offset", "bn2d_two_values"})
    for (int mode : {0, 1}) replay<T, nn::BatchNorm2d<T>, 4>(name, mode);
}

TYPED_TEST(BatchNormGolden, BatchNorm1dMatchesPyTorch) {
  using T = TypeParam;
  for (const char* name : {"bn1d_basic", "bn1d_wide"})
    for (int mode : {0, 1}) replay<T, nn::BatchNorm1d<T>, 2>(name, mode);
}

TEST(BatchNorm, GradcheckAwkwardShapes) {
  using O = nn::BatchNormOptions;
  struct Case { bnrelu::Index N, C, H, W; O opt; };
  for (auto c : {Case{2, 3, 4, 5, O{.num_features = 3}}, Case{1, 1, 2, 1, O{.num_features = 1}},
                 Case{3, 2, 1, 3, O{.num_features = 2, .eps = 1e-2, .affine = false}},
                 Case{2, 3, 3, 2, O{.num_features = 3, .track_running_stats = false}}}) {
    bnrelu::manual_seed(11);
    nn::BatchNorm2d<double> bn(c.opt);
    if (c.opt.affine) {
      for (auto& p : bn.named_parameters())
        for (auto& v : p.value) v = bnrelu::uniform(-1.5, 1.5);
    }
    const auto x = random_tensor<double, 4>({c.N, c.C, c.H, c.W});
    const auto r = bnrelu::testing::gradcheck(bn, x);
    EXPECT_TRUE(r.ok) << r.worst;
  }
  bnrelu::manual_seed(12);
  nn::BatchNorm1d<double> bn1({.num_features = 4});
  for (auto& p : bn1.named_parameters())
    for (auto& v : p.value) v = bnrelu::uniform(-1.5, 1.5);
  const auto r = bnrelu::testing::gradcheck(bn1, random_tensor<double, 2>({5, 4}));
  EXPECT_TRUE(r.ok) << r.worst;
}

TEST(BatchNorm, DefaultsAndNames) {
  nn::BatchNorm2d<float> bn({.num_features = 3});
  auto p = bn.named_parameters();
  ASSERT_EQ(p.size(), 2u);
  EXPECT_EQ(p[0].name, "weight");
  EXPECT_EQ(p[1].name, "bias");
  for (float v : p[0].value) EXPECT_EQ(v, 1.0f);
  for (float v : p[1].value) EXPECT_EQ(v, 0.0f);
  auto b = bn.named_buffers();
  ASSERT_EQ(b.size(), 2u);
  EXPECT_EQ(b[0].name, "running_mean");
  EXPECT_EQ(b[1].name, "running_var");
  for (float v : b[0].value) EXPECT_EQ(v, 0.0f);
  for (float v : b[1].value) EXPECT_EQ(v, 1.0f);
  EXPECT_EQ(b[1].shape, (std::vector<bnrelu::Index>{3}));
}

TEST(BatchNorm, RunningStatisticsOverSteps) {
  // running = (1 - m) running + m batch, with the unbiased variance, checked by hand in double
  nn::BatchNorm1d<double> bn({.num_features = 1, .momentum = 0.25});
  double rm = 0, rv = 1;
  for (int step = 0; step < 5; ++step) {
    Tensor<double, 2> x(4, 1);
    for (int i = 0; i < 4; ++i) x(i, 0) = step * 2.0 + i * i * (step + 1);
    double mean = 0, m2 = 0;
    for (int i = 0; i < 4; ++i) mean += x(i, 0) / 4;
    for (int i = 0; i < 4; ++i) m2 += (x(i, 0) - mean) * (x(i, 0) - mean);
    bn.forward(x);
    rm = 0.75 * rm + 0.25 * mean;
    rv = 0.75 * rv + 0.25 * m2 / 3;
    EXPECT_NEAR(bn.running_mean()(0), rm, 1e-12);
    EXPECT_NEAR(bn.running_var()(0), rv, 1e-12);
    EXPECT_EQ(bn.num_batches_tracked(), step + 1);
  }
}

TEST(BatchNorm, LargeOffsetKeepsVarianceAccurate) {
  // 1e4 + noise in float: a one-pass E[x^2] - E[x]^2 would lose every digit
  nn::BatchNorm2d<float> bn({.num_features = 1, .momentum = 1.0});
  Tensor<float, 4> x(8, 1, 16, 16);
  double mean = 0, m2 = 0;
  for (bnrelu::Index i = 0; i < x.size(); ++i) x.data()[i] = 1e4f + static_cast<float>(bnrelu::uniform(-0.01, 0.01));
  for (bnrelu::Index i = 0; i < x.size(); ++i) mean += x.data()[i];
  mean /= x.size();
  for (bnrelu::Index i = 0; i < x.size(); ++i) m2 += (x.data()[i] - mean) * (x.data()[i] - mean);
  bn.forward(x);
  EXPECT_NEAR(bn.running_var()(0), m2 / (x.size() - 1), 1e-4 * m2 / x.size());
}

// The output, not only the statistics, stays accurate when the mean is far larger than the
// spread: float outputs against a double evaluation of the same float inputs, for offsets up
// to 1e6 (PyTorch 1.13 float32 is off by 0.003 at 1e5 and 0.04 at 1e6 on such data), in the
// training forward (plain and fused with ReLU, 2-D and 1-D) and in eval.
TEST(BatchNorm, LargeOffsetKeepsOutputAccurate) {
  for (double offset : {1e4, 1e5, 1e6}) {
    SCOPED_TRACE(offset);
    constexpr bnrelu::Index N = 16, C = 3, S = 100;
    Tensor<float, 4> x(N, C, 10, 10);
    Tensor<float, 2> x1(N * S, C);
    for (bnrelu::Index n = 0; n < N; ++n)
      for (bnrelu::Index c = 0; c < C; ++c)
        for (bnrelu::Index i = 0; i < S; ++i) {
          const float v = static_cast<float>(offset * (c + 1) + bnrelu::uniform(-1.7, 1.7));
          x.data()[(n * C + c) * S + i] = v;
          x1(n * S + i, c) = v;
        }
    // the double reference per channel: mean, biased variance, y = (x - mean) / sqrt(var + eps) * w + b
    std::vector<double> mean(C, 0), var(C, 0);
    for (bnrelu::Index c = 0; c < C; ++c) {
      for (bnrelu::Index n = 0; n < N; ++n)
        for (bnrelu::Index i = 0; i < S; ++i) mean[c] += x.data()[(n * C + c) * S + i];
      mean[c] /= N * S;
      for (bnrelu::Index n = 0; n < N; ++n)
        for (bnrelu::Index i = 0; i < S; ++i) {
          const double d = x.data()[(n * C + c) * S + i] - mean[c];
          var[c] += d * d;
        }
      var[c] /= N * S;
    }
    auto want = [](float v, float w, float b, double m, double vr) {
      return (static_cast<double>(v) - m) / std::sqrt(vr + 1e-5) * w + b;
    };
    for (bool relu : {false, true}) {
      nn::BatchNorm2d<float> bn({.num_features = C});
      bn.weight().setValues({1.5f, 0.5f, 2.0f});
      bn.bias().setValues({0.25f, -0.5f, 0.0f});
      const auto y = relu ? bn.forward_fused_relu(x) : bn.forward(x);
      double err = 0;
      for (bnrelu::Index n = 0; n < N; ++n)
        for (bnrelu::Index c = 0; c < C; ++c)
          for (bnrelu::Index i = 0; i < S; ++i) {
            const auto at = (n * C + c) * S + i;
            double w = want(x.data()[at], bn.weight()(c), bn.bias()(c), mean[c], var[c]);
            if (relu) w = std::max(w, 0.0);
            err = std::max(err, std::abs(y.data()[at] - w));
          }
      EXPECT_LE(err, 2e-6) << (relu ? "fused" : "plain") << " 2-D training forward";
    }
    nn::BatchNorm1d<float> bn1({.num_features = C});
    const auto y1 = bn1.forward(x1);
    double err1 = 0;
    for (bnrelu::Index r = 0; r < N * S; ++r)
      for (bnrelu::Index c = 0; c < C; ++c)
        err1 = std::max(err1, std::abs(y1(r, c) - want(x1(r, c), 1.0f, 0.0f, mean[c], var[c])));
    EXPECT_LE(err1, 2e-6) << "1-D training forward";
    // eval with running statistics at the offset
    nn::BatchNorm2d<float> ev({.num_features = C});
    for (bnrelu::Index c = 0; c < C; ++c) {
      ev.running_mean()(c) = static_cast<float>(mean[c]);
      ev.running_var()(c) = static_cast<float>(var[c]);
    }
    ev.eval();
    const auto ye = ev.forward(x);
    double erre = 0;
    for (bnrelu::Index n = 0; n < N; ++n)
      for (bnrelu::Index c = 0; c < C; ++c)
        for (bnrelu::Index i = 0; i < S; ++i) {
          const auto at = (n * C + c) * S + i;
          erre = std::max(erre, std::abs(ye.data()[at] - want(x.data()[at], 1.0f, 0.0f, ev.running_mean()(c),
                                                                 ev.running_var()(c))));
        }
    EXPECT_LE(erre, 2e-6) << "eval forward";
  }
}

// An infinite input gives an infinite mean, as in PyTorch (mean +inf, variance NaN), not NaN.
TEST(BatchNorm, InfiniteInputGivesInfiniteRunningMean) {
  for (bnrelu::Index S : {1, 64}) {
    SCOPED_TRACE(S);
    nn::BatchNorm2d<float> bn({.num_features = 2});
    Tensor<float, 4> x(4, 2, S, 1);
    for (bnrelu::Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(bnrelu::uniform(-1, 1));
    x(2, 0, 0, 0) = std::numeric_limits<float>::infinity();
    x(1, 1, 0, 0) = -std::numeric_limits<float>::infinity();
    bn.forward(x);
    EXPECT_EQ(bn.running_mean()(0), std::numeric_limits<float>::infinity());
    EXPECT_EQ(bn.running_mean()(1), -std::numeric_limits<float>::infinity());
    EXPECT_TRUE(std::isnan(bn.running_var()(0)));
  }
}

TEST(BatchNorm, VarianceStaysAccurateWhenImagesDrift) {
  // Each image's chunk of a channel is summed in one pass around the first image's mean; chunks
  // whose mean lies far from it (here every image after an outlying first one, 1000 standard
  // deviations away, and a channel whose images climb by 50 each) are summed exactly instead.
  constexpr bnrelu::Index N = 256, C = 2, S = 64;
  std::vector<float> x(N * C * S);
  for (bnrelu::Index n = 0; n < N; ++n)
    for (bnrelu::Index i = 0; i < S; ++i) {
      x[(n * C + 0) * S + i] = (n == 0 ? 1000.0f : 0.0f) + static_cast<float>(bnrelu::uniform(-1.7, 1.7));
      x[(n * C + 1) * S + i] = 50.0f * static_cast<float>(n) + static_cast<float>(bnrelu::uniform(-0.1, 0.1));
    }
  double mean[C], var[C];
  bnrelu::kernels::batchnorm_statistics(mean, var, x.data(), bnrelu::kernels::BatchShape{N, C, S});
  for (bnrelu::Index c = 0; c < C; ++c) {
    double m = 0, m2 = 0;
    for (bnrelu::Index n = 0; n < N; ++n)
      for (bnrelu::Index i = 0; i < S; ++i) m += x[(n * C + c) * S + i];
    m /= N * S;
    for (bnrelu::Index n = 0; n < N; ++n)
      for (bnrelu::Index i = 0; i < S; ++i) m2 += (x[(n * C + c) * S + i] - m) * (x[(n * C + c) * S + i] - m);
    // one pass for every chunk would be off by 2e-8 (mean) and 5e-7 (variance) here
    EXPECT_NEAR(mean[c], m, 1e-9 * std::abs(m)) << "channel " << c;
    EXPECT_NEAR(var[c], m2 / (N * S), 1e-9 * m2 / (N * S)) << "channel " << c;
  }
}

TEST(BatchNorm, ConstantChannelGivesFiniteResults) {
  nn::BatchNorm2d<float> bn({.num_features = 2});
  Tensor<float, 4> x(2, 2, 3, 3);
  x.setConstant(5.0f);
  const auto y = bn.forward(x);
  const auto dx = bn.backward(random_tensor<float, 4>({2, 2, 3, 3}));
  for (bnrelu::Index i = 0; i < y.size(); ++i) {
    EXPECT_TRUE(std::isfinite(y.data()[i]));
    EXPECT_TRUE(std::isfinite(dx.data()[i]));
  }
}

TEST(BatchNorm, NaNPropagates) {
  nn::BatchNorm2d<float> bn({.num_features = 1});
  auto x = random_tensor<float, 4>({2, 1, 2, 2});
  x(1, 0, 1, 1) = NAN;
  const auto y = bn.forward(x);
  EXPECT_TRUE(std::isnan(y(0, 0, 0, 0)));
  nn::BatchNorm2d<float> fused({.num_features = 1});
  const auto yf = fused.forward_fused_relu(Tensor<float, 4>(x));
  EXPECT_TRUE(std::isnan(yf(0, 0, 0, 0)));
}

TEST(BatchNorm, ErrorsLeaveStateUnchanged) {
  nn::BatchNorm2d<float> bn({.num_features = 3});
  EXPECT_THROW(bn.backward(Tensor<float, 4>(2, 3, 2, 2)), std::logic_error);
  bn.forward(random_tensor<float, 4>({2, 3, 2, 2}));
  bn.backward(random_tensor<float, 4>({2, 3, 2, 2}));
  const auto before = state_of(bn);
  const auto tracked = bn.num_batches_tracked();
  try {
    bn.forward(Tensor<float, 4>(2, 4, 2, 2));
    FAIL() << "no throw";
  } catch (const bnrelu::shape_error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("BatchNorm2d"), std::string::npos) << msg;
    EXPECT_NE(msg.find("2 x 4 x 2 x 2"), std::string::npos) << msg;
    EXPECT_NE(msg.find("N x 3 x H x W"), std::string::npos) << msg;
  }
  // one value per channel while training
  EXPECT_THROW(bn.forward(Tensor<float, 4>(1, 3, 1, 1)), bnrelu::shape_error);
  EXPECT_THROW(bn.backward(Tensor<float, 4>(2, 3, 2, 3)), bnrelu::shape_error);
  EXPECT_THROW(bn.backward_fused_relu(Tensor<float, 4>(2, 3, 2, 2)), std::logic_error);
  EXPECT_EQ(state_of(bn), before);
  EXPECT_EQ(bn.num_batches_tracked(), tracked);
  EXPECT_NO_THROW(bn.backward(random_tensor<float, 4>({2, 3, 2, 2})));
  // N = 1, one value per channel is fine in eval
  bn.eval();
  EXPECT_NO_THROW(bn.forward(random_tensor<float, 4>({1, 3, 1, 1})));
  // found by fuzz_layers: an empty batch in eval with batch statistics divided by zero
  nn::BatchNorm2d<float> no_stats({.num_features = 3, .track_running_stats = false});
  no_stats.eval();
  EXPECT_EQ(no_stats.forward(Tensor<float, 4>(0, 3, 2, 2)).size(), 0);
  EXPECT_THROW(no_stats.forward(Tensor<float, 4>(1, 3, 1, 1)), bnrelu::shape_error);  // as PyTorch

  using O = nn::BatchNormOptions;
  EXPECT_THROW(nn::BatchNorm2d<float>(O{.num_features = 0}), bnrelu::shape_error);
  EXPECT_THROW(nn::BatchNorm2d<float>(O{.num_features = 2, .eps = 0}), bnrelu::shape_error);
  EXPECT_THROW(nn::BatchNorm2d<float>(O{.num_features = 2, .momentum = 1.5}), bnrelu::shape_error);
  EXPECT_THROW(nn::BatchNorm1d<float>(O{.num_features = 2, .momentum = -0.1}), bnrelu::shape_error);
  nn::BatchNorm1d<float> bn1({.num_features = 4});
  EXPECT_THROW(bn1.forward(Tensor<float, 2>(3, 5)), bnrelu::shape_error);
}
