#include <bnrelu/nn/flatten.hpp>
#include <bnrelu/testing/gradcheck.hpp>

#include "golden.hpp"

namespace nn = bnrelu::nn;
using bnrelu::Tensor;
using namespace bnrelu::test;

TEST(Flatten, KeepsRowMajorOrderBothWays) {
  nn::Flatten<float> flat;
  const auto x = random_tensor<float, 4>({2, 3, 4, 5});
  const auto y = flat.forward(x);
  ASSERT_EQ(y.dimension(0), 2);
  ASSERT_EQ(y.dimension(1), 60);
  EXPECT_EQ(y(1, 2 * 20 + 3 * 5 + 4), x(1, 2, 3, 4));
  const auto dx = flat.backward(y);
  EXPECT_TRUE(close_to(dx, x, 0));
}

TEST(Flatten, GradcheckAndErrors) {
  nn::Flatten<double> flat;
  const auto r = bnrelu::testing::gradcheck(flat, random_tensor<double, 4>({2, 2, 3, 1}));
  EXPECT_TRUE(r.ok) << r.worst;
  nn::Flatten<float> f;
  EXPECT_THROW(f.backward(Tensor<float, 2>(1, 1)), std::logic_error);
  f.forward(Tensor<float, 4>(2, 1, 2, 2).setZero());
  EXPECT_THROW(f.backward(Tensor<float, 2>(2, 5)), bnrelu::shape_error);
}
