// Residual blocks and ResNet-20 against PyTorch, fused BatchNorm+Add+ReLU against the unfused
// chain bit for bit, gradients by finite differences, state names, checkpoints and bad input.
#include <bnrelu/io/safetensors.hpp>
#include <bnrelu/models/resnet.hpp>
#include <bnrelu/nn/loss.hpp>
#include <bnrelu/nn/avgpool2d.hpp>
#include <bnrelu/nn/dropout.hpp>
#include <bnrelu/nn/residual.hpp>
#include <bnrelu/testing/gradcheck.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <filesystem>
#include <set>
#include <span>

#include "golden.hpp"
#include "scratch.hpp"

namespace nn = bnrelu::nn;
using bnrelu::Index;
using bnrelu::dims_of;
using bnrelu::shape_string;
using bnrelu::Tensor;
using namespace bnrelu::test;

namespace {

template <class T>
using Main = bnrelu::models::BasicMain<T>;

template <class T>
auto identity_block(Index c) {
  return bnrelu::models::detail::basic_block<T>(c);
}
template <class T>
auto projection_block(Index in, Index out) {
  return bnrelu::models::detail::down_block<T>(in, out);
}

// Every gradient and running buffer of the fixture, by state_dict name; the model must have
// exactly the fixture's parameter names.
template <class Model>
void expect_state_matches(Model& model, const Fixture& f, double tol, std::size_t keep) {
  std::set<std::string> expected;
  for (const auto& [key, raw] : f.file.tensors)
    if (key.rfind("grad.", 0) == 0) expected.insert(key.substr(5));
  std::set<std::string> got;
  for (auto& p : model.named_parameters()) {
    got.insert(p.name);
    SCOPED_TRACE(p.name);
    if (!f.has("grad." + p.name)) continue;
    const auto ref = f.values<double>("grad." + p.name);
    const std::size_t n = keep ? std::min(keep, p.grad.size()) : p.grad.size();
    EXPECT_TRUE(close_to(p.grad.data(), n, ref.data(), ref.size(), tol));
  }
  EXPECT_EQ(got, expected);
  for (auto& b : model.named_buffers()) {
    SCOPED_TRACE(b.name);
    ASSERT_TRUE(f.has("buffer." + b.name));
    EXPECT_TRUE(close_to(b.value, f.values<double>("buffer." + b.name), tol));
  }
  nn::for_each_batch_counter(model, "", [&](const std::string& name, std::int64_t& n) {
    EXPECT_EQ(n, f.values<std::int64_t>("buffer." + name).at(0)) << name;
  });
}

template <class Model>
void residual_case(Model model, const std::string& fixture) {
  using T = typename Model::value_type;
  Fixture f(fixture);
  const double tol = tolerance<T>();
  for (bool fused : {true, false}) {
    SCOPED_TRACE(fused ? "fused" : "unfused");
    auto m = model;
    m.set_fusion(fused);
    formula_fill_by_name(m);
    const auto y = m.forward(f.tensor<T, 4>("x"));
    EXPECT_TRUE(close_to(y, f.tensor<double, 4>("y"), tol));
    const auto dx = m.backward(f.tensor<T, 4>("dy"));
    EXPECT_TRUE(close_to(dx, f.tensor<double, 4>("dx"), tol));
    expect_state_matches(m, f, tol, 0);
    m.eval();
    EXPECT_TRUE(close_to(m.forward(f.tensor<T, 4>("x")), f.tensor<double, 4>("y_eval"), tol));
  }
}

}  // namespace

template <class T>
class ResidualGolden : public ::testing::Test {};
TYPED_TEST_SUITE(ResidualGolden, FloatTypes);

TYPED_TEST(ResidualGolden, IdentityShortcutMatchesPyTorch) { residual_case(identity_block<TypeParam>(4), "residual_identity"); }

TYPED_TEST(ResidualGolden, ProjectionShortcutMatchesPyTorch) {
  residual_case(projection_block<TypeParam>(3, 6), "residual_projection");
}

