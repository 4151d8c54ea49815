// The whole seed CNN against PyTorch: train-mode forward + cross-entropy + backward, running
// statistics, then eval-mode logits; with fusion on and off.
#include <bnrelu/models/seed_cnn.hpp>
#include <bnrelu/nn/loss.hpp>

#include <algorithm>
#include <cmath>

#include "golden.hpp"

namespace nn = bnrelu::nn;
using bnrelu::Tensor;
using namespace bnrelu::test;

namespace {

// The same deterministic parameters as formula_fill() in tests/golden/make_golden.py.
template <class Model>
void formula_fill(Model& model) {
  int salt = 0;
  for (auto& p : model.named_parameters()) {
    const auto n = static_cast<std::int64_t>(p.value.size());
    std::int64_t fan_in = 1;
    for (std::size_t d = 1; d < p.shape.size(); ++d) fan_in *= p.shape[d];
    const std::string layer = p.name.substr(0, p.name.find('.'));
    for (std::int64_t i = 0; i < n; ++i) {
      const double u = static_cast<double>((i * 7919 + salt * 104729) % 2003) / 2003.0 - 0.5;
      double v;
      if (p.shape.size() > 1) v = u * (2.0 / std::sqrt(static_cast<double>(fan_in)));
      else if (layer == "1" || layer == "5" || layer == "10") v = 1.0 + 0.4 * u;
      else v = 0.4 * u;
      p.value[i] = static_cast<typename Model::value_type>(v);
    }
    ++salt;
  }
}

}  // namespace

template <class T>
class SeedCnnGolden : public ::testing::Test {};
TYPED_TEST_SUITE(SeedCnnGolden, FloatTypes);

TYPED_TEST(SeedCnnGolden, TrainAndEvalMatchPyTorch) {
  using T = TypeParam;
  Fixture f("seed_cnn");
  const double tol = tolerance<T>();
  const auto stride = f.options["fc_row_stride"].get<bnrelu::Index>();
  for (bool fused : {true, false}) {
    SCOPED_TRACE(fused ? "fused" : "unfused");
    auto model = bnrelu::models::seed_cnn<T>(1, 10);
    model.set_fusion(fused);
    formula_fill(model);
    nn::CrossEntropyLoss<T> ce;
    const auto logits = model.forward(f.tensor<T, 4>("x"));
    EXPECT_TRUE(close_to(logits, f.tensor<double, 2>("logits"), tol));
    const T loss = ce.forward(logits, f.values<std::int64_t>("labels"));
    EXPECT_NEAR(loss, f.values<double>("loss")[0], tol * std::abs(f.values<double>("loss")[0]));
    const auto dx = model.backward(ce.backward());
    EXPECT_TRUE(close_to(dx, f.tensor<double, 4>("dx"), tol));
    for (auto& p : model.named_parameters()) {
      SCOPED_TRACE(p.name);
      const auto ref = f.values<double>("grad." + p.name);
      if (p.name == "9.weight") {  // the fixture keeps every stride-th row of 512 x 6272
        const auto cols = p.shape[1];
        std::vector<T> rows;
        for (bnrelu::Index r = 0; r < p.shape[0]; r += stride)
          rows.insert(rows.end(), p.grad.begin() + r * cols, p.grad.begin() + (r + 1) * cols);
        EXPECT_TRUE(close_to(rows.data(), rows.size(), ref.data(), ref.size(), tol));
      } else if (p.name == "0.bias" || p.name == "4.bias" || p.name == "9.bias") {
        // a bias feeding batch norm has gradient 0 up to rounding: measure it on the scale
        // of its layer's weight gradient
        const auto wref = f.values<double>("grad." + p.name.substr(0, p.name.find('.')) + ".weight");
        double wscale = 0;
        for (double v : wref) wscale = std::max(wscale, std::abs(v));
        EXPECT_TRUE(close_to(p.grad, ref, tol, wscale));
      } else {
        EXPECT_TRUE(close_to(p.grad, ref, tol));
      }
    }
    for (auto& b : model.named_buffers()) {
      SCOPED_TRACE(b.name);
      EXPECT_TRUE(close_to(b.value, f.values<double>("buffer." + b.name), tol));
    }
    EXPECT_EQ(model.template get<1>().num_batches_tracked(), 1);
    model.eval();
    EXPECT_TRUE(close_to(model.forward(f.tensor<T, 4>("x_eval")), f.tensor<double, 2>("logits_eval"), tol));
  }
}

