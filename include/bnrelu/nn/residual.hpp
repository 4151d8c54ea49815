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

#include "infer_arena.hpp"
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
// norm, the add and the ReLU run as one kernel each way: forward reads the batch norm's input
// and the shortcut and writes y and the ReLU's mask (one bit per value); backward reads the
// mask, and writes the batch norm's input gradient and, for a projection shortcut, the
// shortcut's gradient (kernels/batchnorm.hpp, Addend); an identity shortcut's gradient, dy
// through the mask, is added to the block's input gradient straight from dy. Results and
// gradients are the bits of the unfused chain (set_fusion(false)), which runs batch norm, add
// and ReLU apart.
// Training keeps the shortcut's output until the backward (for 1 x 1 maps the fused backward
// recomputes the mask from it); the fused backward writes a projection's gradient over dy (over
// the shortcut's output for 1 x 1 maps, whatever the shortcut), the unfused one hands the
// shortcut the ReLU's masked gradient, which the main branch only reads. A SyncBatchNorm
// (set_batchnorm_reducer) runs unfused.
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

  // The eval-mode output relu(main.infer(x) + shortcut.infer(x)), computed without touching the
  // block: any number of threads may call it at once while nobody changes the block. After
  // fuse_for_inference folded the main branch's last batch norm into a Conv2d, that
  // convolution's epilogue adds the shortcut (x itself for the identity) and applies the ReLU.
  Tensor<T, 4> infer(const Tensor<T, 4>& x) const {
    output_dims(dims_of(x));
    if constexpr (requires { main_.infer_add_relu(x, x); main_.folded_into_add_target(); }) {
      if (main_.folded_into_add_target()) {
        if constexpr (std::is_same_v<Shortcut, Identity<T>>) return main_.infer_add_relu(x, x);
        Tensor<T, 4> s = shortcut_.infer(x);
        Tensor<T, 4> y = main_.infer_add_relu(x, s);
        detail::infer_recycle(std::move(s));
        return y;
      }
    }
    Tensor<T, 4> y = main_.infer(x);
    Tensor<T, 4> s = shortcut_.infer(x);
    kernels::add_relu_into(y.data(), s.data(), y.size());
    detail::infer_recycle(std::move(s));
    return y;
  }

  Tensor<T, 4> backward(const Tensor<T, 4>& dy) { return backward(Tensor<T, 4>(dy)); }
  Tensor<T, 4> backward(Tensor<T, 4>&& dy) {
    if (!ran_training_) detail::no_forward("Residual");
    detail::check_grad_dims("Residual", dims_of(s_), dims_of(dy));
    Tensor<T, 4> dx;
    if constexpr (fusable) {
      if (last_fused_) {
        auto& bn = main_.back();
        if (std::is_same_v<Shortcut, Identity<T>> && bn.keeps_add_mask()) {
          // the identity's gradient, dy through the mask, goes into dx straight from dy: never
          // written as a tensor of its own
          Tensor<T, 4> dh = bn.backward_add_relu_deferred(dy, s_);
          dx = main_.backward_head(std::move(dh));
          bn.add_shortcut_grad(dx, dy);
          spare_x_.give(std::move(s_));  // storage for the next step's copy of x
          recycle_output(std::move(dy));
          ran_training_ = false;
          return dx;
        }
        // s_ becomes the shortcut's gradient (written over dy, or over s_ itself for 1 x 1 maps)
        Tensor<T, 4> dh = bn.backward_add_relu(std::move(dy), s_, s_);
        dx = main_.backward_head(std::move(dh));
      }
    }
    if (!last_fused_) {
      // both branches get the gradient of the sum: the main branch reads it, the shortcut takes it
      Tensor<T, 4> dt = relu_.backward(std::move(dy));
      dx = main_.backward(std::as_const(dt));
      std::swap(s_, dt);
      recycle_output(std::move(dt));  // the shortcut's output: storage for the next forward's output
    }
    Tensor<T, 4> ds = shortcut_.backward(std::move(s_));
    kernels::add_into(dx.data(), ds.data(), dx.size());
    spare_x_.give(std::move(ds));  // storage for the next step's copy of x
    ran_training_ = false;
    return dx;
  }

  // Takes back an output of this block that is no longer needed, for the next output (the
  // enclosing Sequential does this in eval).
  void recycle_output(Tensor<T, 4>&& y) {
    if constexpr (requires { main_.recycle_output(std::move(y)); }) main_.recycle_output(std::move(y));
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
  // shortcut(x), given a copy of x it may keep. The copy goes into storage kept from the last
  // step (the input gradient the shortcut returned, or, when an identity's gradient was
  // deferred, the shortcut's output), and the shortcut hands back its previous
  // copy as storage for its next input gradient: a steady-state step allocates nothing here.
  Tensor<T, 4> shortcut_output(const Tensor<T, 4>& x) {
    Tensor<T, 4> copy = spare_x_.take(dims_of(x));
    std::copy_n(x.data(), x.size(), copy.data());
    return shortcut_.forward(std::move(copy));
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
        main_.recycle_head_output(std::move(h));  // eval: h is not kept (training moved it)
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
    if (ran_training_)
      s_ = std::move(s);  // backward's storage for the shortcut's gradient, or that gradient's source
    else
      spare_x_.give(std::move(s));  // the size of x for an identity shortcut
    return y;
  }

  Main main_;
  Shortcut shortcut_;
  ReLU<T> relu_;          // the unfused chain's ReLU
  Tensor<T, 4> s_;        // cache: the shortcut's output of the last training forward; backward
                          // replaces it with the shortcut's gradient, or recycles it when an
                          // identity's gradient is deferred
  detail::Recycler<T, 4> spare_x_;  // storage for the next copy of x given to the shortcut
  bool fusion_ = true;
  bool last_fused_ = false;
  bool ran_training_ = false;
  bool inference_only_ = false;
};

}  // namespace bnrelu::nn
