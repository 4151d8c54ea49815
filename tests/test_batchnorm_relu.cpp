// The fused layers against the unfused pair: outputs, dx, dgamma, dbeta and running
// statistics over many shapes, including degenerate channels and values at the kink.
#include <bnrelu/kernels/batchnorm.hpp>
#include <bnrelu/nn/batchnorm.hpp>
#include <bnrelu/nn/batchnorm_relu.hpp>
#include <bnrelu/nn/relu.hpp>
#include <bnrelu/testing/gradcheck.hpp>

#include <cmath>
#include <limits>

#include "golden.hpp"

namespace nn = bnrelu::nn;
using bnrelu::Index;
using bnrelu::Tensor;
using namespace bnrelu::test;

namespace {

enum class Data { random, all_negative, all_positive, at_kink, constant };

template <class T, int Rank>
Tensor<T, Rank> make_input(const bnrelu::Dims<Rank>& d, Data kind) {
  auto x = random_tensor<T, Rank>(d, -2, 3);
  if (kind == Data::constant) x.setConstant(T(0.75));
  if (kind == Data::at_kink)  // a few values repeated, so x == mean happens exactly
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = T((i % 3) - 1);
  return x;
}

// gamma/beta chosen so that after normalisation whole channels are negative or positive,
// or so that gamma is negative or zero.
template <class L>
void set_affine(L& layer, Data kind, Index C) {
  auto p = layer.named_parameters();
  if (p.empty()) return;
  for (Index c = 0; c < C; ++c) {
    double g = bnrelu::uniform(-1.5, 1.5), b = bnrelu::uniform(-0.5, 0.5);
    if (c % 4 == 1) g = 0;            // gamma zero
    if (c % 4 == 2) g = -std::abs(g);  // gamma negative
    if (kind == Data::all_negative) b = -100;
    if (kind == Data::all_positive) b = 100;
    if (kind == Data::at_kink) b = 0;
    p[0].value[c] = static_cast<typename L::value_type>(g);
    p[1].value[c] = static_cast<typename L::value_type>(b);
  }
}

template <class T, int Rank, class Plain, class Fused>
void compare(const bnrelu::Dims<Rank>& d, Data kind, const nn::BatchNormOptions& opt) {
  const Index C = d[1];
  Plain bn(opt);
  Fused fused(opt);
  nn::ReLU<T> relu;
  bnrelu::manual_seed(static_cast<std::uint64_t>(C * 31 + static_cast<int>(kind)));
  set_affine(bn, kind, C);
  {
    auto pf = fused.named_parameters();
    auto pb = bn.named_parameters();
    for (std::size_t i = 0; i < pb.size(); ++i) std::copy(pb[i].value.begin(), pb[i].value.end(), pf[i].value.begin());
  }
  for (int step = 0; step < 2; ++step) {
    const auto x = make_input<T, Rank>(d, kind);
    const auto dy = random_tensor<T, Rank>(d);
    const auto y_ref = relu.forward(bn.forward(x));
    const auto y = fused.forward(x);
    EXPECT_TRUE(close_to(y, y_ref, 0)) << "forward";  // same arithmetic, bit for bit
    const auto dx_ref = bn.backward(relu.backward(dy));
    const auto dx = fused.backward(dy);
    EXPECT_TRUE(close_to(dx, dx_ref, 0)) << "dx";
  }
  auto pf = fused.named_parameters(), pb = bn.named_parameters();
  ASSERT_EQ(pf.size(), pb.size());
  for (std::size_t i = 0; i < pf.size(); ++i) {
    EXPECT_EQ(pf[i].name, pb[i].name);
    EXPECT_TRUE(close_to(pf[i].grad, std::vector<T>(pb[i].grad.begin(), pb[i].grad.end()), 0)) << pf[i].name;
  }
  auto bf = fused.named_buffers(), bb = bn.named_buffers();
  ASSERT_EQ(bf.size(), bb.size());
  for (std::size_t i = 0; i < bf.size(); ++i) {
    EXPECT_EQ(bf[i].name, bb[i].name);
    EXPECT_TRUE(close_to(bf[i].value, std::vector<T>(bb[i].value.begin(), bb[i].value.end()), 0)) << bf[i].name;
  }
  bn.eval();
  fused.eval();
  const auto xe = make_input<T, Rank>(d, kind);
  const auto ye = fused.forward(xe);
  EXPECT_TRUE(close_to(ye, relu.forward(bn.forward(xe)), 0)) << "eval";
  for (Index i = 0; i < ye.size(); ++i) ASSERT_TRUE(std::isfinite(ye.data()[i]));
}

}  // namespace

template <class T>
class FusedVsUnfused : public ::testing::Test {};
TYPED_TEST_SUITE(FusedVsUnfused, FloatTypes);

