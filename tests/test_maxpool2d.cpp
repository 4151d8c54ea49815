#include <bnrelu/nn/maxpool2d.hpp>
#include <bnrelu/random.hpp>

#include <cmath>
#include <bnrelu/testing/gradcheck.hpp>

#include "golden.hpp"

namespace nn = bnrelu::nn;
using bnrelu::Tensor;
using namespace bnrelu::test;

template <class T>
class MaxPoolGolden : public ::testing::Test {};
TYPED_TEST_SUITE(MaxPoolGolden, FloatTypes);

TYPED_TEST(MaxPoolGolden, MatchesPyTorchIncludingTiesAndPadding) {
  using T = TypeParam;
  for (const char* name : {"maxpool_2x2", "maxpool_3s2p1_ties", "maxpool_3s1p1_ties", "maxpool_odd_floor",
                           "maxpool_3s3_tiles_ties"}) {
    SCOPED_TRACE(name);
    Fixture f(name);
    const auto& o = f.options;
    nn::MaxPool2d<T> pool({.kernel_size = o["kernel_size"].get<bnrelu::Index>(),
                           .stride = o["stride"].get<bnrelu::Index>(),
                           .padding = o["padding"].get<bnrelu::Index>()});
    EXPECT_TRUE(close_to(pool.forward(f.tensor<T, 4>("x")), f.tensor<double, 4>("y"), 0));
    EXPECT_TRUE(close_to(pool.backward(f.tensor<T, 4>("dy")), f.tensor<double, 4>("dx"), tolerance<T>()));
    pool.eval();  // eval keeps no argmax: its own path through the kernels
    EXPECT_TRUE(close_to(pool.forward(f.tensor<T, 4>("x")), f.tensor<double, 4>("y"), 0));
  }
}

TEST(MaxPool2d, FirstMaximumWinsAndStrideDefaultsToKernel) {
  nn::MaxPool2d<float> pool({.kernel_size = 2});
  EXPECT_EQ(pool.stride(), 2);
  Tensor<float, 4> x(1, 1, 2, 2);
  x.setConstant(3.0f);
  pool.forward(x);
  Tensor<float, 4> dy(1, 1, 1, 1);
  dy.setConstant(1.0f);
  const auto dx = pool.backward(dy);
  EXPECT_EQ(dx(0, 0, 0, 0), 1.0f);
  EXPECT_EQ(dx(0, 0, 0, 1) + dx(0, 0, 1, 0) + dx(0, 0, 1, 1), 0.0f);
}

TEST(MaxPool2d, NaNPropagates) {
  nn::MaxPool2d<float> pool({.kernel_size = 2});
  Tensor<float, 4> x(1, 1, 2, 4);
  x.setValues({{{{1, NAN, 5, 2}, {7, 3, 4, NAN}}}});
  const auto y = pool.forward(x);
  EXPECT_TRUE(std::isnan(y(0, 0, 0, 0)));
  EXPECT_TRUE(std::isnan(y(0, 0, 0, 1)));
}

// The 2x2 path against a plain reference (first maximum in row-major order, a NaN wins, the
// gradient and argmax to it), in float at widths that give the vector path a partial block of
// 8 windows only, full blocks and a partial last one, and in double, with an odd last row and
// column.
template <class T>
class MaxPoolTwoByTwo : public ::testing::Test {};
TYPED_TEST_SUITE(MaxPoolTwoByTwo, FloatTypes);