TYPED_TEST(ResidualGolden, ResNet20MatchesPyTorch) {
  using T = TypeParam;
  Fixture f("resnet20");
  const double tol = tolerance<T>();
  for (bool fused : {true, false}) {
    SCOPED_TRACE(fused ? "fused" : "unfused");
    auto model = bnrelu::models::resnet20<T>(1, 10);
    model.set_fusion(fused);
    formula_fill_by_name(model);
    nn::CrossEntropyLoss<T> ce;
    const auto logits = model.forward(f.tensor<T, 4>("x"));
    EXPECT_TRUE(close_to(logits, f.tensor<double, 2>("y"), tol));
    const T loss = ce.forward(logits, f.values<std::int64_t>("labels"));
    EXPECT_NEAR(loss, f.values<double>("loss")[0], tol * std::abs(f.values<double>("loss")[0]));
    const auto dx = model.backward(ce.backward());
    EXPECT_TRUE(close_to(dx, f.tensor<double, 4>("dx"), tol));
    expect_state_matches(model, f, tol, f.options["keep"].get<std::size_t>());
    model.eval();
    EXPECT_TRUE(close_to(model.forward(f.tensor<T, 4>("x")), f.tensor<double, 2>("y_eval"), tol));
  }
}

TEST(Residual, StateNamesArePyTorchs) {
  auto block = projection_block<float>(3, 6);
  std::vector<std::string> names;
  for (auto& p : block.named_parameters()) names.push_back(p.name);
  EXPECT_EQ(names, (std::vector<std::string>{"main.0.weight", "main.1.weight", "main.1.bias", "main.3.weight",
                                             "main.4.weight", "main.4.bias", "shortcut.0.weight",
                                             "shortcut.1.weight", "shortcut.1.bias"}));
  std::vector<std::string> counters;
  auto model = bnrelu::models::resnet20<float>(3, 10);
  nn::for_each_batch_counter(model, "", [&](const std::string& n, std::int64_t&) { counters.push_back(n); });
  EXPECT_EQ(counters.size(), 1u + 9 * 2 + 2);  // stem, two per block, two projection shortcuts
  EXPECT_EQ(counters[1], "3.main.1.num_batches_tracked");
  EXPECT_EQ(counters[16], "9.shortcut.1.num_batches_tracked");  // after the block's main branch
  EXPECT_EQ(counters.back(), "11.main.4.num_batches_tracked");
}

// The fused pass gives the unfused chain's bits: outputs, input gradients, parameter gradients
// and running statistics, over maps that take the packet loops with tails (S = 35), the
// one-value-per-channel kernels (S = 1) and outputs large enough to be streamed.
TEST(Residual, FusedIsBitIdenticalToUnfused) {
  for (auto dims : {bnrelu::Dims<4>{3, 8, 5, 7}, bnrelu::Dims<4>{6, 8, 1, 1}, bnrelu::Dims<4>{16, 16, 32, 32}}) {
    SCOPED_TRACE(shape_string(dims));
    for (bool projection : {false, true}) {
      bnrelu::manual_seed(7);
      auto run = [&](auto block, bool fused) {
        block.set_fusion(fused);
        formula_fill_by_name(block);
        bnrelu::manual_seed(11);
        auto x = random_tensor<float, 4>(dims, -2, 2);
        auto y = block.forward(x);
        auto dy = random_tensor<float, 4>(dims_of(y));
        auto dx = block.backward(dy);
        std::vector<float> all(y.data(), y.data() + y.size());
        all.insert(all.end(), dx.data(), dx.data() + dx.size());
        for (auto& p : block.named_parameters()) all.insert(all.end(), p.grad.begin(), p.grad.end());
        for (auto& b : block.named_buffers()) all.insert(all.end(), b.value.begin(), b.value.end());
        return all;
      };
      const auto a = projection ? run(projection_block<float>(8 * (dims[1] / 8), dims[1] * 2), true)
                                : run(identity_block<float>(dims[1]), true);
      const auto b = projection ? run(projection_block<float>(8 * (dims[1] / 8), dims[1] * 2), false)
                                : run(identity_block<float>(dims[1]), false);
      ASSERT_EQ(a.size(), b.size());
      EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << (projection ? "projection" : "identity");
    }
  }
}

