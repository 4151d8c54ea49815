// AvgPool2d, AdaptiveAvgPool2d, Dropout and Identity: PyTorch parity, gradients, bad input.
#include <bnrelu/nn/avgpool2d.hpp>
#include <bnrelu/nn/dropout.hpp>
#include <bnrelu/nn/identity.hpp>
#include <bnrelu/testing/gradcheck.hpp>

#include "golden.hpp"

namespace nn = bnrelu::nn;
using bnrelu::Index;
using bnrelu::Tensor;
using namespace bnrelu::test;

template <class T>
class AvgPoolGolden : public ::testing::Test {};
TYPED_TEST_SUITE(AvgPoolGolden, FloatTypes);

template <class T, class Layer>
void pool_case(Layer layer, const Fixture& f) {
  const double tol = tolerance<T>();
  const auto y = layer.forward(f.tensor<T, 4>("x"));
  EXPECT_TRUE(close_to(y, f.tensor<double, 4>("y"), tol));
  EXPECT_TRUE(close_to(layer.backward(f.tensor<T, 4>("dy")), f.tensor<double, 4>("dx"), tol));
}

TYPED_TEST(AvgPoolGolden, MatchesPyTorch) {
  using T = TypeParam;
  for (const char* name : {"avgpool_2x2", "avgpool_3s2p1_include", "avgpool_3s2p1_exclude", "avgpool_3s1p1_exclude"}) {
    SCOPED_TRACE(name);
    Fixture f(name);
    const auto& o = f.options;
    pool_case<T>(nn::AvgPool2d<T>({.kernel_size = o["kernel_size"].get<Index>(),
                                   .stride = o["stride"].get<Index>(),
                                   .padding = o["padding"].get<Index>(),
                                   .count_include_pad = o["count_include_pad"].get<bool>()}),
                 f);
  }
  for (const char* name : {"adaptive_avgpool_1x1", "adaptive_avgpool_3x2"}) {
    SCOPED_TRACE(name);
    Fixture f(name);
    pool_case<T>(nn::AdaptiveAvgPool2d<T>({.output_size = f.options["output_height"].get<Index>(),
                                           .output_width = f.options["output_width"].get<Index>()}),
                 f);
  }
}

TEST(AvgPool2d, GradientsMatchFiniteDifferences) {
  bnrelu::manual_seed(1);
  const auto x = random_tensor<double, 4>({2, 2, 7, 6});
  nn::AvgPool2d<double> a({.kernel_size = 3, .stride = 2, .padding = 1, .count_include_pad = false});
  EXPECT_TRUE(bnrelu::testing::gradcheck(a, x).ok);
  nn::AvgPool2d<double> b({.kernel_size = 2, .stride = 1});
  EXPECT_TRUE(bnrelu::testing::gradcheck(b, x).ok);
  nn::AdaptiveAvgPool2d<double> c({.output_size = 4, .output_width = 5});  // overlapping windows
  EXPECT_TRUE(bnrelu::testing::gradcheck(c, x).ok);
}

TEST(AvgPool2d, RejectsBadOptionsAndInput) {
  EXPECT_THROW(nn::AvgPool2d<float>({.kernel_size = 0}), bnrelu::shape_error);
  EXPECT_THROW(nn::AvgPool2d<float>({.kernel_size = 2, .stride = 0}), bnrelu::shape_error);
  EXPECT_THROW(nn::AvgPool2d<float>({.kernel_size = 2, .padding = 2}), bnrelu::shape_error);
  EXPECT_THROW(nn::AdaptiveAvgPool2d<float>({.output_size = 0}), bnrelu::shape_error);
  nn::AvgPool2d<float> p({.kernel_size = 3});
  EXPECT_THROW(p.forward(Tensor<float, 4>(1, 1, 2, 5)), bnrelu::shape_error);
  EXPECT_THROW(p.backward(Tensor<float, 4>(1, 1, 1, 1)), std::logic_error);
  p.forward(Tensor<float, 4>(1, 1, 6, 6).setConstant(1));
  EXPECT_THROW(p.backward(Tensor<float, 4>(1, 1, 2, 3)), bnrelu::shape_error);
  nn::AdaptiveAvgPool2d<float> g;
  EXPECT_THROW(g.forward(Tensor<float, 4>(1, 1, 0, 3)), bnrelu::shape_error);
  // an output larger than the input repeats input values, as PyTorch does
  nn::AdaptiveAvgPool2d<float> up({.output_size = 3});
  Tensor<float, 4> x(1, 1, 2, 2);
  x.setValues({{{{1, 2}, {3, 4}}}});
  const auto y = up.forward(x);
  EXPECT_EQ(y(0, 0, 0, 0), 1);
  EXPECT_EQ(y(0, 0, 1, 1), 2.5f);
  EXPECT_EQ(y(0, 0, 2, 2), 4);
}

