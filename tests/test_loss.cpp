#include <bnrelu/nn/loss.hpp>

#include <span>

#include "golden.hpp"

namespace nn = bnrelu::nn;
using bnrelu::Tensor;
using namespace bnrelu::test;

template <class T>
class LossGolden : public ::testing::Test {};
TYPED_TEST_SUITE(LossGolden, FloatTypes);

TYPED_TEST(LossGolden, CrossEntropyMatchesPyTorch) {
  using T = TypeParam;
  Fixture f("cross_entropy");
  nn::CrossEntropyLoss<T> ce;
  const auto labels = f.values<std::int64_t>("labels");
  const T loss = ce.forward(f.tensor<T, 2>("logits"), labels);
  EXPECT_NEAR(loss, f.values<double>("loss")[0], tolerance<T>() * std::abs(f.values<double>("loss")[0]));
  EXPECT_TRUE(close_to(ce.backward(), f.tensor<double, 2>("dlogits"), tolerance<T>()));
  // any contiguous range of integers works as labels
  std::vector<int> ints(labels.begin(), labels.end());
  EXPECT_EQ(ce.forward(f.tensor<T, 2>("logits"), std::span<const int>(ints)), loss);
}

TEST(CrossEntropyLoss, StableForHugeLogits) {
  nn::CrossEntropyLoss<float> ce;
  Tensor<float, 2> z(1, 3);
  z.setValues({{1000.0f, 0.0f, -1000.0f}});
  const std::vector<std::int64_t> label{0};
  EXPECT_NEAR(ce.forward(z, label), 0.0f, 1e-6);
  const std::vector<std::int64_t> other{1};
  EXPECT_NEAR(ce.forward(z, other), 1000.0f, 1e-2);
  const auto d = ce.backward();
  EXPECT_NEAR(d(0, 0), 1.0f, 1e-6);
  EXPECT_NEAR(d(0, 1), -1.0f, 1e-6);
}

TEST(CrossEntropyLoss, Errors) {
  nn::CrossEntropyLoss<float> ce;
  EXPECT_THROW(ce.backward(), std::logic_error);
  Tensor<float, 2> z(2, 3);
  z.setZero();
  EXPECT_THROW(ce.forward(z, std::vector<std::int64_t>{0}), bnrelu::shape_error);
  EXPECT_THROW(ce.forward(z, std::vector<std::int64_t>{0, 3}), bnrelu::shape_error);
  EXPECT_THROW(ce.forward(z, std::vector<std::int64_t>{-1, 0}), bnrelu::shape_error);
}