// A main branch of one BatchNorm2d, relu(BatchNorm(x) + x): the chain before its final batch
// norm is empty. Fused and unfused give the same bits as a BatchNorm2d, an add and a ReLU run by
// hand, in training and in eval, and the gradients pass finite differences.
TEST(Residual, MainOfOneBatchNorm) {
  using OneBatchNorm = nn::Residual<nn::Sequential<nn::BatchNorm2d<double>>>;
  bnrelu::manual_seed(5);
  const auto x = random_tensor<double, 4>({3, 4, 5, 6}, -2, 2), dy = random_tensor<double, 4>({3, 4, 5, 6});
  auto by_hand = [&](nn::BatchNorm2d<double>& bn) {
    Tensor<double, 4> y = bn.forward(x);
    for (Index i = 0; i < y.size(); ++i) y.data()[i] = std::max(0.0, y.data()[i] + x.data()[i]);
    return y;
  };
  nn::BatchNorm2d<double> reference({.num_features = 4});
  const Tensor<double, 4> y_ref = by_hand(reference);
  reference.eval();
  const Tensor<double, 4> y_eval_ref = by_hand(reference);
  for (bool fused : {true, false}) {
    SCOPED_TRACE(fused ? "fused" : "unfused");
    OneBatchNorm block(nn::Sequential{nn::BatchNorm2d<double>({.num_features = 4})});
    block.set_fusion(fused);
    const auto y = block.forward(x);
    EXPECT_EQ(std::memcmp(y.data(), y_ref.data(), y.size() * sizeof(double)), 0);
    EXPECT_EQ(dims_of(block.backward(dy)), dims_of(x));
    block.eval();
    const auto y_eval = block.forward(x);
    EXPECT_EQ(std::memcmp(y_eval.data(), y_eval_ref.data(), y.size() * sizeof(double)), 0);
    block.train();
    const auto r = bnrelu::testing::gradcheck(block, x);
    EXPECT_TRUE(r.ok) << r.worst;
  }
}

// The backward that reads the forward's one-bit mask gives the bits of the one that recomputes
// the mask from x and s, at chunk lengths around a word and a packet, with pre-activations of
// exactly 0 (no gradient), -0 and NaN (gradient passes, as PyTorch's threshold_backward). So
// does the one that leaves the shortcut's gradient to add_shortcut_grad. Both directions also
// run with streaming stores, whose scalar head starts the packets at any offset, so that some
// packets' bits straddle two mask words: the forward writes the same y and mask.
template <class T>
void kept_mask_matches_recomputed() {
  namespace k = bnrelu::kernels;
  for (Index S : {3, 35, 64, 100, 130}) {
    SCOPED_TRACE(S);
    const k::BatchShape sh{3, 2, S};
    const Index n = sh.size();
    auto x = random_tensor<T, 1>({n}, -2, 2), s = random_tensor<T, 1>({n}, -1, 1), dy = random_tensor<T, 1>({n});
    const T weight[2] = {T(0.75), T(1.5)}, bias[2] = {T(0.25), T(-0.5)};
    const k::AffineParams<T> params{weight, bias};
    double mean[2], var[2], invstd[2];
    Tensor<T, 1> y(n);
    std::vector<std::uint64_t> bits(static_cast<std::size_t>(sh.N * sh.C * k::mask_words(S)));
    k::batchnorm_forward_train(y.data(), static_cast<T*>(nullptr), {mean, var, invstd}, x.data(), sh, params, 1e-5,
                               k::Epilogue<T>{true, {s.data(), nullptr, bits.data()}});
    // with the statistics known, make some pre-activations f(x) + s exactly 0, -0 and NaN
    const k::Normalisation<T> norm{mean, invstd, params};
    for (Index i = 0; i < n; i += 7) {
      const k::ChannelAffine<T> f(norm, (i / S) % 2);
      s(i) = i % 3 == 0 ? -f(x(i)) : i % 3 == 1 ? std::numeric_limits<T>::quiet_NaN() : s(i);
    }
    k::batchnorm_forward_train(y.data(), static_cast<T*>(nullptr), {mean, var, invstd}, x.data(), sh, params, 1e-5,
                               k::Epilogue<T>{true, {s.data(), nullptr, bits.data()}});
    {  // streamed, the forward writes the same y and mask
      const ForcedTuning forced(k::detail::stream_threshold(), 0);
      Tensor<T, 1> y_streamed(n);
      std::vector<std::uint64_t> bits_streamed(bits.size(), ~std::uint64_t{0});
      double m2[2], v2[2], i2[2];
      k::batchnorm_forward_train(y_streamed.data(), static_cast<T*>(nullptr), {m2, v2, i2}, x.data(), sh, params, 1e-5,
                                 k::Epilogue<T>{true, {s.data(), nullptr, bits_streamed.data()}});
      EXPECT_EQ(std::memcmp(y_streamed.data(), y.data(), n * sizeof(T)), 0);
      EXPECT_EQ(bits_streamed, bits);
    }
    Tensor<T, 1> dx_kept(n), ds_kept(n), dx_recomputed(n), ds_recomputed(n);
    T dw_kept[2] = {}, db_kept[2] = {}, dw_re[2] = {}, db_re[2] = {};
    k::batchnorm_backward(dx_kept.data(), {dw_kept, db_kept}, dy.data(), x.data(), sh, norm,
                          k::Epilogue<T>{true, {s.data(), ds_kept.data(), bits.data()}});
    k::batchnorm_backward(dx_recomputed.data(), {dw_re, db_re}, dy.data(), x.data(), sh, norm,
                          k::Epilogue<T>{true, {s.data(), ds_recomputed.data()}});
    Index passed = 0;
    for (Index i = 0; i < n; ++i) {
      const T pre = k::ChannelAffine<T>(norm, (i / S) % 2)(x(i)) + s(i);
      EXPECT_EQ(ds_kept(i), pre > T(0) || std::isnan(pre) ? dy(i) : T(0)) << i;
      passed += ds_kept(i) != T(0);
    }
    EXPECT_GT(passed, 0);
    EXPECT_LT(passed, n);
    EXPECT_EQ(std::memcmp(ds_kept.data(), ds_recomputed.data(), n * sizeof(T)), 0);
    EXPECT_EQ(std::memcmp(dx_kept.data(), dx_recomputed.data(), n * sizeof(T)), 0);
    EXPECT_EQ(std::memcmp(dw_kept, dw_re, sizeof dw_kept), 0);
    EXPECT_EQ(std::memcmp(db_kept, db_re, sizeof db_kept), 0);
    for (Index threshold : {k::detail::stream_threshold(), Index{0}}) {
      SCOPED_TRACE(threshold == 0 ? "streamed" : "cached");
      const ForcedTuning forced(k::detail::stream_threshold(), threshold);
      Tensor<T, 1> dx_deferred(n);
      Tensor<T, 1> t = random_tensor<T, 1>({n}), t_plus_ds = t;
      T dw[2] = {}, db[2] = {};
      k::batchnorm_backward(dx_deferred.data(), {dw, db}, dy.data(), x.data(), sh, norm,
                            k::Epilogue<T>{true, {s.data(), nullptr, bits.data()}});
      k::add_shortcut_grad(t.data(), dy.data(), bits.data(), sh);
      k::add_into(t_plus_ds.data(), ds_kept.data(), n);
      EXPECT_EQ(std::memcmp(t.data(), t_plus_ds.data(), n * sizeof(T)), 0);
      EXPECT_EQ(std::memcmp(dx_deferred.data(), dx_kept.data(), n * sizeof(T)), 0);
      EXPECT_EQ(std::memcmp(dw, dw_kept, sizeof dw), 0);
      EXPECT_EQ(std::memcmp(db, db_kept, sizeof db), 0);
    }
  }
}