TYPED_TEST(FusedVsUnfused, BatchNormReLU2dEqualsThePair) {
  using T = TypeParam;
  const std::vector<bnrelu::Dims<4>> shapes{{2, 3, 1, 1}, {1, 2, 2, 1}, {4, 5, 7, 3}, {3, 1, 28, 28},
                                            {2, 70, 3, 5}, {8, 4, 14, 14}, {1, 3, 1, 2}};
  for (const auto& d : shapes)
    for (Data kind : {Data::random, Data::all_negative, Data::all_positive, Data::at_kink, Data::constant})
      for (const auto& opt : {nn::BatchNormOptions{.num_features = d[1]},
                              nn::BatchNormOptions{.num_features = d[1], .eps = 1e-3, .momentum = 0.7},
                              nn::BatchNormOptions{.num_features = d[1], .affine = false},
                              nn::BatchNormOptions{.num_features = d[1], .track_running_stats = false}}) {
        SCOPED_TRACE(bnrelu::shape_string(d) + " kind " + std::to_string(static_cast<int>(kind)));
        compare<T, 4, nn::BatchNorm2d<T>, nn::BatchNormReLU2d<T>>(d, kind, opt);
      }
}

TYPED_TEST(FusedVsUnfused, BatchNormReLU1dEqualsThePair) {
  using T = TypeParam;
  const std::vector<bnrelu::Dims<2>> shapes{{2, 1}, {2, 3}, {5, 64}, {7, 65}, {3, 130}, {64, 512}};
  for (const auto& d : shapes)
    for (Data kind : {Data::random, Data::all_negative, Data::all_positive, Data::at_kink, Data::constant})
      for (const auto& opt : {nn::BatchNormOptions{.num_features = d[1]},
                              nn::BatchNormOptions{.num_features = d[1], .affine = false}}) {
        SCOPED_TRACE(bnrelu::shape_string(d) + " kind " + std::to_string(static_cast<int>(kind)));
        compare<T, 2, nn::BatchNorm1d<T>, nn::BatchNormReLU1d<T>>(d, kind, opt);
      }
}

TEST(BatchNormReLU, GradcheckInDouble) {
  bnrelu::manual_seed(8);
  nn::BatchNormReLU2d<double> bnr({.num_features = 3});
  for (auto& p : bnr.named_parameters())
    for (auto& v : p.value) v = bnrelu::uniform(-1.5, 1.5);
  auto r = bnrelu::testing::gradcheck(bnr, random_tensor<double, 4>({3, 3, 4, 5}));
  EXPECT_TRUE(r.ok) << r.worst;
  nn::BatchNormReLU1d<double> bnr1({.num_features = 6});
  for (auto& p : bnr1.named_parameters())
    for (auto& v : p.value) v = bnrelu::uniform(-1.5, 1.5);
  r = bnrelu::testing::gradcheck(bnr1, random_tensor<double, 2>({7, 6}));
  EXPECT_TRUE(r.ok) << r.worst;
}

TEST(BatchNormReLU, KeepsOneTensorForBackward) {
  // fused: the input only (the ReLU mask is recomputed from it); unfused: the input plus
  // ReLU's one byte per element
  nn::BatchNormReLU2d<float> fused({.num_features = 8});
  const auto x = random_tensor<float, 4>({4, 8, 6, 6});
  fused.forward(x);
  EXPECT_EQ(fused.cache_bytes(), sizeof(float) * x.size() + 2 * sizeof(double) * 8);
}

TEST(BatchNormReLU, SameResultForAnyThreadCount) {
  const auto x = random_tensor<float, 4>({6, 5, 9, 9});
  const auto dy = random_tensor<float, 4>({6, 5, 9, 9});
  const int saved = bnrelu::num_threads();
  std::vector<Tensor<float, 4>> ys, dxs;
  for (int t : {1, 2}) {
    bnrelu::set_num_threads(t);
    nn::BatchNormReLU2d<float> l({.num_features = 5});
    ys.push_back(l.forward(x));
    dxs.push_back(l.backward(dy));
  }
  bnrelu::set_num_threads(saved);
  EXPECT_TRUE(close_to(ys[1], ys[0], 0));
  EXPECT_TRUE(close_to(dxs[1], dxs[0], 0));
}

TEST(BatchNormReLU, ErrorsLeaveStateUnchanged) {
  nn::BatchNormReLU2d<float> l({.num_features = 2});
  EXPECT_THROW(l.backward(Tensor<float, 4>(2, 2, 1, 1)), std::logic_error);
  l.forward(random_tensor<float, 4>({2, 2, 3, 3}));
  const auto before = state_of(l);
  try {
    l.forward(Tensor<float, 4>(2, 3, 3, 3));
    FAIL();
  } catch (const bnrelu::shape_error& e) {
    EXPECT_NE(std::string(e.what()).find("BatchNormReLU2d"), std::string::npos) << e.what();
  }
  EXPECT_THROW(l.forward(Tensor<float, 4>(1, 2, 1, 1)), bnrelu::shape_error);
  EXPECT_EQ(state_of(l), before);
  EXPECT_NO_THROW(l.backward(random_tensor<float, 4>({2, 2, 3, 3})));
}

