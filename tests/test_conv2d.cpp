#include <bnrelu/nn/conv2d.hpp>
#include <bnrelu/models/seed_cnn.hpp>
#include <bnrelu/nn/linear.hpp>
#include <bnrelu/nn/maxpool2d.hpp>
#include <bnrelu/testing/gradcheck.hpp>

#include "golden.hpp"

namespace nn = bnrelu::nn;
using bnrelu::Tensor;
using namespace bnrelu::test;

template <class T>
class Conv2dGolden : public ::testing::Test {};
TYPED_TEST_SUITE(Conv2dGolden, FloatTypes);

TYPED_TEST(Conv2dGolden, MatchesPyTorch) {
  using T = TypeParam;
  // conv_basic is 3x3 at stride 1: Winograd when asked for (automatic keeps im2col for 3 channels)
  for (auto algorithm : {nn::ConvAlgorithm::automatic, nn::ConvAlgorithm::winograd})
  for (const char* name : {"conv_basic", "conv_stride2_c1", "conv_stride3_pad2_dil2", "conv_1x1"}) {
    SCOPED_TRACE(name);
    SCOPED_TRACE(static_cast<int>(algorithm));
    Fixture f(name);
    const auto& o = f.options;
    nn::Conv2d<T> conv({.in_channels = o["in_channels"], .out_channels = o["out_channels"],
                        .kernel_size = o["kernel_size"], .stride = o["stride"],
                        .padding = o["padding"], .dilation = o["dilation"], .bias = o["bias"]});
    conv.set_algorithm(algorithm);
    assign(conv.named_parameters(), "weight", f.values<T>("weight"));
    if (o["bias"]) assign(conv.named_parameters(), "bias", f.values<T>("bias"));
    const auto y = conv.forward(f.tensor<T, 4>("x"));
    EXPECT_TRUE(close_to(y, f.tensor<double, 4>("y"), tolerance<T>()));
    const auto dx = conv.backward(f.tensor<T, 4>("dy"));
    EXPECT_TRUE(close_to(dx, f.tensor<double, 4>("dx"), tolerance<T>()));
    EXPECT_TRUE(close_to(conv.weight_grad(), f.tensor<double, 4>("dweight"), tolerance<T>()));
    if (o["bias"]) {
        EXPECT_TRUE(close_to(conv.bias_grad(), f.tensor<double, 1>("dbias"), tolerance<T>()));
    }
    // gradients accumulate: a second backward doubles them
    conv.backward(f.tensor<T, 4>("dy"));
    EXPECT_TRUE(close_to(conv.weight_grad(), Tensor<double, 4>(f.tensor<double, 4>("dweight") * 2.0), tolerance<T>()));
  }
}

TEST(Conv2d, GradcheckAwkwardShapes) {
  struct Case { bnrelu::Index N, C, O, H, W, k, s, p, d; bool bias; };
  for (auto c : {Case{2, 3, 2, 7, 5, 3, 1, 1, 1, true}, Case{1, 1, 3, 8, 6, 3, 2, 0, 1, true},
                 Case{2, 2, 2, 9, 7, 2, 3, 2, 1, false}, Case{1, 3, 2, 9, 10, 3, 1, 2, 2, true},
                 Case{3, 1, 1, 5, 4, 1, 1, 0, 1, true}}) {
    SCOPED_TRACE(c.H * 1000 + c.W);
    bnrelu::manual_seed(7);
    nn::Conv2d<double> conv({.in_channels = c.C, .out_channels = c.O, .kernel_size = c.k,
                             .stride = c.s, .padding = c.p, .dilation = c.d, .bias = c.bias});
    const auto x = random_tensor<double, 4>({c.N, c.C, c.H, c.W});
    const auto r = bnrelu::testing::gradcheck(conv, x);
    EXPECT_TRUE(r.ok) << r.worst;
    EXPECT_GT(r.checked, 10);
  }
}