TYPED_TEST(MaxPoolTwoByTwo, VectorPathMatchesReference) {
  using T = TypeParam;
  using bnrelu::Index;
  for (const Index W : {Index{7}, Index{37}, Index{70}}) {
    SCOPED_TRACE(::testing::Message() << "W " << W);
    const Index N = 2, C = 3, H = 9, HO = 4, WO = W / 2;
    Tensor<T, 4> x(N, C, H, W), dy(N, C, HO, WO);
    bnrelu::manual_seed(5);
    for (Index i = 0; i < x.size(); ++i) {
      const double u = bnrelu::uniform(0, 1);
      x.data()[i] = u < 0.03 ? NAN : std::round(static_cast<T>(bnrelu::uniform(-3, 3)));  // ties
    }
    for (Index i = 0; i < dy.size(); ++i) dy.data()[i] = static_cast<T>(bnrelu::uniform(-1, 1));
    nn::MaxPool2d<T> pool({.kernel_size = 2});
    const auto y = pool.forward(x);
    const auto dx = pool.backward(dy);
    Tensor<T, 4> want_dx(N, C, H, W);
    want_dx.setZero();
    for (Index n = 0; n < N; ++n)
      for (Index c = 0; c < C; ++c)
        for (Index oh = 0; oh < HO; ++oh)
          for (Index ow = 0; ow < WO; ++ow) {
            T best = -INFINITY;
            Index bh = 2 * oh, bw = 2 * ow;
            for (Index h = 2 * oh; h < 2 * oh + 2; ++h)
              for (Index w = 2 * ow; w < 2 * ow + 2; ++w)
                if (x(n, c, h, w) > best || std::isnan(x(n, c, h, w))) {
                  best = x(n, c, h, w);
                  bh = h;
                  bw = w;
                }
            SCOPED_TRACE(::testing::Message() << n << " " << c << " " << oh << " " << ow);
            if (std::isnan(best))
              EXPECT_TRUE(std::isnan(y(n, c, oh, ow)));
            else
              EXPECT_EQ(y(n, c, oh, ow), best);
            EXPECT_EQ(pool.argmax()[static_cast<std::size_t>(((n * C + c) * HO + oh) * WO + ow)], bh * W + bw);
            want_dx(n, c, bh, bw) = dy(n, c, oh, ow);
          }
    for (Index i = 0; i < dx.size(); ++i) ASSERT_EQ(dx.data()[i], want_dx.data()[i]) << "at " << i;
    pool.eval();  // without argmax, the same maxima
    const auto y_eval = pool.forward(x);
    for (Index i = 0; i < y.size(); ++i)
      ASSERT_TRUE(y_eval.data()[i] == y.data()[i] || (std::isnan(y_eval.data()[i]) && std::isnan(y.data()[i])))
          << "at " << i;
  }
}

TEST(MaxPool2d, PaddingIsMinusInfinity) {
  nn::MaxPool2d<float> pool({.kernel_size = 2, .stride = 1, .padding = 1});
  Tensor<float, 4> x(1, 1, 1, 1);
  x.setConstant(-5.0f);
  const auto y = pool.forward(x);
  ASSERT_EQ(y.dimension(2), 2);
  for (bnrelu::Index i = 0; i < y.size(); ++i) EXPECT_EQ(y.data()[i], -5.0f);
}

TEST(MaxPool2d, Gradcheck) {
  nn::MaxPool2d<double> pool({.kernel_size = 3, .stride = 2, .padding = 1});
  const auto r = bnrelu::testing::gradcheck(pool, random_tensor<double, 4>({2, 3, 7, 6}));
  EXPECT_TRUE(r.ok) << r.worst;
}

TEST(MaxPool2d, Errors) {
  EXPECT_THROW(nn::MaxPool2d<float>({.kernel_size = 0}), bnrelu::shape_error);
  EXPECT_THROW(nn::MaxPool2d<float>({.kernel_size = 2, .stride = 0}), bnrelu::shape_error);
  EXPECT_THROW(nn::MaxPool2d<float>({.kernel_size = 2, .padding = 2}), bnrelu::shape_error);
  nn::MaxPool2d<float> pool({.kernel_size = 3});
  EXPECT_THROW(pool.backward(Tensor<float, 4>(1, 1, 1, 1)), std::logic_error);
  try {
    pool.forward(Tensor<float, 4>(1, 1, 2, 5));
    FAIL();
  } catch (const bnrelu::shape_error& e) {
    EXPECT_NE(std::string(e.what()).find("MaxPool2d"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("1 x 1 x 2 x 5"), std::string::npos);
  }
  // found by fuzz_layers: an empty map with padding made windows of padding alone, whose
  // argmax pointed outside the input
  nn::MaxPool2d<float> padded({.kernel_size = 4, .stride = 1, .padding = 2});
  EXPECT_THROW(padded.forward(Tensor<float, 4>(2, 3, 0, 6)), bnrelu::shape_error);
  pool.forward(Tensor<float, 4>(1, 1, 6, 6).setZero());
  EXPECT_THROW(pool.backward(Tensor<float, 4>(1, 1, 3, 2)), bnrelu::shape_error);
  EXPECT_NO_THROW(pool.backward(Tensor<float, 4>(1, 1, 2, 2).setZero()));
}