TEST(Residual, KeptMaskGivesTheRecomputedMasksBits) {
  kept_mask_matches_recomputed<float>();
  kept_mask_matches_recomputed<double>();
}

// The deferred backward needs the kept mask: refused for 1 x 1 maps (no mask kept) and after
// an eval forward (nothing kept); both refuse tensors of another shape; each before changing
// anything.
TEST(Residual, DeferredShortcutGradientNeedsTheKeptMask) {
  for (auto dims : {bnrelu::Dims<4>{4, 3, 1, 1}, bnrelu::Dims<4>{4, 3, 2, 2}}) {
    SCOPED_TRACE(shape_string(dims));
    nn::BatchNorm2d<float> bn({.num_features = 3});
    auto grads = [&] {
      std::vector<float> g;
      for (auto& p : bn.named_parameters()) g.insert(g.end(), p.grad.begin(), p.grad.end());
      return g;
    };
    const auto x = random_tensor<float, 4>(dims), s = random_tensor<float, 4>(dims), dy = random_tensor<float, 4>(dims);
    bn.forward_add_relu(Tensor<float, 4>(x), s);
    const auto zero = grads();
    const bool kept = dims[2] > 1;
    EXPECT_EQ(bn.keeps_add_mask(), kept);
    if (!kept) {
      EXPECT_THROW(bn.backward_add_relu_deferred(dy, s), std::logic_error);
      Tensor<float, 4> t = dy;
      EXPECT_THROW(bn.add_shortcut_grad(t, dy), std::logic_error);
      EXPECT_EQ(grads(), zero);
      continue;
    }
    const bnrelu::Dims<4> other{dims[0], dims[1], dims[2], dims[3] + 1};
    Tensor<float, 4> t(other);
    t.setZero();
    EXPECT_THROW(bn.add_shortcut_grad(t, dy), bnrelu::shape_error);
    EXPECT_TRUE(std::all_of(t.data(), t.data() + t.size(), [](float v) { return v == 0.0f; }));
    EXPECT_THROW(bn.backward_add_relu_deferred(random_tensor<float, 4>(other), s), bnrelu::shape_error);
    EXPECT_EQ(grads(), zero);
    EXPECT_NO_THROW(bn.backward_add_relu_deferred(dy, s));
    EXPECT_NE(grads(), zero);
    bn.eval();
    bn.forward_add_relu(Tensor<float, 4>(x), s);
    EXPECT_FALSE(bn.keeps_add_mask());
    EXPECT_THROW(bn.backward_add_relu_deferred(dy, s), std::logic_error);
  }
}