TEST(Conv2d, WinogradGradcheck) {
  // every padding Winograd takes, odd and tiny planes (partial 2x2 tiles, tiles all padding)
  struct Case { bnrelu::Index N, C, O, H, W, p; };
  for (auto c : {Case{2, 3, 2, 7, 5, 1}, Case{1, 2, 3, 4, 6, 0}, Case{2, 2, 2, 3, 3, 0},
                 Case{1, 3, 2, 5, 4, 2}, Case{2, 2, 3, 1, 1, 1}, Case{1, 2, 2, 1, 2, 2}}) {
    SCOPED_TRACE(c.H * 1000 + c.W * 10 + c.p);
    bnrelu::manual_seed(11);
    nn::Conv2d<double> conv({.in_channels = c.C, .out_channels = c.O, .kernel_size = 3, .padding = c.p});
    conv.set_algorithm(nn::ConvAlgorithm::winograd);
    const auto x = random_tensor<double, 4>({c.N, c.C, c.H, c.W});
    const auto r = bnrelu::testing::gradcheck(conv, x);
    EXPECT_TRUE(r.ok) << r.worst;
    EXPECT_GT(r.checked, 10);
  }
}

// Winograd against im2col on the same layer, forward and all gradients, over the seed CNN's
// conv2 and smaller shapes: to double rounding in double, to float rounding in float.
template <class T>
void expect_winograd_matches_im2col(bnrelu::Index N, bnrelu::Index C, bnrelu::Index O, bnrelu::Index H,
                                    bnrelu::Index W, bnrelu::Index p, double tol) {
  SCOPED_TRACE(::testing::Message() << N << "x" << C << "x" << H << "x" << W << " -> " << O << ", pad " << p);
  bnrelu::manual_seed(5);
  nn::Conv2d<T> a({.in_channels = C, .out_channels = O, .kernel_size = 3, .padding = p});
  nn::Conv2d<T> b = a;
  a.set_algorithm(nn::ConvAlgorithm::im2col);
  b.set_algorithm(nn::ConvAlgorithm::winograd);
  const auto x = random_tensor<T, 4>({N, C, H, W});
  const auto ya = a.forward(x), yb = b.forward(x);
  EXPECT_TRUE(close_to(yb, ya, tol));
  const auto dy = random_tensor<T, 4>(bnrelu::dims_of(ya));
  const auto dxa = a.backward(dy), dxb = b.backward(dy);
  EXPECT_TRUE(close_to(dxb, dxa, tol));
  EXPECT_TRUE(close_to(b.weight_grad(), a.weight_grad(), tol));
  EXPECT_TRUE(close_to(b.bias_grad(), a.bias_grad(), 0));  // the same sums in both
  // parameter gradients alone (a first layer's backward_params) give the same
  b.zero_grad();
  b.backward_params(Tensor<T, 4>(dy));
  EXPECT_TRUE(close_to(b.weight_grad(), a.weight_grad(), tol));
  // the folded ReLU epilogue (fuse_for_inference) in Winograd's output transform
  const std::vector<double> ones(static_cast<std::size_t>(O), 1.0), zeros(static_cast<std::size_t>(O), 0.0);
  a.eval();
  b.eval();
  a.fold_affine(ones, zeros, true);
  b.fold_affine(ones, zeros, true);
  const auto ra = a.forward(x), rb = b.forward(x);
  EXPECT_TRUE(close_to(rb, ra, tol));
  bnrelu::Index zeroed = 0;
  for (bnrelu::Index i = 0; i < rb.size(); ++i) {
    EXPECT_GE(rb.data()[i], T(0));
    zeroed += rb.data()[i] == T(0) && ya.data()[i] < T(0);
  }
  EXPECT_GT(zeroed, rb.size() / 4);  // about half the outputs were negative
}