TEST(SeedCnn, LayoutNamesAndShapes) {
  auto model = bnrelu::models::seed_cnn<float>(3, 7);
  static_assert(decltype(model)::size == 13);
  static_assert(std::is_same_v<decltype(model)::input_type, Tensor<float, 4>>);
  static_assert(std::is_same_v<decltype(model)::output_type, Tensor<float, 2>>);
  const std::vector<std::string> expected{"0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias",
                                          "5.weight", "5.bias", "9.weight", "9.bias", "10.weight", "10.bias",
                                          "12.weight", "12.bias"};
  std::vector<std::string> names;
  for (auto& p : model.named_parameters()) names.push_back(p.name);
  EXPECT_EQ(names, expected);
  EXPECT_EQ(model.get<0>().named_parameters()[0].shape, (std::vector<bnrelu::Index>{64, 3, 3, 3}));
  EXPECT_EQ(model.get<12>().named_parameters()[0].shape, (std::vector<bnrelu::Index>{7, 512}));
  EXPECT_EQ(model.output_dims({5, 3, 28, 28}), (bnrelu::Dims<2>{5, 7}));
  EXPECT_THROW(model.output_dims({5, 3, 32, 32}), bnrelu::shape_error);  // 8192 != 6272 features
}

// Every output and input gradient of the whole model, and every parameter gradient but the
// convolutions' weights and biases (summed from per-thread partials in a fixed order for a
// thread count), are the same bits for 1 and 2 threads: training forward, backward, and eval.
TEST(SeedCnn, SameResultForAnyThreadCount) {
  struct Run {
    Tensor<float, 2> logits, eval_logits;
    Tensor<float, 4> dx;
    std::vector<std::vector<float>> grads;
  };
  auto run = [](int threads) {
    bnrelu::set_num_threads(threads);
    auto model = bnrelu::models::seed_cnn<float>(1, 10);
    formula_fill(model);
    bnrelu::manual_seed(5);
    Tensor<float, 4> x(6, 1, 28, 28);
    for (bnrelu::Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(bnrelu::uniform(-1, 2));
    Run r;
    r.logits = model.forward(x);
    Tensor<float, 2> dy(r.logits.dimensions());
    for (bnrelu::Index i = 0; i < dy.size(); ++i) dy.data()[i] = static_cast<float>(bnrelu::uniform(-1, 1));
    r.dx = model.backward(dy);
    for (auto& p : model.named_parameters())
      if (p.name != "0.weight" && p.name != "0.bias" && p.name != "4.weight" && p.name != "4.bias")
        r.grads.emplace_back(p.grad.begin(), p.grad.end());
    model.eval();
    r.eval_logits = model.forward(x);
    return r;
  };
  const int before = bnrelu::num_threads();
  const Run one = run(1), two = run(2);
  bnrelu::set_num_threads(before);
  auto same = [](const auto& a, const auto& b) {
    return a.size() == b.size() && std::equal(a.data(), a.data() + a.size(), b.data());
  };
  EXPECT_TRUE(same(one.logits, two.logits));
  EXPECT_TRUE(same(one.eval_logits, two.eval_logits));
  EXPECT_TRUE(same(one.dx, two.dx));
  ASSERT_EQ(one.grads.size(), two.grads.size());
  for (std::size_t i = 0; i < one.grads.size(); ++i) EXPECT_EQ(one.grads[i], two.grads[i]) << i;
}

// seed_cnn sizes its first Linear from the input's height and width.
TEST(SeedCnn, TakesTheInputSize) {
  bnrelu::manual_seed(1);
  auto model = bnrelu::models::seed_cnn<float>(3, 7, 32, 30);
  EXPECT_EQ(model.get<9>().weight().dimension(1), 128 * 8 * 7);
  const auto y = model.forward(Tensor<float, 4>(Tensor<float, 4>(2, 3, 32, 30).setConstant(0.5f)));
  EXPECT_EQ(y.dimension(0), 2);
  EXPECT_EQ(y.dimension(1), 7);
  EXPECT_THROW(model.forward(Tensor<float, 4>(2, 3, 28, 28)), bnrelu::shape_error);
  EXPECT_THROW(bnrelu::models::seed_cnn<float>(1, 10, 3, 28), bnrelu::shape_error);
  EXPECT_THROW(bnrelu::models::seed_cnn<float>(1, 10, bnrelu::Index{1} << 30, bnrelu::Index{1} << 30), bnrelu::shape_error);
}