TEST(Residual, GradientsMatchFiniteDifferences) {
  bnrelu::manual_seed(3);
  for (bool fused : {true, false}) {
    auto block = identity_block<double>(3);
    block.set_fusion(fused);
    const auto r = bnrelu::testing::gradcheck(block, random_tensor<double, 4>({2, 3, 4, 5}));
    EXPECT_TRUE(r.ok) << r.worst;
    auto down = projection_block<double>(2, 4);
    down.set_fusion(fused);
    const auto r2 = bnrelu::testing::gradcheck(down, random_tensor<double, 4>({3, 2, 5, 4}));
    EXPECT_TRUE(r2.ok) << r2.worst;
  }
}

TEST(Residual, RejectsBranchesOfDifferentShapesBeforeAnyChange) {
  // a stride-2 main branch with an identity shortcut
  nn::Residual bad{bnrelu::models::detail::basic_main<float>(4, 4, 2)};
  const auto before = state_of(bad);
  const auto counter = bad.main().template get<1>().num_batches_tracked();
  try {
    bad.forward(Tensor<float, 4>(2, 4, 6, 6));
    FAIL() << "no shape_error";
  } catch (const bnrelu::shape_error& e) {
    EXPECT_NE(std::string(e.what()).find("Residual: the main branch gives 2 x 4 x 3 x 3 but the shortcut 2 x 4 x 6 x 6"),
              std::string::npos)
        << e.what();
  }
  EXPECT_EQ(state_of(bad), before);
  EXPECT_EQ(bad.main().template get<1>().num_batches_tracked(), counter);
  auto good = identity_block<float>(4);
  EXPECT_THROW(good.backward(Tensor<float, 4>(2, 4, 6, 6)), std::logic_error);
  good.forward(random_tensor<float, 4>({2, 4, 6, 6}));
  EXPECT_THROW(good.backward(Tensor<float, 4>(2, 4, 6, 5)), bnrelu::shape_error);
  EXPECT_THROW(good.forward(Tensor<float, 4>(2, 3, 6, 6)), bnrelu::shape_error);
}

// A checkpoint written by one ResNet-20 loads into another with the same eval logits; the
// file's names are the PyTorch module's (make_golden.py's resnet20).
TEST(Residual, ResNet20CheckpointRoundTrips) {
  bnrelu::manual_seed(5);
  auto a = bnrelu::models::resnet20<float>(3, 10);
  const auto x = random_tensor<float, 4>({4, 3, 16, 16});
  a.forward(x);  // move the running statistics off their initial values
  a.eval();
  const auto ya = a.forward(x);
  const auto path = scratch_path("resnet20.safetensors").string();
  bnrelu::io::save_safetensors(a, path);
  const auto file = bnrelu::io::read_safetensors(path);
  EXPECT_TRUE(file.tensors.count("9.shortcut.1.running_var"));
  EXPECT_TRUE(file.tensors.count("3.main.4.num_batches_tracked"));
  bnrelu::manual_seed(6);
  auto b = bnrelu::models::resnet20<float>(3, 10);
  bnrelu::io::load_safetensors(b, path);
  std::filesystem::remove(path);
  b.eval();
  const auto yb = b.forward(x);
  EXPECT_EQ(std::memcmp(ya.data(), yb.data(), ya.size() * sizeof(float)), 0);
}

