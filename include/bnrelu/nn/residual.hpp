// A residual block: y = relu(main(x) + shortcut(x)), with the main branch's final batch norm,
// the add and the ReLU run as one pass forward and one backward.
#pragma once

#include <algorithm>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../kernels/relu.hpp"
#include "identity.hpp"
#include "layer.hpp"
#include "relu.hpp"

namespace bnrelu::nn {

class BatchNormReducer;  // batchnorm.hpp

namespace detail {

// A main branch whose last layer is a batch norm that can add a shortcut before its ReLU:
// a Sequential (forward_head, backward_head, back) ending in BatchNorm2d.
template <class M>
concept EndsInAddReLUFusable = requires(M& m) {
  m.back();
  requires std::remove_cvref_t<decltype(m.back())>::fusable_with_add_relu;
};

}  // namespace detail

// y = relu(main(x) + shortcut(x)) over N x C x H x W; the shortcut defaults to the identity,
// and a projection (Sequential of a 1x1 strided Conv2d and a BatchNorm2d) is the usual other.
// Backward adds the two branches' input gradients. State names are "main.<name>" and
// "shortcut.<name>", as a PyTorch module with attributes main and shortcut names them.
//
// When main is a Sequential ending in BatchNorm2d and fusion is on (the default), that batch
// norm, the add and the ReLU run as one pass: forward reads the batch norm's input and the
// shortcut and writes y; backward recomputes the ReLU mask from the two and writes the batch
// norm's input gradient and the shortcut's gradient in one pass. Results and gradients are the
// bits of the unfused chain (set_fusion(false)), which runs batch norm, add and ReLU apart.
// Training keeps the shortcut's output for the backward (the unfused chain keeps the sum
// instead). A SyncBatchNorm (set_batchnorm_reducer) runs unfused.
template <Layer Main, Layer Shortcut = Identity<typename Main::value_type>>
class Residual : public Module {
 public:
  using value_type = typename Main::value_type;
  using T = value_type;
  using input_type = Tensor<T, 4>;
  using output_type = Tensor<T, 4>;
  static_assert(std::is_same_v<T, typename Shortcut::value_type>,
                "Residual: main and shortcut must have the same element type");
  static constexpr bool fusable = detail::EndsInAddReLUFusable<Main>;

  explicit Residual(Main main, Shortcut shortcut = Shortcut{})
      : main_(std::move(main)), shortcut_(std::move(shortcut)) {}

  Main& main() { return main_; }
  const Main& main() const { return main_; }
  Shortcut& shortcut() { return shortcut_; }
  const Shortcut& shortcut() const { return shortcut_; }

  // Fused BatchNorm+Add+ReLU (default true), passed on to the branches' own fusion. Never
  // changes names, results or gradients.
  void set_fusion(bool on) {
    fusion_ = on;
    if constexpr (requires { main_.set_fusion(on); }) main_.set_fusion(on);
    if constexpr (requires { shortcut_.set_fusion(on); }) shortcut_.set_fusion(on);
  }
  bool fusion() const { return fusion_; }

  void train(bool on = true) {
    if (on && inference_only_)
      throw std::logic_error("Residual: fuse_for_inference made this block inference-only; it cannot train");
    Module::train(on);
    main_.train(on);
    shortcut_.train(on);
    relu_.train(on);
  }
  void eval() { train(false); }

  void zero_grad() {
    main_.zero_grad();
    shortcut_.zero_grad();
  }

  // Both branches' output shape, which must agree; shape_error naming the branch otherwise.
  Dims<4> output_dims(const Dims<4>& in) const {
    detail::check_rank_dims("Residual", in);
    const Dims<4> a = main_.output_dims(in);
    const Dims<4> b = shortcut_.output_dims(in);
    if (a != b)
      throw shape_error("Residual: the main branch gives " + shape_string(a) + " but the shortcut " +
                        shape_string(b) + " for input " + shape_string(in));
    return a;
  }

  Tensor<T, 4> forward(const Tensor<T, 4>& x) {
    output_dims(dims_of(x));
    ran_training_ = false;
    return finish(x, shortcut_output(x));
  }
  Tensor<T, 4> forward(Tensor<T, 4>&& x) {
    output_dims(dims_of(x));
    ran_training_ = false;
    auto s = shortcut_output(x);
    return finish(std::move(x), std::move(s));
  }