// A smaller OpenMP team than asked for (here: layers run inside another parallel region, whose
// nested regions get one thread) must not read the per-thread sums of threads that never ran.
TEST(Conv2d, WinogradGradientsInsideAnotherParallelRegion) {
  bnrelu::manual_seed(9);
  nn::Conv2d<float> ref({.in_channels = 8, .out_channels = 8, .kernel_size = 3, .padding = 1});
  ref.set_algorithm(nn::ConvAlgorithm::winograd);
  const auto x = random_tensor<float, 4>({4, 8, 6, 6});
  const auto dy = random_tensor<float, 4>({4, 8, 6, 6});
  std::vector<nn::Conv2d<float>> copies(2, ref);
  ref.forward(x);
  ref.backward(dy);
  const int saved = bnrelu::num_threads();
  bnrelu::set_num_threads(2);
#pragma omp parallel for num_threads(2)
  for (int i = 0; i < 2; ++i) {
    copies[static_cast<std::size_t>(i)].forward(x);  // leaves its transforms in the workspace
    copies[static_cast<std::size_t>(i)].backward(dy);
  }
  bnrelu::set_num_threads(saved);
  for (auto& c : copies) {
    EXPECT_TRUE(close_to(c.weight_grad(), ref.weight_grad(), 1e-5));
    EXPECT_TRUE(close_to(c.bias_grad(), ref.bias_grad(), 1e-5));
  }
}

TEST(Conv2d, WinogradMatchesIm2col) {
  expect_winograd_matches_im2col<double>(3, 64, 128, 14, 14, 1, 1e-13);
  expect_winograd_matches_im2col<float>(3, 64, 128, 14, 14, 1, 2e-6);
  expect_winograd_matches_im2col<float>(2, 16, 24, 28, 28, 1, 2e-6);
  expect_winograd_matches_im2col<float>(2, 5, 7, 9, 11, 0, 2e-6);
  expect_winograd_matches_im2col<float>(2, 5, 7, 3, 8, 2, 2e-6);
  // rows of several of split_rows' blocks (2 packets of columns each) and a partial last block,
  // for each padding: the input transform's pads 0 to 2 and the gradient transform's rows of dy
  for (bnrelu::Index p : {0, 1, 2}) {
    expect_winograd_matches_im2col<float>(2, 3, 4, 5, 33, p, 2e-6);
    expect_winograd_matches_im2col<float>(1, 2, 3, 4, 64, p, 2e-6);
    expect_winograd_matches_im2col<double>(2, 3, 4, 5, 17, p, 1e-13);
  }
}

TEST(Conv2d, AutomaticAlgorithmByShape) {
  using bnrelu::kernels::use_winograd;
  using A = nn::ConvAlgorithm;
  auto geometry = [](bnrelu::Index C, bnrelu::Index O, bnrelu::Index k, bnrelu::Index s, bnrelu::Index p,
                     bnrelu::Index d) {
    const bnrelu::Index HO = (14 + 2 * p - d * (k - 1) - 1) / s + 1;
    return bnrelu::kernels::Conv2dGeometry{8, C, 14, 14, O, k, k, s, p, d, HO, HO};
  };
  EXPECT_TRUE(use_winograd(geometry(64, 128, 3, 1, 1, 1), A::automatic));   // seed CNN conv2
  EXPECT_FALSE(use_winograd(geometry(1, 64, 3, 1, 1, 1), A::automatic));    // seed CNN conv1
  EXPECT_TRUE(use_winograd(geometry(8, 8, 3, 1, 0, 1), A::automatic));
  EXPECT_FALSE(use_winograd(geometry(4, 64, 3, 1, 1, 1), A::automatic));
  EXPECT_TRUE(use_winograd(geometry(1, 64, 3, 1, 1, 1), A::winograd));
  EXPECT_FALSE(use_winograd(geometry(64, 128, 3, 1, 1, 1), A::im2col));
  EXPECT_FALSE(use_winograd(geometry(64, 128, 3, 2, 1, 1), A::winograd));   // stride 2
  EXPECT_FALSE(use_winograd(geometry(64, 128, 3, 1, 2, 2), A::winograd));   // dilation 2
  EXPECT_FALSE(use_winograd(geometry(64, 128, 5, 1, 2, 1), A::winograd));   // 5x5
  EXPECT_FALSE(use_winograd(geometry(64, 128, 3, 1, 3, 1), A::winograd));   // padding 3
}