// fuse_for_inference folds every block's batch norms; eval logits agree up to rounding, and
// the model refuses training and checkpoints afterwards.
TEST(Residual, FuseForInferenceFoldsEveryBlock) {
  bnrelu::manual_seed(8);
  auto model = bnrelu::models::resnet20<double>(3, 10);
  const auto x = random_tensor<double, 4>({4, 3, 12, 12});
  model.forward(x);
  model.eval();
  const auto ref = model.forward(x);
  model.fuse_for_inference();
  EXPECT_TRUE(model.get<3>().inference_only());
  EXPECT_TRUE(model.get<6>().main().get<0>().folded());
  EXPECT_TRUE(model.get<6>().shortcut().get<0>().folded());
  EXPECT_TRUE(close_to(model.forward(x), ref, 1e-12));
  EXPECT_THROW(model.train(), std::logic_error);
  EXPECT_TRUE(nn::any_folded(model));
}

// After fuse_for_inference, infer adds the shortcut and applies the ReLU in the epilogue of the
// convolution that took the main branch's last batch norm: the bits of that convolution's
// output, a separate add and a ReLU, for Winograd (8 channels) and im2col (4) convolutions,
// both shortcut kinds, whole images per thread and images shared by a team.
TEST(Residual, FoldedInferAddsInTheConvolutionsEpilogue) {
  const int threads_before = bnrelu::num_threads();
  for (Index c : {8, 4})
    for (bool projection : {false, true})
      for (Index n : {1, 3})
        for (int threads : {1, 2}) {
          SCOPED_TRACE(std::to_string(c) + (projection ? " projection" : " identity") + ", batch " +
                       std::to_string(n) + ", threads " + std::to_string(threads));
          bnrelu::set_num_threads(threads);
          bnrelu::manual_seed(21);
          auto check = [&](auto block, Index in) {
            const auto x = random_tensor<float, 4>({n, in, 9, 7}, -2, 2);
            block.forward(random_tensor<float, 4>({5, in, 9, 7}, -2, 2));  // running statistics
            block.fuse_for_inference();
            ASSERT_TRUE(block.main().folded_into_add_target());
            auto h = block.main().infer(x);  // the folded convolution's output: no ReLU yet
            const auto s = block.shortcut().infer(x);
            for (Index i = 0; i < h.size(); ++i) h.data()[i] = std::max(0.0f, h.data()[i] + s.data()[i]);
            const auto y = block.infer(x);
            ASSERT_EQ(dims_of(y), dims_of(h));
            EXPECT_EQ(std::memcmp(y.data(), h.data(), h.size() * sizeof(float)), 0);
            EXPECT_TRUE(std::any_of(y.data(), y.data() + y.size(), [](float v) { return v == 0; }));
            EXPECT_TRUE(std::any_of(y.data(), y.data() + y.size(), [](float v) { return v > 0; }));
            const auto yf = block.forward(x);  // the eval forward's separate add and ReLU
            EXPECT_EQ(std::memcmp(y.data(), yf.data(), y.size() * sizeof(float)), 0);
          };
          if (projection)
            check(projection_block<float>(c, 2 * c), c);
          else
            check(identity_block<float>(c), c);
        }
  bnrelu::set_num_threads(threads_before);
}

TEST(Residual, FoldedEpilogueRejectsABadAddend) {
  bnrelu::manual_seed(22);
  nn::Conv2d<float> conv({.in_channels = 2, .out_channels = 3, .kernel_size = 3, .padding = 1});
  const auto x = random_tensor<float, 4>({2, 2, 5, 5});
  EXPECT_THROW(conv.infer_add_relu(x, random_tensor<float, 4>({2, 3, 5, 4})), bnrelu::shape_error);
  EXPECT_NO_THROW(conv.infer_add_relu(x, random_tensor<float, 4>({2, 3, 5, 5})));
  conv.fold_affine({1, 1, 1}, {0, 0, 0}, true);  // a folded ReLU would come before the add
  EXPECT_THROW(conv.infer_add_relu(x, random_tensor<float, 4>({2, 3, 5, 5})), std::logic_error);
  auto unfolded = identity_block<float>(8);
  EXPECT_FALSE(unfolded.main().folded_into_add_target());
  EXPECT_THROW(unfolded.main().infer_add_relu(random_tensor<float, 4>({1, 8, 4, 4}),
                                              random_tensor<float, 4>({1, 8, 4, 4})),
               std::logic_error);
}