  Tensor<T, 4> backward(const Tensor<T, 4>& dy) { return backward(Tensor<T, 4>(dy)); }
  Tensor<T, 4> backward(Tensor<T, 4>&& dy) {
    if (!ran_training_) detail::no_forward("Residual");
    detail::check_grad_dims("Residual", out_dims_, dims_of(dy));
    Tensor<T, 4> dx, ds;
    if constexpr (fusable) {
      if (last_fused_) {
        Tensor<T, 4> dh = main_.back().backward_add_relu(std::move(dy), s_, ds_);
        dx = main_.backward_head(std::move(dh));
        ds = shortcut_.backward(std::move(ds_));
      }
    }
    if (!last_fused_) {
      Tensor<T, 4> dt = relu_.backward(std::move(dy));
      ds_ = dt;  // both branches get the gradient of the sum
      dx = main_.backward(std::move(dt));
      ds = shortcut_.backward(std::move(ds_));
    }
    kernels::add_into(dx.data(), ds.data(), dx.size());
    ds_ = std::move(ds);  // storage for the next backward
    spare_s_.give(std::move(s_));
    return dx;
  }

  // "main.<name>" then "shortcut.<name>".
  std::vector<ParamRef<T>> named_parameters() {
    auto out = prefixed("main", main_.named_parameters());
    for (auto& p : prefixed("shortcut", shortcut_.named_parameters())) out.push_back(std::move(p));
    return out;
  }
  std::vector<BufferRef<T>> named_buffers() {
    auto out = prefixed("main", main_.named_buffers());
    for (auto& b : prefixed("shortcut", shortcut_.named_buffers())) out.push_back(std::move(b));
    return out;
  }

  // f("main", main), f("shortcut", shortcut) (Composite).
  template <class F>
  void for_each_child(F&& f) {
    f(std::string("main"), main_);
    f(std::string("shortcut"), shortcut_);
  }

  // SyncBatchNorm for every batch norm of both branches (see Sequential).
  void set_batchnorm_reducer(const std::shared_ptr<BatchNormReducer>& r) {
    auto set = [&](auto& l) {
      if constexpr (requires { l.set_reducer(r); })
        l.set_reducer(r);
      else if constexpr (requires { l.set_batchnorm_reducer(r); })
        l.set_batchnorm_reducer(r);
    };
    set(main_);
    set(shortcut_);
  }

  // For inference: folds each branch's batch norms into the layer before them (see
  // Sequential::fuse_for_inference); the add and the ReLU then run as one pass over the main
  // branch's output. Inference-only afterwards.
  void fuse_for_inference() {
    if (inference_only_) return;
    if constexpr (requires { main_.fuse_for_inference(); }) main_.fuse_for_inference();
    if constexpr (requires { shortcut_.fuse_for_inference(); }) shortcut_.fuse_for_inference();
    eval();
    inference_only_ = true;
  }
  bool inference_only() const { return inference_only_; }

 private:
  // shortcut(x); an identity shortcut copies x into storage kept from the last step (a fresh
  // allocation of that size would page-fault on every step).
  Tensor<T, 4> shortcut_output(const Tensor<T, 4>& x) {
    if constexpr (requires { requires Shortcut::is_identity; }) {
      Tensor<T, 4> s = spare_s_.take(dims_of(x));
      std::copy_n(x.data(), x.size(), s.data());
      return shortcut_.forward(std::move(s));
    } else {
      return shortcut_.forward(x);
    }
  }

  // main(x), then the add and the ReLU with s = shortcut(x).
  template <class X>
  Tensor<T, 4> finish(X&& x, Tensor<T, 4>&& s) {
    Tensor<T, 4> y;
    bool fused = false;
    if constexpr (fusable) {
      fused = fusion_ && !inference_only_ && !(is_training() && main_.back().reducer());
      if (fused) {
        auto h = main_.forward_head(std::forward<X>(x));
        y = main_.back().forward_add_relu(std::move(h), s);
      }
    }
    if (!fused) {
      y = main_.forward(std::forward<X>(x));
      if (is_training()) {
        kernels::add_into(y.data(), s.data(), y.size());
        y = relu_.forward(std::move(y));  // in place; keeps the mask
      } else {
        kernels::add_relu_into(y.data(), s.data(), y.size());
      }
    }
    last_fused_ = fused;
    ran_training_ = is_training();
    out_dims_ = dims_of(y);
    if (ran_training_ && fused)
      s_ = std::move(s);  // the fused backward recomputes the mask from it
    else
      spare_s_.give(std::move(s));
    return y;
  }

  Main main_;
  Shortcut shortcut_;
  ReLU<T> relu_;          // the unfused chain's ReLU
  Tensor<T, 4> s_;        // cache: the shortcut's output of the last fused training forward
  Dims<4> out_dims_{};    // the last forward's output shape
  Tensor<T, 4> ds_;       // the shortcut's gradient; its storage is kept for the next backward
  detail::Recycler<T, 4> spare_s_;  // storage for the next identity shortcut's copy of x
  bool fusion_ = true;
  bool last_fused_ = false;
  bool ran_training_ = false;
  bool inference_only_ = false;
};

}  // namespace bnrelu::nn