TEST(Dropout, ScalesKeptValuesAndIsSeeded) {
  nn::Dropout<float> d({.p = 0.25});
  Tensor<float, 2> x(64, 1000);
  x.setConstant(2);
  bnrelu::manual_seed(42);
  const auto y = d.forward(x);
  Index kept = 0;
  for (Index i = 0; i < y.size(); ++i) {
    ASSERT_TRUE(y.data()[i] == 0 || y.data()[i] == 2 / 0.75f) << y.data()[i];
    kept += y.data()[i] != 0;
  }
  // 64000 draws with p = 0.25: the kept fraction is 0.75 within 5 standard deviations
  EXPECT_NEAR(static_cast<double>(kept) / static_cast<double>(y.size()), 0.75, 5 * std::sqrt(0.1875 / 64000));
  Tensor<float, 2> dy(64, 1000);
  dy.setConstant(1);
  const auto dx = d.backward(dy);
  for (Index i = 0; i < dx.size(); ++i) ASSERT_EQ(dx.data()[i], y.data()[i] == 0 ? 0.f : 1 / 0.75f);
  bnrelu::manual_seed(42);
  nn::Dropout<float> again({.p = 0.25});
  const auto y2 = again.forward(x);
  EXPECT_EQ(std::memcmp(y.data(), y2.data(), y.size() * sizeof(float)), 0);  // same seed, same mask
  const auto y3 = again.forward(x);
  EXPECT_NE(std::memcmp(y.data(), y3.data(), y.size() * sizeof(float)), 0);  // the next call draws anew
}

TEST(Dropout, EvalIsIdentityAndEdgeProbabilities) {
  nn::Dropout<double> d({.p = 0.5});
  d.eval();
  bnrelu::manual_seed(1);
  const auto x = random_tensor<double, 4>({2, 3, 4, 5});
  const auto y = d.forward(x);
  EXPECT_EQ(std::memcmp(x.data(), y.data(), x.size() * sizeof(double)), 0);
  EXPECT_THROW(d.backward(x), std::logic_error);  // eval keeps nothing for backward
  nn::Dropout<double> none({.p = 0});
  const auto y0 = none.forward(x);
  EXPECT_EQ(std::memcmp(x.data(), y0.data(), x.size() * sizeof(double)), 0);
  nn::Dropout<double> all({.p = 1});
  const auto y1 = all.forward(x);
  for (Index i = 0; i < y1.size(); ++i) ASSERT_EQ(y1.data()[i], 0.0);
  EXPECT_THROW(nn::Dropout<float>({.p = -0.1}), bnrelu::shape_error);
  EXPECT_THROW(nn::Dropout<float>({.p = 1.5}), bnrelu::shape_error);
  EXPECT_THROW(nn::Dropout<float>({.p = std::nan("")}), bnrelu::shape_error);
  nn::Dropout<double> d2;
  d2.forward(x);
  EXPECT_THROW(d2.backward(Tensor<double, 4>(2, 3, 4, 4)), bnrelu::shape_error);
}

TEST(Identity, PassesValuesAndGradients) {
  nn::Identity<float> id;
  bnrelu::manual_seed(2);
  const auto x = random_tensor<float, 2>({3, 4});
  EXPECT_THROW(id.backward(x), std::logic_error);
  const auto y = id.forward(x);
  EXPECT_EQ(std::memcmp(x.data(), y.data(), x.size() * sizeof(float)), 0);
  const auto dx = id.backward(y);
  EXPECT_EQ(std::memcmp(x.data(), dx.data(), x.size() * sizeof(float)), 0);
  EXPECT_THROW(id.backward(Tensor<float, 2>(3, 5)), bnrelu::shape_error);
  EXPECT_TRUE(id.named_parameters().empty());
}