// out and grads hold two runs' results, the second run's after the first's: each must equal
// its counterpart bit for bit.
template <class T>
void expect_runs_agree(const std::vector<Tensor<T, 4>>& out, const std::vector<std::vector<T>>& grads) {
  const std::size_t half = out.size() / 2;
  for (std::size_t i = 0; i < half; ++i) EXPECT_TRUE(close_to(out[half + i], out[i], 0)) << "output " << i;
  for (std::size_t i = 0; i < grads.size() / 2; ++i)
    EXPECT_EQ(grads[grads.size() / 2 + i], grads[i]) << "gradient " << i;
}

// Big outputs are written with non-temporal stores (kernels/tuning.hpp), after a scalar
// head up to the packet alignment; forced here onto small tensors (odd plane sizes put the
// chunks at every alignment), they must give the same bits as ordinary stores.
TYPED_TEST(FusedVsUnfused, NonTemporalStoresGiveTheSameBits) {
  using T = TypeParam;
  namespace k = bnrelu::kernels;
  for (const auto& d : std::vector<bnrelu::Dims<4>>{{3, 5, 7, 3}, {4, 3, 28, 28}, {2, 6, 1, 1}, {5, 2, 3, 1}}) {
    SCOPED_TRACE(bnrelu::shape_string(d));
    const auto x = random_tensor<T, 4>(d, -2, 3);
    const auto dy = random_tensor<T, 4>(d);
    std::vector<Tensor<T, 4>> out;
    std::vector<std::vector<T>> grads;
    for (Index threshold : {std::numeric_limits<Index>::max(), Index{0}}) {
      const ForcedTuning forced(k::detail::stream_threshold(), threshold);
      nn::BatchNormReLU2d<T> l({.num_features = d[1]});
      for (auto& p : l.named_parameters())
        for (auto& v : p.value) v = static_cast<T>(0.5 + 0.1 * static_cast<double>(&v - p.value.data()));
      out.push_back(l.forward(x));
      out.push_back(l.backward(dy));
      for (auto& p : l.named_parameters()) grads.emplace_back(p.grad.begin(), p.grad.end());
      // SyncBatchNorm's separate dx pass, from the sums the layer would allreduce
      const k::BatchShape sh{d[0], d[1], d[2] * d[3]};
      const Index C = sh.C;
      std::vector<double> mean(C), var(C), invstd(C), sum(C), dot(C);
      k::batchnorm_statistics(mean.data(), var.data(), x.data(), sh);
      for (Index c = 0; c < C; ++c) invstd[c] = 1 / std::sqrt(var[c] + 1e-5);
      const k::Normalisation<T> norm{mean.data(), invstd.data()};
      k::batchnorm_backward_sums(sum.data(), dot.data(), dy.data(), x.data(), sh, norm, true);
      Tensor<T, 4> dx(d);
      k::batchnorm_backward_dx(dx.data(), {sum.data(), dot.data(), sh.count()}, dy.data(), x.data(), sh, norm, true);
      out.push_back(dx);
      l.eval();
      out.push_back(l.forward(x));
    }
    expect_runs_agree(out, grads);
  }
}

// A fresh BatchNorm2d's forward_add_relu(x, s), then its backward with the shortcut's gradient
// deferred: appends dx, s plus that gradient (add_shortcut_grad) and the parameter gradients.
template <class T>
void run_deferred_add_relu(const Tensor<T, 4>& x, const Tensor<T, 4>& s, const Tensor<T, 4>& dy,
                           std::vector<Tensor<T, 4>>& out, std::vector<std::vector<T>>& grads) {
  nn::BatchNorm2d<T> bn({.num_features = x.dimension(1)});
  bn.forward_add_relu(Tensor<T, 4>(x), s);
  out.push_back(bn.backward_add_relu_deferred(dy, s));
  Tensor<T, 4> t = s;
  bn.add_shortcut_grad(t, dy);
  out.push_back(t);
  for (auto& p : bn.named_parameters()) grads.emplace_back(p.grad.begin(), p.grad.end());
}