TEST(Conv2d, DefaultInitIsKaimingUniform) {
  bnrelu::manual_seed(1);
  nn::Conv2d<float> conv({.in_channels = 4, .out_channels = 8, .kernel_size = 3});
  const double bound = 1.0 / std::sqrt(4.0 * 9.0);
  double lo = 1, hi = -1;
  for (auto& p : conv.named_parameters())
    for (float v : p.value) {
      lo = std::min<double>(lo, v);
      hi = std::max<double>(hi, v);
    }
  EXPECT_GE(lo, -bound);
  EXPECT_LE(hi, bound);
  EXPECT_LT(lo, -0.8 * bound);  // spread over the whole interval
  EXPECT_GT(hi, 0.8 * bound);
  bnrelu::manual_seed(1);
  nn::Conv2d<float> again({.in_channels = 4, .out_channels = 8, .kernel_size = 3});
  EXPECT_TRUE(close_to(again.weight(), conv.weight(), 0));
}

TEST(Conv2d, NamesAndShapes) {
  nn::Conv2d<float> conv({.in_channels = 3, .out_channels = 5, .kernel_size = 2});
  auto p = conv.named_parameters();
  ASSERT_EQ(p.size(), 2u);
  EXPECT_EQ(p[0].name, "weight");
  EXPECT_EQ(p[0].shape, (std::vector<bnrelu::Index>{5, 3, 2, 2}));
  EXPECT_EQ(p[1].name, "bias");
  EXPECT_EQ(p[1].shape, (std::vector<bnrelu::Index>{5}));
  nn::Conv2d<float> nobias({.in_channels = 3, .out_channels = 5, .kernel_size = 2, .bias = false});
  EXPECT_EQ(nobias.named_parameters().size(), 1u);
}

TEST(Conv2d, ErrorsLeaveStateUnchanged) {
  nn::Conv2d<float> conv({.in_channels = 3, .out_channels = 2, .kernel_size = 3, .padding = 1});
  EXPECT_THROW(conv.backward(Tensor<float, 4>(1, 2, 4, 4)), std::logic_error);
  const auto x = random_tensor<float, 4>({2, 3, 4, 4});
  conv.forward(x);
  conv.backward(random_tensor<float, 4>({2, 2, 4, 4}));
  const auto before = state_of(conv);
  try {
    conv.forward(Tensor<float, 4>(2, 4, 4, 4));
    FAIL() << "no throw";
  } catch (const bnrelu::shape_error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("Conv2d"), std::string::npos) << msg;
    EXPECT_NE(msg.find("2 x 4 x 4 x 4"), std::string::npos) << msg;
    EXPECT_NE(msg.find("N x 3"), std::string::npos) << msg;
  }
  EXPECT_THROW(conv.backward(Tensor<float, 4>(2, 2, 4, 5)), bnrelu::shape_error);
  EXPECT_EQ(state_of(conv), before);
  // the cache of the good forward survived the bad calls
  EXPECT_NO_THROW(conv.backward(random_tensor<float, 4>({2, 2, 4, 4})));

  nn::Conv2d<float> big({.in_channels = 1, .out_channels = 1, .kernel_size = 5});
  EXPECT_THROW(big.forward(Tensor<float, 4>(1, 1, 4, 8)), bnrelu::shape_error);
  nn::Conv2d<float> padded({.in_channels = 1, .out_channels = 1, .kernel_size = 3, .padding = 2});
  EXPECT_THROW(padded.forward(Tensor<float, 4>(1, 1, 0, 5)), bnrelu::shape_error);
  using O = nn::Conv2dOptions;
  EXPECT_THROW(nn::Conv2d<float>(O{.in_channels = 1, .out_channels = 1, .kernel_size = 3, .stride = 0}), bnrelu::shape_error);
  EXPECT_THROW(nn::Conv2d<float>(O{.in_channels = 0, .out_channels = 1, .kernel_size = 3}), bnrelu::shape_error);
  EXPECT_THROW(nn::Conv2d<float>(O{.in_channels = 1, .out_channels = 1, .kernel_size = 0}), bnrelu::shape_error);
  EXPECT_THROW(nn::Conv2d<float>(O{.in_channels = 1, .out_channels = 1, .kernel_size = 3, .padding = -1}), bnrelu::shape_error);
  EXPECT_THROW(nn::Conv2d<float>(O{.in_channels = 1, .out_channels = 1, .kernel_size = 3, .dilation = 0}), bnrelu::shape_error);
}

