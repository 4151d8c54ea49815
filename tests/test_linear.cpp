#include <bnrelu/nn/linear.hpp>
#include <bnrelu/testing/gradcheck.hpp>

#include "golden.hpp"

namespace nn = bnrelu::nn;
using bnrelu::Tensor;
using namespace bnrelu::test;

template <class T>
class LinearGolden : public ::testing::Test {};
TYPED_TEST_SUITE(LinearGolden, FloatTypes);

TYPED_TEST(LinearGolden, MatchesPyTorch) {
  using T = TypeParam;
  for (const char* name : {"linear_basic", "linear_nobias_n1"}) {
    SCOPED_TRACE(name);
    Fixture f(name);
    const auto& o = f.options;
    nn::Linear<T> fc({.in_features = o["in_features"].get<bnrelu::Index>(),
                      .out_features = o["out_features"].get<bnrelu::Index>(), .bias = o["bias"].get<bool>()});
    assign(fc.named_parameters(), "weight", f.values<T>("weight"));
    if (o["bias"]) assign(fc.named_parameters(), "bias", f.values<T>("bias"));
    EXPECT_TRUE(close_to(fc.forward(f.tensor<T, 2>("x")), f.tensor<double, 2>("y"), tolerance<T>()));
    EXPECT_TRUE(close_to(fc.backward(f.tensor<T, 2>("dy")), f.tensor<double, 2>("dx"), tolerance<T>()));
    EXPECT_TRUE(close_to(fc.weight_grad(), f.tensor<double, 2>("dweight"), tolerance<T>()));
    if (o["bias"]) {
        EXPECT_TRUE(close_to(fc.bias_grad(), f.tensor<double, 1>("dbias"), tolerance<T>()));
    }
  }
}

TEST(Linear, Gradcheck) {
  for (bool bias : {true, false}) {
    bnrelu::manual_seed(5);
    nn::Linear<double> fc({.in_features = 7, .out_features = 3, .bias = bias});
    const auto r = bnrelu::testing::gradcheck(fc, random_tensor<double, 2>({4, 7}));
    EXPECT_TRUE(r.ok) << r.worst;
  }
}

TEST(Linear, InitBoundsNamesAndZeroGrad) {
  nn::Linear<float> fc({.in_features = 16, .out_features = 4});
  auto p = fc.named_parameters();
  ASSERT_EQ(p.size(), 2u);
  EXPECT_EQ(p[0].name, "weight");
  EXPECT_EQ(p[0].shape, (std::vector<bnrelu::Index>{4, 16}));
  for (auto& e : p)
    for (float v : e.value) EXPECT_LE(std::abs(v), 0.25f);
  fc.forward(random_tensor<float, 2>({3, 16}));
  fc.backward(random_tensor<float, 2>({3, 4}));
  fc.zero_grad();
  for (auto& e : fc.named_parameters())
    for (float g : e.grad) EXPECT_EQ(g, 0.0f);
}

TEST(Linear, ErrorsLeaveStateUnchanged) {
  nn::Linear<float> fc({.in_features = 5, .out_features = 2});
  EXPECT_THROW(fc.backward(Tensor<float, 2>(1, 2)), std::logic_error);
  fc.forward(random_tensor<float, 2>({3, 5}));
  const auto before = state_of(fc);
  try {
    fc.forward(Tensor<float, 2>(3, 6));
    FAIL();
  } catch (const bnrelu::shape_error& e) {
    EXPECT_NE(std::string(e.what()).find("Linear"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("3 x 6"), std::string::npos);
  }
  EXPECT_THROW(fc.backward(Tensor<float, 2>(3, 3)), bnrelu::shape_error);
  EXPECT_EQ(state_of(fc), before);
  EXPECT_THROW(nn::Linear<float>({.in_features = 0, .out_features = 2}), bnrelu::shape_error);
}

TEST(Linear, EmptyBatch) {
  // found by fuzz_layers: N = 0 gave Eigen null pointers to offset (undefined behaviour)
  nn::Linear<float> fc({.in_features = 3, .out_features = 2});
  EXPECT_EQ(fc.forward(Tensor<float, 2>(0, 3)).dimension(0), 0);
  EXPECT_EQ(fc.backward(Tensor<float, 2>(0, 2)).dimension(0), 0);
  for (auto& p : fc.named_parameters())
    for (float g : p.grad) EXPECT_EQ(g, 0.0f);
}

// Batches of up to kernels::detail::kRowBatch rows take matrix-vector products over blocks of the
// weight; larger ones a GEMM. Both agree with a double-precision reference, and give the same
// bits on 1, 2 and 3 threads.
TEST(Linear, SmallAndLargeBatchesMatchReferenceForAnyThreadCount) {
  const bnrelu::Index I = 300, O = 70;  // several weight blocks, the last one partial
  const int saved = bnrelu::num_threads();
  const bnrelu::Index rows = bnrelu::kernels::detail::kRowBatch;
  for (bnrelu::Index N : {bnrelu::Index{1}, bnrelu::Index{3}, rows, rows + 1, bnrelu::Index{20}}) {
    SCOPED_TRACE(N);
    bnrelu::manual_seed(9);
    nn::Linear<float> fc({.in_features = I, .out_features = O});
    const auto x = random_tensor<float, 2>({N, I});
    const auto dy = random_tensor<float, 2>({N, O});
    const Tensor<float, 2> w = fc.weight();
    const Tensor<float, 1> b = fc.bias();
    Tensor<double, 2> y_ref(N, O), dx_ref(N, I), dw_ref(O, I);
    y_ref.setZero();
    dx_ref.setZero();
    dw_ref.setZero();
    for (bnrelu::Index n = 0; n < N; ++n)
      for (bnrelu::Index o = 0; o < O; ++o) {
        double acc = b(o);
        for (bnrelu::Index i = 0; i < I; ++i) {
          acc += double(x(n, i)) * w(o, i);
          dx_ref(n, i) += double(dy(n, o)) * w(o, i);
          dw_ref(o, i) += double(dy(n, o)) * x(n, i);
        }
        y_ref(n, o) = acc;
      }
    std::vector<Tensor<float, 2>> ys, dxs, dws;
    for (int threads : {1, 2, 3}) {
      bnrelu::set_num_threads(threads);
      fc.zero_grad();
      ys.push_back(fc.forward(x));
      dxs.push_back(fc.backward(dy));
      dws.push_back(fc.weight_grad());
    }
    bnrelu::set_num_threads(saved);
    EXPECT_TRUE(close_to(ys[0], y_ref, 1e-5));
    EXPECT_TRUE(close_to(dxs[0], dx_ref, 1e-5));
    EXPECT_TRUE(close_to(dws[0], dw_ref, 1e-5));
    for (std::size_t t = 1; t < ys.size(); ++t) {
      EXPECT_TRUE(close_to(ys[t], ys[0], 0)) << t + 1 << " threads";
      EXPECT_TRUE(close_to(dxs[t], dxs[0], 0)) << t + 1 << " threads";
      EXPECT_TRUE(close_to(dws[t], dws[0], 0)) << t + 1 << " threads";
    }
  }
}
