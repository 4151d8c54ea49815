// The checker itself: it passes a correct layer and catches a wrong one.
#include <bnrelu/nn/linear.hpp>
#include <bnrelu/testing/gradcheck.hpp>

#include "golden.hpp"

namespace nn = bnrelu::nn;
using bnrelu::Tensor;
using namespace bnrelu::test;

namespace {

// A Linear whose backward returns dx off by 1 %: gradcheck must notice.
class SkewedLinear : public nn::Linear<double> {
 public:
  using nn::Linear<double>::Linear;
  Tensor<double, 2> backward(const Tensor<double, 2>& dy) {
    Tensor<double, 2> dx = nn::Linear<double>::backward(dy);
    dx = dx * 1.01;
    return dx;
  }
};

// A Linear that forgets to accumulate the bias gradient.
class NoBiasGrad : public nn::Linear<double> {
 public:
  using nn::Linear<double>::Linear;
  Tensor<double, 2> backward(const Tensor<double, 2>& dy) {
    auto dx = nn::Linear<double>::backward(dy);
    for (auto& p : named_parameters())
      if (p.name == "bias") std::fill(p.grad.begin(), p.grad.end(), 0.0);
    return dx;
  }
};

}  // namespace

TEST(Gradcheck, AcceptsCorrectAndRejectsWrongGradients) {
  const auto x = random_tensor<double, 2>({3, 4});
  nn::Linear<double> good({.in_features = 4, .out_features = 2});
  EXPECT_TRUE(bnrelu::testing::gradcheck(good, x).ok);
  SkewedLinear skewed({.in_features = 4, .out_features = 2});
  const auto r = bnrelu::testing::gradcheck(skewed, x);
  EXPECT_FALSE(r.ok);
  EXPECT_NE(r.worst.find("input"), std::string::npos) << r.worst;
  NoBiasGrad nobias({.in_features = 4, .out_features = 2});
  const auto r2 = bnrelu::testing::gradcheck(nobias, x);
  EXPECT_FALSE(r2.ok);
  EXPECT_NE(r2.worst.find("bias"), std::string::npos) << r2.worst;
}