namespace {
// One replica: combining statistics changes nothing, so a SyncBatchNorm must give the local
// batch norm's results (through its separate, unfused code path).
class OneReplica : public nn::BatchNormReducer {
 public:
  void combine_statistics(double&, std::span<double>, std::span<double>) override { ++calls; }
  void sum(std::span<double>) override {}
  int calls = 0;
};
}  // namespace

TEST(Residual, SyncBatchNormReachesEveryBlock) {
  bnrelu::manual_seed(9);
  auto local = bnrelu::models::resnet20<double>(1, 10);
  auto synced = local;
  auto reducer = std::make_shared<OneReplica>();
  synced.set_batchnorm_reducer(reducer);
  const auto x = random_tensor<double, 4>({3, 1, 8, 8});
  const auto ya = local.forward(x), yb = synced.forward(x);
  EXPECT_EQ(reducer->calls, 1 + 9 * 2 + 2);
  EXPECT_TRUE(close_to(yb, ya, 1e-12));
  const auto dy = random_tensor<double, 2>(dims_of(ya));
  EXPECT_TRUE(close_to(synced.backward(dy), local.backward(dy), 1e-10));
}

namespace {

// Layers of one's own: one without backward, and a composite holding a batch norm, without and
// with for_each_child.
struct NoBackward : nn::Module {
  using value_type = float;
  using input_type = Tensor<float, 4>;
  Tensor<float, 4> forward(const Tensor<float, 4>& x) { return x; }
  bnrelu::Dims<4> output_dims(const bnrelu::Dims<4>& d) const { return d; }
  void zero_grad() {}
  std::vector<bnrelu::ParamRef<float>> named_parameters() { return {}; }
  std::vector<bnrelu::BufferRef<float>> named_buffers() { return {}; }
};

struct Holder : nn::Module {
  using value_type = float;
  using input_type = Tensor<float, 4>;
  nn::BatchNorm2d<float> bn{{.num_features = 2}};
  void train(bool on = true) {
    nn::Module::train(on);
    bn.train(on);
  }
  void eval() { train(false); }
  Tensor<float, 4> forward(const Tensor<float, 4>& x) { return bn.forward(x); }
  Tensor<float, 4> backward(const Tensor<float, 4>& dy) { return bn.backward(dy); }
  bnrelu::Dims<4> output_dims(const bnrelu::Dims<4>& d) const { return bn.output_dims(d); }
  void zero_grad() { bn.zero_grad(); }
  std::vector<bnrelu::ParamRef<float>> named_parameters() { return nn::prefixed("bn", bn.named_parameters()); }
  std::vector<bnrelu::BufferRef<float>> named_buffers() { return nn::prefixed("bn", bn.named_buffers()); }
};

struct GoodHolder : Holder {
  template <class F>
  void for_each_child(F&& f) {
    f(std::string("bn"), bn);
  }
};

}  // namespace

static_assert(nn::Layer<Holder> && nn::Layer<GoodHolder>);
static_assert(!nn::Layer<NoBackward>, "a layer without backward is no Layer");
static_assert(nn::Layer<nn::Identity<float>> && nn::Layer<nn::Dropout<double>> && nn::Layer<nn::AvgPool2d<float>>);
static_assert(nn::Composite<GoodHolder> && !nn::Composite<Holder>);

TEST(Layer, CompositeWithoutForEachChildIsRefusedByCheckpoints) {
  const auto path = scratch_path("holder.safetensors").string();
  nn::Sequential bad{Holder{}};
  try {
    bnrelu::io::save_safetensors(bad, path);
    FAIL() << "no logic_error";
  } catch (const std::logic_error& e) {
    EXPECT_NE(std::string(e.what()).find("no 0.bn.num_batches_tracked for buffer 0.bn.running_mean"), std::string::npos)
        << e.what();
  }
  EXPECT_FALSE(std::filesystem::exists(path));
  nn::Sequential good{GoodHolder{}};
  good.forward(Tensor<float, 4>(Tensor<float, 4>(3, 2, 2, 2).setRandom()));
  bnrelu::io::save_safetensors(good, path);
  EXPECT_EQ(bnrelu::io::read_safetensors(path).tensors.count("0.bn.num_batches_tracked"), 1u);
  EXPECT_THROW(bnrelu::io::load_safetensors(bad, path), std::logic_error);
  std::filesystem::remove(path);
}
