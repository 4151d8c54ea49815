// The layer contract, written once.
//
// A layer L with element type L::value_type offers
//   y  = l.forward(x)    training mode caches what backward needs; eval mode caches nothing
//   dx = l.backward(dy)  dLoss/dx for the last training-mode forward; ADDS into parameter grads;
//                        std::logic_error if there was none
//   l.train(bool), l.eval(), l.is_training(), l.zero_grad()
//   l.named_parameters() -> std::vector<ParamRef<T>>, l.named_buffers() -> std::vector<BufferRef<T>>
//   l.output_dims(in_dims)  the output shape for an input shape; shape_error if it is invalid
// Shapes are checked, and shape_error thrown, before any state changes. The Layer concept below
// checks these; input_type names the tensor a layer takes, when it takes one rank only.
#pragma once

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../error.hpp"
#include "../platform/memory.hpp"
#include "../tensor.hpp"

namespace bnrelu::nn {

namespace detail {
// The input a layer is checked with: its input_type, or N x C x H x W for layers of any rank.
template <class L>
struct probe_input {
  using type = Tensor<typename L::value_type, 4>;
};
template <class L>
  requires requires { typename L::input_type; }
struct probe_input<L> {
  using type = typename L::input_type;
};
}  // namespace detail

// What Sequential, Residual and the checkpoint code need of a layer; a type that misses a piece
// fails here, with the missing expression named (static_assert(bnrelu::nn::Layer<MyLayer>) after
// a layer of your own checks it where it is declared). A layer that holds other layers must
// also offer for_each_child (Composite, below), or checkpoints refuse it.
template <class L>
concept Layer = requires(L& l, const L& cl, typename detail::probe_input<L>::type x) {
  typename L::value_type;
  l.train(true);
  l.eval();
  { cl.is_training() } -> std::convertible_to<bool>;
  l.zero_grad();
  { l.named_parameters() } -> std::same_as<std::vector<ParamRef<typename L::value_type>>>;
  { l.named_buffers() } -> std::same_as<std::vector<BufferRef<typename L::value_type>>>;
  l.forward(x);
  l.backward(l.forward(x));
  cl.output_dims(dims_of(x));
};

// Training/eval mode, shared by every layer.
class Module {
 public:
  // The first layer a program builds asks malloc to keep freed memory for the next allocations
  // (platform/memory.hpp): outputs a loop drops each step then cost no fresh page faults.
  Module() { platform::keep_freed_memory(); }

  // Sets training mode (on) or eval mode (!on).
  void train(bool on = true) { training_ = on; }
  // Same as train(false).
  void eval() { train(false); }
  bool is_training() const { return training_; }

