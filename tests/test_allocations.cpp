// Memory behaviour of a steady-state training step of the seed CNN: every tensor and workspace
// is reused, so the step touches no new page. malloc, calloc and realloc are replaced for this
// executable to count calls (Eigen's aligned allocation and operator new both go through
// malloc), so it is built without the sanitizers, which replace them too.
//
// What still calls malloc is Eigen's GEMM: it allocates its packing blocks per product when
// they exceed its 128 KiB stack limit, and malloc serves them from its free lists without
// touching new memory. Conv2 runs as Winograd's small products (packed on the stack); the
// Linear layers' products, one per block of columns, allocate.
#include <bnrelu/models/resnet.hpp>
#include <bnrelu/models/seed_cnn.hpp>
#include <bnrelu/nn/loss.hpp>
#include <bnrelu/nn/relu.hpp>
#include <bnrelu/nn/sequential.hpp>
#include <bnrelu/optim/sgd.hpp>
#include <bnrelu/random.hpp>

#include <gtest/gtest.h>

#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <vector>

namespace {
std::atomic<bool> counting{false};
std::atomic<long> allocations{0};
void count() {
  if (counting.load(std::memory_order_relaxed)) allocations.fetch_add(1, std::memory_order_relaxed);
}
}  // namespace

extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* malloc(std::size_t n) {
  count();
  return __libc_malloc(n);
}
void* calloc(std::size_t n, std::size_t size) {
  count();
  return __libc_calloc(n, size);
}
void* realloc(void* p, std::size_t n) {
  count();
  return __libc_realloc(p, n);
}
}

namespace {

using bnrelu::Index;

long minor_faults() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_minflt;
}

struct Counted {
  Counted() {
    allocations = 0;
    counting = true;
  }
  ~Counted() { counting = false; }
  long stop() {
    counting = false;
    return allocations.load();
  }
};

// The page faults of 3 calls of f, the fewest over 3 tries. A steady state that touches new
// memory does so in every try; a page the kernel reclaimed from the idle process (these
// machines run a memory-reclaim daemon, kdamond) costs a fault in one try, not in all three.
template <class F>
long steady_faults(F&& f) {
  long fewest = -1;
  for (int attempt = 0; attempt < 3 && fewest != 0; ++attempt) {
    const long before = minor_faults();
    for (int i = 0; i < 3; ++i) f();
    const long faults = minor_faults() - before;
    fewest = fewest < 0 ? faults : std::min(fewest, faults);
  }
  return fewest;
}

// Runs f until 5 calls in a row touch no new page (at most 100 calls); false if they never do.
// A step that allocates or grows something every time never gets there. The allocator's heaps
// (one per thread that allocates) settle within the first dozen calls.
template <class F>
bool warm_up(F&& f) {
  for (int calls = 0, quiet = 0; calls < 100; ++calls) {
    const long before = minor_faults();
    f();
    quiet = minor_faults() == before ? quiet + 1 : 0;
    if (quiet == 5) return true;
  }
  return false;
}

// One SGD training step of a model on fixed images of dims d and labels i % 10.
template <class Model>
class TrainingStep {
 public:
  TrainingStep(Model& model, const bnrelu::Dims<4>& d)
      : model_(model), opt_(model.named_parameters(), {.lr = 0.01, .momentum = 0.9}), x_(d), labels_(d[0]) {
    x_.setRandom();
    for (Index i = 0; i < d[0]; ++i) labels_[static_cast<std::size_t>(i)] = i % 10;
  }
  void operator()() {
    opt_.zero_grad();
    auto logits = model_.forward(x_);
    loss_.forward(logits, labels_);
    loss_.backward(dlogits_);
    model_.backward_params(std::move(dlogits_));
    opt_.step();
    dlogits_ = std::move(logits);  // hand the storage round: the next gradient reuses it
  }
  const bnrelu::Tensor<float, 4>& images() const { return x_; }

 private:
  Model& model_;
  bnrelu::optim::SGD<float> opt_;
  bnrelu::nn::CrossEntropyLoss<float> loss_;
  bnrelu::Tensor<float, 4> x_;
  std::vector<std::int64_t> labels_;
  bnrelu::Tensor<float, 2> dlogits_;
};

class SteadyState : public ::testing::TestWithParam<int> {};

TEST_P(SteadyState, TrainingStepReusesAllMemory) {
  bnrelu::set_num_threads(GetParam());
  bnrelu::manual_seed(0);
  auto model = bnrelu::models::seed_cnn<float>(1, 10);
  const Index N = 16;
  TrainingStep step(model, {N, 1, 28, 28});
  ASSERT_TRUE(warm_up(step)) << "no 5 steps in a row without touching new memory";
  Counted c;
  for (int i = 0; i < 3; ++i) step();
  const long calls = c.stop();
  EXPECT_EQ(steady_faults(step), 0) << "a steady-state step touched new memory";
  // Eigen packs on the stack up to 128 KiB (Winograd's small products), on the heap above:
  // Linear's products, one per block of columns (measured: 10 calls a step on one and on two
  // threads). The bound leaves room for another Eigen's blocking.
  EXPECT_LE(calls, 3 * 16) << "more malloc calls than Eigen's GEMM packing makes";
  // the checks are real: a bigger batch needs new, larger buffers
  bnrelu::Tensor<float, 4> bigger(4 * N, 1, 28, 28);
  bigger.setRandom();
  const long faults_bigger = minor_faults();
  Counted again;
  model.forward(bigger);
  EXPECT_GT(again.stop(), 0);
  EXPECT_GT(minor_faults() - faults_bigger, 0);
}