// Channels too big to stay in L2 between the passes go in blocks of as many channels as the
// threads allow (long runs from memory); forced here onto small tensors, those blocks must give
// the same bits as the default ones, forward and backward, with ReLU and with a shortcut's add.
TYPED_TEST(FusedVsUnfused, LongRunBlocksGiveTheSameBits) {
  using T = TypeParam;
  namespace k = bnrelu::kernels;
  constexpr Index kNever = std::numeric_limits<Index>::max();
  // the two settings choose different blocks for {2, 40, 32, 32} on one thread
  EXPECT_EQ(k::detail::channel_block(2, 40, 32 * 32, sizeof(float), 1, kNever), 1);
  EXPECT_EQ(k::detail::channel_block(2, 40, 32 * 32, sizeof(float), 1, 0), 20);
  for (const auto& d : std::vector<bnrelu::Dims<4>>{{2, 40, 32, 32}, {3, 17, 7, 3}}) {
    SCOPED_TRACE(bnrelu::shape_string(d));
    const auto x = random_tensor<T, 4>(d, -2, 3);
    const auto s = random_tensor<T, 4>(d);
    const auto dy = random_tensor<T, 4>(d);
    std::vector<Tensor<T, 4>> out;
    std::vector<std::vector<T>> grads;
    for (Index bytes : {kNever, Index{0}}) {
      const ForcedTuning forward_runs(k::detail::long_run_bytes(), bytes);
      const ForcedTuning backward_runs(k::detail::backward_long_run_bytes(), bytes);
      nn::BatchNormReLU2d<T> l({.num_features = d[1]});
      out.push_back(l.forward(x));
      out.push_back(l.backward(dy));
      nn::BatchNorm2d<T> bn({.num_features = d[1]});
      out.push_back(bn.forward_add_relu(Tensor<T, 4>(x), s));
      Tensor<T, 4> ds;
      out.push_back(bn.backward_add_relu(Tensor<T, 4>(dy), s, ds));
      out.push_back(ds);
      for (auto& p : l.named_parameters()) grads.emplace_back(p.grad.begin(), p.grad.end());
      for (auto& p : bn.named_parameters()) grads.emplace_back(p.grad.begin(), p.grad.end());
      run_deferred_add_relu(x, s, dy, out, grads);
    }
    expect_runs_agree(out, grads);
  }
}

// Blocks whose x and dy do not fit in L2 take the backward's second pass in reverse image order
// (and ask fewer images ahead in the first); forced here onto small tensors, that walk must give
// the same bits, for the layer, for a shortcut's add with its gradient deferred, and for
// SyncBatchNorm's separate passes.
TYPED_TEST(FusedVsUnfused, ReverseBackwardWalkGivesTheSameBits) {
  using T = TypeParam;
  namespace k = bnrelu::kernels;
  for (const auto& d : std::vector<bnrelu::Dims<4>>{{3, 5, 7, 3}, {5, 3, 28, 28}, {1, 4, 2, 2}}) {
    SCOPED_TRACE(bnrelu::shape_string(d));
    const auto x = random_tensor<T, 4>(d, -2, 3);
    const auto dy = random_tensor<T, 4>(d);
    const auto s = random_tensor<T, 4>(d);
    const k::BatchShape sh{d[0], d[1], d[2] * d[3]};
    const Index C = sh.C;
    std::vector<Tensor<T, 4>> out;
    std::vector<std::vector<T>> grads;
    std::vector<std::vector<double>> sums;
    for (Index spill : {std::numeric_limits<Index>::max(), Index{0}}) {
      const ForcedTuning forced(k::detail::backward_spill_bytes(), spill);
      EXPECT_EQ(k::detail::backward_walk<T>(sh, 1, 2, 3).reverse, spill == 0);
      nn::BatchNormReLU2d<T> l({.num_features = C});
      for (auto& p : l.named_parameters())
        for (auto& v : p.value) v = static_cast<T>(0.5 - 0.2 * static_cast<double>(&v - p.value.data()));
      l.forward(x);
      out.push_back(l.backward(dy));
      for (auto& p : l.named_parameters()) grads.emplace_back(p.grad.begin(), p.grad.end());
      run_deferred_add_relu(x, s, dy, out, grads);  // pass 2 reads the mask in the walk's order
      std::vector<double> mean(C), var(C), invstd(C), sum(C), dot(C);
      k::batchnorm_statistics(mean.data(), var.data(), x.data(), sh);
      for (Index c = 0; c < C; ++c) invstd[c] = 1 / std::sqrt(var[c] + 1e-5);
      const k::Normalisation<T> norm{mean.data(), invstd.data()};
      k::batchnorm_backward_sums(sum.data(), dot.data(), dy.data(), x.data(), sh, norm, true);
      sums.push_back(sum);
      sums.push_back(dot);
      Tensor<T, 4> dx(d);
      k::batchnorm_backward_dx(dx.data(), {sum.data(), dot.data(), sh.count()}, dy.data(), x.data(), sh, norm, true);
      out.push_back(dx);
    }
    expect_runs_agree(out, grads);
    EXPECT_EQ(sums[2], sums[0]);
    EXPECT_EQ(sums[3], sums[1]);
  }
}
