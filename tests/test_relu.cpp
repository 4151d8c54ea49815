#include <bnrelu/nn/relu.hpp>
#include <bnrelu/testing/gradcheck.hpp>

#include "golden.hpp"

namespace nn = bnrelu::nn;
using bnrelu::Tensor;
using namespace bnrelu::test;

template <class T>
class ReLUGolden : public ::testing::Test {};
TYPED_TEST_SUITE(ReLUGolden, FloatTypes);

TYPED_TEST(ReLUGolden, MatchesPyTorchIn4dAnd2d) {
  using T = TypeParam;
  nn::ReLU<T> relu;
  Fixture f4("relu_4d");
  EXPECT_TRUE(close_to(relu.forward(f4.tensor<T, 4>("x")), f4.tensor<double, 4>("y"), 0));
  EXPECT_TRUE(close_to(relu.backward(f4.tensor<T, 4>("dy")), f4.tensor<double, 4>("dx"), tolerance<T>()));
  Fixture f2("relu_2d");
  EXPECT_TRUE(close_to(relu.forward(f2.tensor<T, 2>("x")), f2.tensor<double, 2>("y"), 0));
  EXPECT_TRUE(close_to(relu.backward(f2.tensor<T, 2>("dy")), f2.tensor<double, 2>("dx"), tolerance<T>()));
}

TEST(ReLU, Gradcheck) {
  nn::ReLU<double> relu;
  const auto r = bnrelu::testing::gradcheck(relu, random_tensor<double, 4>({2, 3, 4, 5}));
  EXPECT_TRUE(r.ok) << r.worst;
}

TEST(ReLU, NaNPassesAndKinkHasZeroGradient) {
  nn::ReLU<float> relu;
  Tensor<float, 2> x(1, 4);
  x.setValues({{NAN, 0.0f, -1.0f, 2.0f}});
  const auto y = relu.forward(x);
  EXPECT_TRUE(std::isnan(y(0, 0)));
  EXPECT_EQ(y(0, 1), 0.0f);
  EXPECT_EQ(y(0, 2), 0.0f);
  EXPECT_EQ(y(0, 3), 2.0f);
  Tensor<float, 2> dy(1, 4);
  dy.setConstant(1.0f);
  const auto dx = relu.backward(dy);
  EXPECT_EQ(dx(0, 0), 1.0f);  // PyTorch passes the gradient of a NaN output (threshold_backward: !(y <= 0))
  EXPECT_EQ(dx(0, 1), 0.0f);
  EXPECT_EQ(dx(0, 3), 1.0f);
}

TEST(ReLU, Errors) {
  nn::ReLU<float> relu;
  EXPECT_THROW(relu.backward(Tensor<float, 2>(1, 2)), std::logic_error);
  relu.forward(Tensor<float, 2>(2, 3).setZero());
  EXPECT_THROW(relu.backward(Tensor<float, 2>(3, 2)), bnrelu::shape_error);
  EXPECT_THROW(relu.backward(Tensor<float, 4>(2, 3, 1, 1)), bnrelu::shape_error);
  EXPECT_NO_THROW(relu.backward(Tensor<float, 2>(2, 3)));
  relu.eval();
  relu.forward(Tensor<float, 2>(2, 3).setZero());
  EXPECT_THROW(relu.backward(Tensor<float, 2>(2, 3)), std::logic_error);
}
