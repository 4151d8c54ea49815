#include <bnrelu/optim/adam.hpp>
#include <bnrelu/optim/scheduler.hpp>
#include <bnrelu/optim/sgd.hpp>

#include <memory>

#include <limits>

#include "golden.hpp"

namespace optim = bnrelu::optim;
using namespace bnrelu::test;

namespace {

template <class T>
std::unique_ptr<optim::Optimizer<T>> make(const nlohmann::json& o, std::vector<bnrelu::ParamRef<T>> params) {
  const std::string kind = o["kind"];
  if (kind == "sgd")
    return std::make_unique<optim::SGD<T>>(params, optim::SGDOptions{.lr = o["lr"], .momentum = o.value("momentum", 0.0),
                                                                      .dampening = o.value("dampening", 0.0),
                                                                      .weight_decay = o.value("weight_decay", 0.0),
                                                                      .nesterov = o.value("nesterov", false)});
  if (kind == "adam")
    return std::make_unique<optim::Adam<T>>(params, optim::AdamOptions{.lr = o["lr"], .beta1 = o.value("beta1", 0.9),
                                                                        .beta2 = o.value("beta2", 0.999), .eps = o.value("eps", 1e-8),
                                                                        .weight_decay = o.value("weight_decay", 0.0)});
  return std::make_unique<optim::AdamW<T>>(params, optim::AdamWOptions{.lr = o["lr"], .weight_decay = o["weight_decay"]});
}

}  // namespace

template <class T>
class OptimGolden : public ::testing::Test {};
TYPED_TEST_SUITE(OptimGolden, FloatTypes);

TYPED_TEST(OptimGolden, StepsMatchPyTorch) {
  using T = TypeParam;
  for (const char* name : {"sgd_plain", "sgd_momentum", "sgd_nesterov", "adam", "adam_wd", "adamw"}) {
    SCOPED_TRACE(name);
    Fixture f(name);
    std::vector<T> value = f.values<T>("p0"), grad(value.size());
    std::vector<bnrelu::ParamRef<T>> params{{"p", {3, 4}, std::span<T>(value), std::span<T>(grad)}};
    auto opt = make<T>(f.options, params);
    for (int k = 0; k < f.options["steps"].get<int>(); ++k) {
      const auto g = f.values<T>("grad" + std::to_string(k));
      std::copy(g.begin(), g.end(), grad.begin());
      opt->step();
      EXPECT_TRUE(close_to(value.data(), value.size(), f.values<double>("p" + std::to_string(k + 1)).data(), value.size(),
                           tolerance<T>()))
          << "step " << k + 1;
    }
    EXPECT_EQ(opt->steps(), 5);
    opt->zero_grad();
    for (T g : grad) EXPECT_EQ(g, T(0));
  }
}

TEST(Optim, SchedulersMatchPyTorch) {
  Fixture f("schedulers");
  std::vector<double> v(1), g(1);
  std::vector<bnrelu::ParamRef<double>> params{{"p", {1}, std::span<double>(v), std::span<double>(g)}};
  optim::SGD<double> a(params, {.lr = 0.2}), b(params, {.lr = 0.2});
  optim::StepLR<double> step(a, 3, 0.5);
  optim::CosineAnnealingLR<double> cosine(b, 7, 0.01);
  const auto want_step = f.values<double>("step"), want_cos = f.values<double>("cosine");
  for (int e = 0; e < 10; ++e) {
    EXPECT_NEAR(step.set_epoch(e), want_step[e], 1e-15) << e;
    EXPECT_NEAR(cosine.set_epoch(e), want_cos[e], 1e-12) << e;
  }
}

TEST(Optim, StateIsPerParameterInOrderAndBadOptionsThrow) {
  std::vector<float> v1(3), g1(3), v2(2), g2(2);
  std::vector<bnrelu::ParamRef<float>> params{{"0.weight", {3}, std::span<float>(v1), std::span<float>(g1)},
                                              {"0.bias", {2}, std::span<float>(v2), std::span<float>(g2)}};
  optim::Adam<float> adam(params, {});
  auto s = adam.state();
  ASSERT_EQ(s.size(), 4u);
  EXPECT_EQ(s[0].first, "0.weight.exp_avg");
  EXPECT_EQ(s[3].first, "0.bias.exp_avg_sq");
  EXPECT_EQ(s[3].second->size(), 2u);
  optim::SGD<float> plain(params, {.lr = 0.1});
  EXPECT_TRUE(plain.state().empty());
  EXPECT_THROW(optim::SGD<float>(params, {.lr = -1}), bnrelu::shape_error);
  EXPECT_THROW(optim::SGD<float>(params, {.lr = 0.1, .momentum = 0, .nesterov = true}), bnrelu::shape_error);
  EXPECT_THROW(optim::Adam<float>(params, {.beta1 = 1.0}), bnrelu::shape_error);
  // every option a finite number
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  EXPECT_THROW(optim::SGD<float>(params, {.lr = 0.1, .momentum = 0.9, .dampening = nan}), bnrelu::shape_error);
  EXPECT_THROW(optim::SGD<float>(params, {.lr = inf}), bnrelu::shape_error);
  EXPECT_THROW(optim::SGD<float>(params, {.lr = 0.1, .momentum = inf}), bnrelu::shape_error);
  EXPECT_THROW(optim::SGD<float>(params, {.lr = 0.1, .weight_decay = nan}), bnrelu::shape_error);
  EXPECT_THROW(optim::Adam<float>(params, {.eps = inf}), bnrelu::shape_error);
  EXPECT_THROW(optim::AdamW<float>(params, {.lr = nan}), bnrelu::shape_error);
  optim::SGD<float> sgd(params, {.lr = 0.1});
  EXPECT_THROW(sgd.set_lr(nan), bnrelu::shape_error);
  EXPECT_EQ(sgd.lr(), 0.1);
  EXPECT_THROW(optim::StepLR<float>(plain, 0), bnrelu::shape_error);
}