TEST(Conv2d, EvalCachesNothing) {
  nn::Conv2d<float> conv({.in_channels = 1, .out_channels = 2, .kernel_size = 3});
  const auto x = random_tensor<float, 4>({1, 1, 5, 5});
  conv.forward(x);
  conv.eval();
  EXPECT_FALSE(conv.is_training());
  const auto y = conv.forward(x);
  EXPECT_THROW(conv.backward(y), std::logic_error);
  conv.train();
  EXPECT_TRUE(conv.is_training());
}

TEST(Conv2d, SameResultForAnyThreadCount) {
  for (auto algorithm : {nn::ConvAlgorithm::im2col, nn::ConvAlgorithm::winograd}) {
  SCOPED_TRACE(static_cast<int>(algorithm));
  bnrelu::manual_seed(3);
  nn::Conv2d<float> a({.in_channels = 3, .out_channels = 4, .kernel_size = 3, .padding = 1});
  a.set_algorithm(algorithm);
  const auto x = random_tensor<float, 4>({5, 3, 6, 6});
  const auto dy = random_tensor<float, 4>({5, 4, 6, 6});
  const int saved = bnrelu::num_threads();
  bnrelu::set_num_threads(1);
  const auto y1 = a.forward(x);
  const auto dx1 = a.backward(dy);
  const Tensor<float, 4> dw1 = a.weight_grad();
  a.zero_grad();
  bnrelu::set_num_threads(2);
  const auto y2 = a.forward(x);
  const auto dx2 = a.backward(dy);
  bnrelu::set_num_threads(saved);
  EXPECT_TRUE(close_to(y2, y1, 0));
  EXPECT_TRUE(close_to(dx2, dx1, 0));
  EXPECT_TRUE(close_to(a.weight_grad(), dw1, 1e-6));  // summed in another order
  }
}

// Sizes whose arithmetic would overflow are shape_errors, in options and in input shapes.
TEST(Conv2d, ExtremeSizesAreShapeErrors) {
  using bnrelu::Index;
  const Index big = Index{1} << 32;
  EXPECT_THROW(nn::Conv2d<float>({.in_channels = 1, .out_channels = 1, .kernel_size = big}), bnrelu::shape_error);
  EXPECT_THROW(nn::Conv2d<float>({.in_channels = 1, .out_channels = 1, .kernel_size = 3, .dilation = big}),
               bnrelu::shape_error);
  EXPECT_THROW(nn::Conv2d<float>({.in_channels = 1, .out_channels = 1, .kernel_size = 3, .padding = big}),
               bnrelu::shape_error);
  EXPECT_THROW(nn::Conv2d<float>({.in_channels = 1 << 30, .out_channels = 1 << 30, .kernel_size = 3}),
               bnrelu::shape_error);  // a weight of 2^63 elements
  EXPECT_THROW(nn::Linear<float>({.in_features = big, .out_features = 1}), bnrelu::shape_error);
  EXPECT_THROW(nn::MaxPool2d<float>({.kernel_size = 2, .padding = Index{1} << 62}), bnrelu::shape_error);
  nn::Conv2d<float> conv({.in_channels = 1, .out_channels = 64, .kernel_size = 3, .padding = 1});
  EXPECT_THROW(conv.output_dims({Index{1} << 62, 1, 28, 28}), bnrelu::shape_error);
  EXPECT_THROW(conv.output_dims({Index{1} << 40, 1, 28, 28}), bnrelu::shape_error);  // output past 2^48
  nn::Linear<float> fc({.in_features = 4, .out_features = 1 << 20});
  EXPECT_THROW(fc.output_dims({Index{1} << 30, 4}), bnrelu::shape_error);
  auto model = bnrelu::models::seed_cnn<float>(1, 10);
  EXPECT_THROW(model.output_dims({Index{1} << 62, 1, 28, 28}), bnrelu::shape_error);
}

