// What threads share: the thread count (threads.hpp) and the random generator (random.hpp);
// the cache sizes the kernels size their work by (platform/cache.hpp).
#include <bnrelu/nn/linear.hpp>
#include <bnrelu/platform/cache.hpp>
#include <bnrelu/random.hpp>
#include <bnrelu/threads.hpp>

#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace nn = bnrelu::nn;

// set_num_threads on one std::thread sets the count for all: OpenMP's own setting belongs to the
// thread that makes it, bnrelu's does not.
TEST(Threads, SetOnAnyThreadHoldsForEveryThread) {
  const int before = bnrelu::num_threads();
  bnrelu::set_num_threads(2);
  std::thread([] { bnrelu::set_num_threads(1); }).join();
  EXPECT_EQ(bnrelu::num_threads(), 1);
  int team = 0;
#pragma omp parallel num_threads(bnrelu::num_threads())
  {
#pragma omp single
    team = omp_get_num_threads();
  }
  EXPECT_EQ(team, 1);
  std::thread([] { bnrelu::set_num_threads(2); }).join();
  EXPECT_EQ(bnrelu::num_threads(), 2);
  EXPECT_THROW(bnrelu::set_num_threads(0), bnrelu::shape_error);
  EXPECT_THROW(bnrelu::set_num_threads(bnrelu::kMaxThreads + 1), bnrelu::shape_error);
  EXPECT_EQ(bnrelu::num_threads(), 2);
  bnrelu::set_num_threads(before);
}

// Draws from several threads at once take turns: together they are the same numbers one thread
// drawing as many would get, each once.
TEST(Random, ThreadsDrawingAtOnceShareOneSequence) {
  constexpr int kPerThread = 20000;
  bnrelu::manual_seed(42);
  std::vector<double> want(2 * kPerThread);
  for (auto& v : want) v = bnrelu::uniform(0, 1);
  bnrelu::manual_seed(42);
  std::vector<double> a(kPerThread), b(kPerThread / 2), c(kPerThread / 2);
  std::thread ta([&] {
    for (auto& v : a) v = bnrelu::uniform(0, 1);
  });
  std::thread tb([&] {
    for (auto& v : b) v = bnrelu::uniform(0, 1);
    bnrelu::fill_uniform(c.data(), static_cast<std::int64_t>(c.size()), 0, 1);
  });
  ta.join();
  tb.join();
  std::vector<double> got(a);
  got.insert(got.end(), b.begin(), b.end());
  got.insert(got.end(), c.begin(), c.end());
  std::sort(got.begin(), got.end());
  std::sort(want.begin(), want.end());
  EXPECT_EQ(got, want);
}

// Two threads building models at once each get a complete, valid initialisation.
TEST(Random, ModelsBuiltOnTwoThreadsAreWhole) {
  auto build = [] { return nn::Linear<float>({.in_features = 300, .out_features = 200}); };
  std::optional<nn::Linear<float>> l1, l2;
  std::thread t1([&] { l1.emplace(build()); });
  std::thread t2([&] { l2.emplace(build()); });
  t1.join();
  t2.join();
  const float bound = 1.0f / std::sqrt(300.0f);
  for (auto* l : {&*l1, &*l2}) {
    const auto& w = l->weight();
    EXPECT_TRUE(std::all_of(w.data(), w.data() + w.size(), [&](float v) { return std::abs(v) <= bound; }));
  }
  EXPECT_FALSE(std::equal(l1->weight().data(), l1->weight().data() + l1->weight().size(), l2->weight().data()));
}

// Cache sizes come from sysfs where Linux reports them, else from CPUID (virtual machines may
// hide the first but not the second); where both report a level, they agree (Linux reads the
// same CPUID leaves). On x86 some source must report L2, or the kernels would fall back to a
// guess.
TEST(Platform, CacheSizesComeFromSysfsElseCpuid) {
  namespace p = bnrelu::platform;
  for (int level : {1, 2}) {
    SCOPED_TRACE("L" + std::to_string(level));
    const auto sysfs = p::sysfs_cache_bytes(level), cpuid = p::cpuid_cache_bytes(level);
    if (sysfs > 0 && cpuid > 0) {
      EXPECT_EQ(sysfs, cpuid);
    }
    EXPECT_EQ(p::cache_bytes(level), sysfs > 0 ? sysfs : cpuid);
  }
#if defined(__x86_64__) || defined(__i386__)
  const auto l2 = p::cache_bytes(2);
  ASSERT_GT(l2, 0) << "neither sysfs nor CPUID reports an L2";
  EXPECT_GE(l2, bnrelu::Index{128} << 10);
  EXPECT_LE(l2, bnrelu::Index{64} << 20);
  EXPECT_EQ(l2 % 1024, 0);
#endif
  const auto llc = p::last_level_cache_bytes();
  EXPECT_GE(llc, bnrelu::Index{1} << 20);
  EXPECT_EQ(p::last_level_cache_bytes(12345) == 12345, p::cache_bytes(3) <= 0 && p::cache_bytes(4) <= 0);
}