 private:
  bool training_ = true;
};

// Composite layers (Sequential, Residual) offer for_each_child(f), calling f(name, child) for
// each layer they hold, name being the child's state_dict prefix ("0", "main"). The walks
// below reach nested layers through it.
template <class M>
concept Composite = requires(M& m) { m.for_each_child([](const std::string&, auto&) {}); };

// Calls f(name, counter) for every num_batches_tracked counter of a layer or composite
// (nested ones included), with its PyTorch state_dict name.
template <class M, class F>
void for_each_batch_counter(M& m, const std::string& prefix, F&& f) {
  if constexpr (Composite<M>) {
    m.for_each_child([&](const std::string& name, auto& layer) { for_each_batch_counter(layer, prefix + name + ".", f); });
  } else if constexpr (requires { m.num_batches_tracked() = 0; m.options().track_running_stats; }) {
    if (m.options().track_running_stats) f(prefix + "num_batches_tracked", m.num_batches_tracked());
  }
}

// Whether m, or a layer inside it, carries a batch norm folded in by fuse_for_inference (or
// fold_affine): its parameters then mean something else than the PyTorch module's of the same
// names, so its state_dict is no checkpoint.
template <class M>
bool any_folded(M& m) {
  bool folded = false;
  if constexpr (requires { m.inference_only(); }) folded = m.inference_only();
  if constexpr (requires { m.folded(); }) folded = folded || m.folded();
  if constexpr (Composite<M>)
    m.for_each_child([&](const std::string&, auto& layer) { folded = folded || any_folded(layer); });
  return folded;
}

// std::logic_error unless every batch norm of m (a running_mean among its buffers) has its
// num_batches_tracked reachable through for_each_child: a layer that holds other layers but
// does not offer it would lose their counters from a checkpoint.
template <class M>
void check_counters_reachable(M& m, const std::string& what) {
  std::vector<std::string> counters;
  for_each_batch_counter(m, "", [&](const std::string& name, std::int64_t&) { counters.push_back(name); });
  const std::string suffix = "running_mean";
  for (const auto& b : m.named_buffers()) {
    if (b.name.size() < suffix.size() || b.name.compare(b.name.size() - suffix.size(), suffix.size(), suffix) != 0)
      continue;
    const std::string counter = b.name.substr(0, b.name.size() - suffix.size()) + "num_batches_tracked";
    if (std::find(counters.begin(), counters.end(), counter) == counters.end())
      throw std::logic_error(what + ": no " + counter + " for buffer " + b.name +
                             "; a layer that holds other layers must offer for_each_child (nn::Composite)");
  }
}

// v with each name made "<prefix>.<name>".
template <class Ref>
std::vector<Ref> prefixed(const std::string& prefix, std::vector<Ref> v) {
  for (auto& r : v) r.name = prefix + "." + r.name;
  return v;
}

namespace detail {

// One tensor's storage kept from one call to the next: a layer hands back the gradient it was
// given, or the input it no longer needs, and takes it again for a later output of the same
// element count. This is how a steady-state training step reuses every activation-sized buffer
// instead of allocating (and page-faulting) it anew.
template <class T, int Rank>
class Recycler {
 public:
  // A tensor of dims d: the kept storage when its element count matches, else a new one.
  Tensor<T, Rank> take(const Dims<Rank>& d) {
    Tensor<T, Rank> t = std::move(spare_);
    t.resize(d);  // Eigen keeps the storage when the element count is unchanged
    return t;
  }
  void give(Tensor<T, Rank>&& t) {
    if (t.size() > 0) spare_ = std::move(t);
  }
  void clear() { spare_ = Tensor<T, Rank>(); }

 private:
  Tensor<T, Rank> spare_;
};

// Bounds on sizes, so that no size arithmetic can overflow: a size option (channels, features,
// kernel size, stride, padding, dilation) is at most kMaxExtent, and a tensor holds at most
// kMaxElements elements (1 PiB of floats, more than any machine allocates).
inline constexpr Index kMaxExtent = (Index{1} << 31) - 1;
inline constexpr Index kMaxElements = Index{1} << 48;

// The number of elements of a tensor of dims d; shape_error naming the layer when a dimension
// is negative or the count exceeds kMaxElements (checked before any product can overflow).
template <class Range>
Index checked_elements(const char* layer, const Range& d, const char* what = "input") {
  Index n = 1;
  for (auto v : d)
    if (v < 0) throw shape_error(std::string(layer) + ": negative dimension in " + what + " " + shape_string(d));
  for (auto v : d) {
    if (v != 0 && n > kMaxElements / v)
      throw shape_error(std::string(layer) + ": " + what + " " + shape_string(d) + " has more than 2^48 elements");
    n *= v;
  }
  return n;
}

template <std::size_t Rank>
void check_rank_dims(const char* layer, const Dims<Rank>& d) {
  checked_elements(layer, d);
}

[[noreturn]] inline void inference_only(const char* layer) {
  throw std::logic_error(std::string(layer) +
                         ": a BatchNorm was folded into this layer for inference; it cannot train");
}

[[noreturn]] inline void no_forward(const char* layer) {
  throw std::logic_error(std::string(layer) +
                         ": backward called without a preceding training-mode forward");
}

template <std::size_t Rank>
void check_grad_dims(const char* layer, const Dims<Rank>& expected, const Dims<Rank>& got) {
  if (expected != got)
    throw shape_error(std::string(layer) + ": backward expected gradient of shape " +
                      shape_string(expected) + " (the last forward's output), got " +
                      shape_string(got));
}

inline void check_option(bool ok, const char* layer, const std::string& what) {
  if (!ok) throw shape_error(std::string(layer) + ": invalid option: " + what);
}

// A size option in [lo, kMaxExtent].
inline void check_extent(Index v, Index lo, const char* layer, const char* name) {
  check_option(v >= lo && v <= kMaxExtent, layer,
               std::string(name) + " must be in [" + std::to_string(lo) + ", 2^31 - 1], got " + std::to_string(v));
}

}  // namespace detail

}  // namespace bnrelu::nn