TEST_P(SteadyState, EvalForwardReusesAllMemory) {
  bnrelu::set_num_threads(GetParam());
  for (bool folded : {false, true}) {
    SCOPED_TRACE(folded ? "fuse_for_inference" : "eval");
    bnrelu::manual_seed(0);
    auto model = bnrelu::models::seed_cnn<float>(1, 10);
    model.eval();
    if (folded) model.fuse_for_inference();
    bnrelu::Tensor<float, 4> x(32, 1, 28, 28);
    x.setRandom();
    ASSERT_TRUE(warm_up([&] { model.forward(x); })) << "no 5 forwards in a row without touching new memory";
    Counted c;
    for (int i = 0; i < 3; ++i) model.forward(x);
    const long calls = c.stop();
    EXPECT_EQ(steady_faults([&] { model.forward(x); }), 0) << "a steady-state eval forward touched new memory";
    // the returned logits, and Eigen's heap-packed products
    EXPECT_LE(calls, 3 * 6) << "more malloc calls than Eigen's GEMM packing and the returned logits make";
  }
}

// infer on a const model takes its outputs from the calling thread's spares and hands every
// intermediate back: steady calls of one shape allocate only the returned logits and Eigen's
// heap-packed products, and touch no new page (without the spares, each batch-64 call of the
// seed CNN on one thread faulted in its 25 MB of activations afresh).
TEST_P(SteadyState, InferReusesAllMemory) {
  bnrelu::set_num_threads(GetParam());
  bnrelu::manual_seed(0);
  auto seed = bnrelu::models::seed_cnn<float>(1, 10);
  seed.eval();
  seed.fuse_for_inference();
  auto resnet = bnrelu::models::resnet20<float>(3, 10);
  resnet.fuse_for_inference();
  bnrelu::Tensor<float, 4> x(64, 1, 28, 28), images(8, 3, 16, 16);
  x.setRandom();
  images.setRandom();
  const auto& a = seed;
  const auto& b = resnet;
  for (auto [name, call] : {std::pair<const char*, std::function<void()>>{"seed CNN", [&] { a.infer(x); }},
                            {"ResNet-20", [&] { b.infer(images); }}}) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(warm_up(call)) << "no 5 infer calls in a row without touching new memory";
    Counted c;
    for (int i = 0; i < 3; ++i) call();
    const long calls = c.stop();
    EXPECT_EQ(steady_faults(call), 0) << "a steady-state infer touched new memory";
    EXPECT_LE(calls, 3 * 6) << "more malloc calls than Eigen's GEMM packing and the returned logits make";
  }
  // the spares are real, and release_infer_buffers frees them: the next call allocates again
  bnrelu::nn::release_infer_buffers();
  Counted again;
  a.infer(x);
  EXPECT_GT(again.stop(), 6);
}

// ResNet-20: residual blocks hand storage between their branches and across block boundaries
// (the identity shortcut's copy of x, the shortcut's gradient written over dy, which takes
// dy's storage).
TEST_P(SteadyState, ResNet20TrainingStepReusesAllMemory) {
  bnrelu::set_num_threads(GetParam());
  bnrelu::manual_seed(0);
  auto model = bnrelu::models::resnet20<float>(3, 10);
  TrainingStep step(model, {8, 3, 16, 16});
  long calls[2] = {};  // malloc calls of 3 steps, fused then unfused
  for (bool fused : {true, false}) {
    SCOPED_TRACE(fused ? "fused" : "unfused");
    model.set_fusion(fused);
    ASSERT_TRUE(warm_up(step)) << "no 5 steps in a row without touching new memory";
    Counted c;
    for (int i = 0; i < 3; ++i) step();
    calls[fused ? 0 : 1] = c.stop();
    EXPECT_EQ(steady_faults(step), 0) << "a steady-state step touched new memory";
  }
  // the unfused blocks hand their storage round as the fused ones do (both call Eigen alike)
  EXPECT_LE(calls[1], calls[0]) << "the unfused step allocates what the fused one reuses";
  model.eval();
  ASSERT_TRUE(warm_up([&] { model.forward(step.images()); })) << "no 5 eval forwards in a row without touching new memory";
}

// README's loop drops what forward and backward return, so each step allocates them anew.
// malloc keeps the memory they free (platform/memory.hpp, set when the first layer is built),
// so steady steps touch no new page, fused or not, for tensors below and above glibc's largest
// mmap threshold (32 MiB), which would otherwise be mapped and faulted in again every step.
TEST_P(SteadyState, DroppedOutputsReuseFreedMemory) {
  bnrelu::set_num_threads(GetParam());
  bnrelu::manual_seed(0);
  for (auto d : {bnrelu::Dims<4>{8, 16, 28, 28}, bnrelu::Dims<4>{40, 64, 64, 64}}) {
    for (bool fused : {true, false}) {
      SCOPED_TRACE(bnrelu::shape_string(d) + (fused ? " fused" : " unfused"));
      auto model = bnrelu::nn::Sequential(bnrelu::nn::BatchNorm2d<float>({.num_features = d[1]}),
                                          bnrelu::nn::ReLU<float>());
      ASSERT_TRUE(bnrelu::platform::keep_freed_memory());
      model.set_fusion(fused);
      bnrelu::Tensor<float, 4> x(d), dy(d);
      x.setRandom();
      dy.setRandom();
      auto step = [&] {
        auto y = model.forward(x);
        auto dx = model.backward(dy);
      };
      ASSERT_TRUE(warm_up(step)) << "no 5 steps in a row without touching new memory";
      EXPECT_EQ(steady_faults(step), 0) << "a steady-state step touched new memory";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Threads, SteadyState, ::testing::Values(1, 2));

}  // namespace