// A batch smaller than the thread count runs each image's forward on the whole team (input
// channels, Winograd's 16 products, then output channels shared out); a larger one gives each
// thread whole images. Both give the bits of one thread, with bias and folded ReLU, and agree
// with a direct convolution in double precision.
TEST(Conv2d, ForwardSharedWithinAnImageMatchesOneThread) {
  namespace k = bnrelu::kernels;
  const int saved = bnrelu::num_threads();
  // 20 output channels: blocks of 8 rows and a partial one; odd sizes: partial tiles; 3 x 4:
  // fewer tiles in a channel than a vector holds
  for (auto [H, W] : {std::pair<bnrelu::Index, bnrelu::Index>{9, 7}, {3, 4}})
  for (auto algorithm : {k::ConvAlgorithm::im2col, k::ConvAlgorithm::winograd})
    for (bnrelu::Index N : {1, 2, 3}) {
      SCOPED_TRACE(static_cast<int>(algorithm));
      SCOPED_TRACE(N);
      SCOPED_TRACE(H);
      const k::Conv2dGeometry g{.N = N, .C = 9, .H = H, .W = W, .O = 20, .KH = 3, .KW = 3, .stride = 1,
                                .pad = 1, .dil = 1, .HO = H, .WO = W};
      bnrelu::manual_seed(4);
      const auto x = random_tensor<float, 4>({N, g.C, g.H, g.W});
      const auto w = random_tensor<float, 2>({g.O, g.col_rows()});
      const auto b = random_tensor<float, 1>({g.O});
      std::vector<Tensor<float, 4>> ys;
      for (int threads : {1, 2, 3}) {
        bnrelu::set_num_threads(threads);
        std::vector<float> workspace(static_cast<std::size_t>(k::conv2d_forward_workspace<float>(g, algorithm)));
        Tensor<float, 4> y(N, g.O, g.HO, g.WO);
        k::conv2d_forward(y.data(), workspace.data(), x.data(), w.data(), b.data(), g, /*relu=*/true, algorithm);
        ys.push_back(y);
      }
      bnrelu::set_num_threads(saved);
      Tensor<double, 4> ref(N, g.O, g.HO, g.WO);
      for (bnrelu::Index n = 0; n < N; ++n)
        for (bnrelu::Index o = 0; o < g.O; ++o)
          for (bnrelu::Index oh = 0; oh < g.HO; ++oh)
            for (bnrelu::Index ow = 0; ow < g.WO; ++ow) {
              double acc = b(o);
              for (bnrelu::Index c = 0; c < g.C; ++c)
                for (bnrelu::Index kh = 0; kh < 3; ++kh)
                  for (bnrelu::Index kw = 0; kw < 3; ++kw) {
                    const bnrelu::Index ih = oh - 1 + kh, iw = ow - 1 + kw;
                    if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W)
                      acc += double(x(n, c, ih, iw)) * w(o, (c * 3 + kh) * 3 + kw);
                  }
              ref(n, o, oh, ow) = std::max(acc, 0.0);
            }
      EXPECT_TRUE(close_to(ys[0], ref, 1e-5));
      EXPECT_TRUE(close_to(ys[1], ys[0], 0)) << "2 threads";
      EXPECT_TRUE(close_to(ys[2], ys[0], 0)) << "3 threads";
    }
}
