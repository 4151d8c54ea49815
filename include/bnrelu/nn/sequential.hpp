// A compile-time chain of layers; runs each BatchNorm followed by ReLU as one fused pass.
#pragma once

#include <array>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "infer_arena.hpp"
#include "layer.hpp"

namespace bnrelu::nn {

class BatchNormReducer;  // batchnorm.hpp

namespace detail {

template <class L>
concept HasInputType = requires { typename L::input_type; };

template <class L>
concept FusableBatchNorm = requires { requires L::fusable_with_relu; };

template <class L>
concept IsReLU = requires { requires L::is_relu; };

// A layer an eval-mode batch norm can be folded into, and a batch norm that can be folded.
template <class L>
concept FoldTarget = requires(L& l, const std::vector<double>& v) { l.fold_affine(v, v, true); };
template <class L>
concept Foldable = requires(const L& l, std::vector<double>& v) { l.eval_affine(v, v); };
template <class L>
concept AppliesReLU = requires { requires L::applies_relu; };
// A layer whose infer can end in the max pool of layer P (Conv2d::infer_max_pooled).
template <class L, class P>
concept PoolsInto = requires(const L& l, const P& p, const typename L::input_type& x) { l.infer_max_pooled(x, p); };

// The input type of a chain: the first layer's, skipping rank-agnostic layers (ReLU).
template <class T, class... L>
struct chain_input {
  using type = Tensor<T, 4>;
};
template <class T, class First, class... Rest>
struct chain_input<T, First, Rest...> {
  using type = typename std::conditional_t<HasInputType<First>, First,
                                           chain_input<T, Rest...>>::type;
};
template <class T, HasInputType First, class... Rest>
struct chain_input<T, First, Rest...> {
  using type = typename First::input_type;
};

// The output type after layers I.. given input X.
template <class X, class... L>
struct chain_output {
  using type = X;
};
template <class X, class First, class... Rest>
struct chain_output<X, First, Rest...> {
  using type = typename chain_output<decltype(std::declval<First&>().forward(std::declval<X>())),
                                     Rest...>::type;
};

template <class X>
struct tensor_rank;
template <class T, int R>
struct tensor_rank<Tensor<T, R>> {
  static constexpr int value = R;
};

}  // namespace detail

template <Layer... Layers>
class Sequential : public Module {
  static_assert(sizeof...(Layers) > 0, "Sequential needs at least one layer");

 public:
  using value_type = typename std::tuple_element_t<0, std::tuple<Layers...>>::value_type;
  static_assert((std::is_same_v<value_type, typename Layers::value_type> && ...),
                "every layer of a Sequential must have the same element type");
  using input_type = typename detail::chain_input<value_type, Layers...>::type;
  using output_type = typename detail::chain_output<input_type, Layers...>::type;
  static constexpr std::size_t size = sizeof...(Layers);

  explicit Sequential(Layers... layers) : layers_(std::move(layers)...) {}

  template <std::size_t I>
  auto& get() { return std::get<I>(layers_); }
  template <std::size_t I>
  const auto& get() const { return std::get<I>(layers_); }

  // Fused BatchNorm+ReLU (default true). Never changes names, results or gradients.
  // Nested layers with a fusion switch (Sequential, Residual) follow it.
  void set_fusion(bool on) {
    fusion_ = on;
    for_each_indexed([&](std::size_t, auto& l) {
      if constexpr (requires { l.set_fusion(on); }) l.set_fusion(on);
    });
  }
  bool fusion() const { return fusion_; }

  void train(bool on = true) {
    if (on && inference_only_)
      throw std::logic_error("Sequential: fuse_for_inference made this model inference-only; it cannot train");
    Module::train(on);
    std::apply([on](auto&... l) { (l.train(on), ...); }, layers_);
  }
  void eval() { train(false); }

  void zero_grad() {
    std::apply([](auto&... l) { (l.zero_grad(), ...); }, layers_);
  }

  // Output shape for an input shape; shape_error naming the first layer that rejects it.
  auto output_dims(const Dims<detail::tensor_rank<input_type>::value>& in) const {
    return dims_from<0>(in);
  }

  // Shapes are checked through the whole chain before any layer runs. Given an rvalue, the first
  // layer may keep x's storage instead of copying it.
  output_type forward(const input_type& x) { return forward_checked(x); }
  output_type forward(input_type&& x) { return forward_checked(std::move(x)); }

  // dLoss/dx. Given an rvalue, the last layer keeps dy's storage for its next output.
  input_type backward(const output_type& dy) {
    check_backward();
    return backward_to<size, 0>(dy);
  }
  input_type backward(output_type&& dy) {
    check_backward();
    return backward_to<size, 0>(std::move(dy));
  }

  // Accumulates the parameter gradients as backward does, but does not compute dLoss/dx for the
  // model's input (PyTorch skips it too when the input does not require grad): the first
  // Conv2d's input-gradient product is the one saved.
  void backward_params(output_type dy) {
    check_backward();
    using first_output = decltype(std::declval<layer_t<0>&>().forward(std::declval<input_type>()));
    if constexpr (fused_pair<0>() || !requires(layer_t<0>& l, first_output&& d) { l.backward_params(std::move(d)); }) {
      backward_to<size, 0>(std::move(dy));
    } else {
      std::get<0>(layers_).backward_params(backward_to<size, 1>(std::move(dy)));
    }
  }

  // Makes every batch norm of the model (nested Sequentials included) a SyncBatchNorm whose
  // statistics and gradient sums are combined by r across data-parallel replicas; null makes
  // them local again. bnrelu::dist::DataParallel sets this.
  void set_batchnorm_reducer(const std::shared_ptr<BatchNormReducer>& r) {
    for_each_indexed([&](std::size_t, auto& l) {
      if constexpr (requires { l.set_reducer(r); })
        l.set_reducer(r);
      else if constexpr (requires { l.set_batchnorm_reducer(r); })
        l.set_batchnorm_reducer(r);
    });
  }

  // For inference: switches to eval mode and folds every batch norm of this Sequential that
  // follows a Conv2d or Linear into that layer's weight and bias, with the ReLU after it (if
  // any) applied in the same pass over the output. Results equal the eval-mode model's up to
  // rounding. The model is inference-only afterwards (train() throws std::logic_error); its
  // parameters are the folded ones, and a folded layer without bias gains one. A batch norm
  // without running statistics (which uses batch statistics in eval) is left as it is. Nested
  // Sequentials and Residuals fold their own, first. Calling it again changes nothing;
  // shape_error if a batch norm's channels do not match the layer before it (this Sequential is
  // then left as it was; a nested one that folded before the failure stays folded).
  void fuse_for_inference() {
    if (inference_only_) return;
    fold_from<0, false>();  // check every site first: a failure leaves the model as it was
    for_each_indexed([](std::size_t, auto& l) {
      if constexpr (requires { l.fuse_for_inference(); }) l.fuse_for_inference();
    });
    eval();
    fold_from<0, true>();
    for_each_indexed([](std::size_t, auto& l) {
      if constexpr (requires { l.prepare_inference(); }) l.prepare_inference();
    });
    inference_only_ = true;
  }

  // Whether fuse_for_inference has run.
  bool inference_only() const { return inference_only_; }

  // The eval-mode output for x, whatever the training flag: every layer's infer (a batch norm
  // and the ReLU after it in one pass; a folded layer covers the batch norm and ReLU folded
  // into it). It reads the model and changes nothing, each call computing in buffers of its
  // own, so any number of threads may call it at once on one model while nobody changes the
  // model. The same values as forward in eval mode.
  output_type infer(const input_type& x) const {
    output_dims(dims_of(x));
    return infer_from<0>(x);
  }

  // Whether infer_add_relu applies: fuse_for_inference folded the chain's last layer, a batch
  // norm without a ReLU, into a Conv2d before it, whose epilogue can then add and apply a ReLU.
  bool folded_into_add_target() const {
    if constexpr (ends_in_add_target())
      return folded_[size - 2] && !std::get<size - 2>(layers_).folded_relu();
    else
      return false;
  }

  // relu(infer(x) + s), the add and the ReLU computed in the epilogue of the layer the last batch
  // norm was folded into (a residual block's end after fuse_for_inference): the same bits as
  // infer, an add and a ReLU apart. Only when folded_into_add_target() (std::logic_error
  // otherwise); shape_error if s does not have the output's shape.
  output_type infer_add_relu(const input_type& x, const output_type& s) const {
    if (!folded_into_add_target())
      throw std::logic_error("Sequential: infer_add_relu needs a last batch norm folded into the layer before it");
    if constexpr (ends_in_add_target()) {
      output_dims(dims_of(x));
      const auto& target = std::get<size - 2>(layers_);
      if constexpr (size == 2) {
        return target.infer_add_relu(x, s);
      } else {
        auto h = infer_from<0, size - 2>(x);
        auto y = target.infer_add_relu(h, s);
        detail::infer_recycle(std::move(h));
        return y;
      }
    } else {
      return infer(x);  // not reached: folded_into_add_target() is false
    }
  }

  // How many layers layer i computes: 1, or after fuse_for_inference folded the batch norm
  // after it (and a ReLU after that) into it, 2 or 3; the layers it covers then pass through.
  std::size_t layers_folded_into(std::size_t i) const {
    static constexpr auto spans = []<std::size_t... I>(std::index_sequence<I...>) {
      return std::array<std::size_t, size>{span_if_folded<I>()...};
    }(std::index_sequence_for<Layers...>{});
    return folded_[i] ? spans[i] : 1;
  }

  // "<index>.<name>" for every layer's parameters, in layer order (PyTorch's state_dict order).
  std::vector<ParamRef<value_type>> named_parameters() {
    std::vector<ParamRef<value_type>> out;
    for_each_indexed([&](std::size_t i, auto& layer) {
      for (auto& p : prefixed(std::to_string(i), layer.named_parameters())) out.push_back(std::move(p));
    });
    return out;
  }
  std::vector<BufferRef<value_type>> named_buffers() {
    std::vector<BufferRef<value_type>> out;
    for_each_indexed([&](std::size_t i, auto& layer) {
      for (auto& b : prefixed(std::to_string(i), layer.named_buffers())) out.push_back(std::move(b));
    });
    return out;
  }

  // f(index, layer) for every layer in order.
  template <class F>
  void for_each_indexed(F&& f) {
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (f(I, std::get<I>(layers_)), ...);
    }(std::index_sequence_for<Layers...>{});
  }

  // f("<index>", layer) for every layer in order (Composite).
  template <class F>
  void for_each_child(F&& f) {
    for_each_indexed([&](std::size_t i, auto& layer) { f(std::to_string(i), layer); });
  }

  // The chain without its last layer, forward and backward, and that last layer: Residual runs
  // a main branch's final batch norm itself, fused with the add and the ReLU. forward_head
  // checks shapes through the whole chain, as forward does.
  template <class X>
  auto forward_head(X&& x) {
    output_dims(dims_of(x));
    ran_training_ = false;
    auto y = forward_from<0, kNoProducer, size - 1>(std::forward<X>(x));
    last_fused_ = fusion_;
    ran_training_ = is_training();
    return y;
  }
  template <class D>
  input_type backward_head(D&& dy) {
    check_backward();
    return backward_to<size - 1, 0>(std::forward<D>(dy));
  }
  // Takes back an output of forward_head that is no longer needed (its storage goes to the
  // layer that made it, for its next output).
  template <class Y>
  void recycle_head_output(Y&& y) {
    if constexpr (size >= 2) {  // a chain of one layer has no head to recycle into
      if constexpr (requires(layer_t<size - 2>& l) { l.recycle_output(std::move(y)); })
        std::get<size - 2>(layers_).recycle_output(std::move(y));
    }
  }
  // Takes back an output of this chain that is no longer needed, for the next output.
  void recycle_output(output_type&& y) {
    if constexpr (requires(layer_t<size - 1>& l) { l.recycle_output(std::move(y)); })
      std::get<size - 1>(layers_).recycle_output(std::move(y));
  }
  auto& back() { return std::get<size - 1>(layers_); }
  const auto& back() const { return std::get<size - 1>(layers_); }

 private:
  template <std::size_t I>
  using layer_t = std::tuple_element_t<I, std::tuple<Layers...>>;

  // Layers I and I+1 are BatchNorm then ReLU.
  template <std::size_t I>
  static constexpr bool fused_pair() {
    if constexpr (I + 1 < size)
      return detail::FusableBatchNorm<layer_t<I>> && detail::IsReLU<layer_t<I + 1>>;
    else
      return false;
  }

  // Layer I is a Conv2d or Linear followed by a foldable batch norm.
  template <std::size_t I>
  static constexpr bool fold_site() {
    if constexpr (I + 1 < size)
      return detail::FoldTarget<layer_t<I>> && detail::Foldable<layer_t<I + 1>>;
    else
      return false;
  }

  // How many layers a folded layer I replaces: itself, the batch norm, and a ReLU after it.
  template <std::size_t I>
  static constexpr std::size_t fold_span() {
    if constexpr (detail::AppliesReLU<layer_t<I + 1>>)
      return 2;
    else if constexpr (I + 2 < size)
      return detail::IsReLU<layer_t<I + 2>> ? 3 : 2;
    else
      return 2;
  }

  template <std::size_t I>
  static constexpr std::size_t span_if_folded() {
    if constexpr (fold_site<I>())
      return fold_span<I>();
    else
      return 1;
  }

  // Apply = false only checks that every fold would succeed.
  template <std::size_t I, bool Apply>
  void fold_from() {
    if constexpr (I < size) {
      if constexpr (fold_site<I>()) {
        std::vector<double> scale, shift;
        if (std::get<I + 1>(layers_).eval_affine(scale, shift)) {
          auto& target = std::get<I>(layers_);
          if (static_cast<Index>(scale.size()) != target.weight().dimension(0))
            throw shape_error("Sequential: cannot fold a batch norm of " + std::to_string(scale.size()) +
                              " channels into layer " + std::to_string(I) + " of " +
                              std::to_string(target.weight().dimension(0)) + " outputs");
          if constexpr (Apply) {
            target.fold_affine(scale, shift, detail::AppliesReLU<layer_t<I + 1>> || fold_span<I>() == 3);
            folded_[I] = true;
          }
        }
      }
      fold_from<I + 1, Apply>();
    }
  }

  // Layers I-2 and I-1 are BatchNorm then ReLU.
  template <std::size_t I>
  static constexpr bool ends_fused_pair() {
    if constexpr (I >= 2)
      return fused_pair<I - 2>();
    else
      return false;
  }

  template <std::size_t I, class D>
  auto dims_from(const D& d) const {
    if constexpr (I == size) {
      return d;
    } else {
      using L = layer_t<I>;
      static_assert(requires(const L& l) { l.output_dims(d); },
                    "Sequential: a layer cannot take the previous layer's output rank");
      return dims_from<I + 1>(std::get<I>(layers_).output_dims(d));
    }
  }

  template <class X>
  output_type forward_checked(X&& x) {
    output_dims(dims_of(x));
    ran_training_ = false;  // until the whole chain has run
    auto y = forward_from<0>(std::forward<X>(x));
    last_fused_ = fusion_;
    ran_training_ = is_training();
    return y;
  }

  void check_backward() const {
    if (!ran_training_)
      throw std::logic_error("Sequential: backward called without a preceding training-mode forward");
  }

  static constexpr std::size_t kNoProducer = static_cast<std::size_t>(-1);

  // Runs f (a layer's forward) on x, which layer P produced (kNoProducer: the caller's input).
  // Training: x goes in as an rvalue, so the layer may keep its storage for backward. Eval: the
  // layer reads x, and x's storage goes back to layer P for its next output, so a steady-state
  // eval forward reuses every activation buffer too.
  template <std::size_t P, class X, class F>
  auto consume(X&& x, F&& f) {
    if constexpr (P != kNoProducer && std::is_rvalue_reference_v<X&&> &&
                  requires(layer_t<P == kNoProducer ? 0 : P>& l) { l.recycle_output(std::move(x)); }) {
      if (!is_training()) {
        auto y = f(std::as_const(x));
        std::get<P>(layers_).recycle_output(std::move(x));
        return y;
      }
    }
    return f(std::forward<X>(x));
  }

  // Runs layers I .. End-1 on x, which layer P produced.
  template <std::size_t I, std::size_t P = kNoProducer, std::size_t End = size, class X>
  auto forward_from(X&& x) {
    if constexpr (I >= End) {
      return std::remove_cvref_t<X>(std::forward<X>(x));
    } else if constexpr (fold_site<I>()) {
      auto y = consume<P>(std::forward<X>(x), [&](auto&& in) { return std::get<I>(layers_).forward(std::forward<decltype(in)>(in)); });
      if (folded_[I]) return forward_from<I + fold_span<I>(), I, End>(std::move(y));
      return forward_from<I + 1, I, End>(std::move(y));
    } else if constexpr (fused_pair<I>()) {  // fusion_ is read here and saved as last_fused_
      if (fusion_)
        return forward_from<I + 2, I, End>(consume<P>(std::forward<X>(x), [&](auto&& in) {
          return std::get<I>(layers_).forward_fused_relu(std::forward<decltype(in)>(in));
        }));
      auto y = consume<P>(std::forward<X>(x), [&](auto&& in) { return std::get<I>(layers_).forward(std::forward<decltype(in)>(in)); });
      return forward_from<I + 2, I, End>(std::get<I + 1>(layers_).forward(std::move(y)));  // ReLU: in place
    } else {
      return forward_from<I + 1, I, End>(consume<P>(std::forward<X>(x), [&](auto&& in) {
        return std::get<I>(layers_).forward(std::forward<decltype(in)>(in));
      }));
    }
  }

  // infer through layers I .. End-1; x is layer I's input: the caller's (an lvalue), or an
  // intermediate (an rvalue), which goes back to the thread's infer spares once layer I has read
  // it. No fold or fused pair starting before End reaches past it (End is size, or a layer
  // that a batch norm was folded into).
  template <std::size_t I, std::size_t End = size, class X>
  auto infer_from(X&& x) const {
    if constexpr (fold_site<I>()) {
      if constexpr (pools_into<I, I + fold_span<I>(), End>())
        if (folded_[I]) return infer_pooled<I, I + fold_span<I>(), End>(std::forward<X>(x));
    } else if constexpr (!fused_pair<I>() && pools_into<I, I + 1, End>()) {
      return infer_pooled<I, I + 1, End>(std::forward<X>(x));
    }
    auto y = [&] {
      if constexpr (fused_pair<I>() && I + 1 < End)
        return std::get<I>(layers_).infer_impl(x, true);
      else
        return std::get<I>(layers_).infer(x);
    }();
    if constexpr (!std::is_lvalue_reference_v<X>) detail::infer_recycle(std::move(x));
    if constexpr (I + 1 == End) {
      return y;
    } else if constexpr (fold_site<I>()) {
      if (folded_[I]) {
        if constexpr (I + fold_span<I>() < End)
          return infer_from<I + fold_span<I>(), End>(std::move(y));
        else
          return y;
      }
      return infer_from<I + 1, End>(std::move(y));
    } else if constexpr (fused_pair<I>()) {
      if constexpr (I + 2 < End)
        return infer_from<I + 2, End>(std::move(y));
      else
        return y;
    } else {
      return infer_from<I + 1, End>(std::move(y));
    }
  }

  // infer_from's step for layer I followed by the max pool of layer J (which ends the layers
  // that step covers: a folded batch norm and ReLU, or none) in one pass, then the rest.
  template <std::size_t I, std::size_t J, std::size_t End, class X>
  auto infer_pooled(X&& x) const {
    auto y = std::get<I>(layers_).infer_max_pooled(x, std::get<J>(layers_));
    if constexpr (!std::is_lvalue_reference_v<X>) detail::infer_recycle(std::move(x));
    if constexpr (J + 1 < End)
      return infer_from<J + 1, End>(std::move(y));
    else
      return y;
  }

  // Layer J (before End) is a max pool that layer I's infer can compute in its epilogue.
  template <std::size_t I, std::size_t J, std::size_t End>
  static constexpr bool pools_into() {
    if constexpr (J < End)
      return detail::PoolsInto<layer_t<I>, layer_t<J>>;
    else
      return false;
  }

  // Layer size-2 can join an addend to its output in its epilogue (Conv2d::infer_add_relu) and
  // is followed by the chain's last layer, a batch norm that can be folded into it.
  static constexpr bool ends_in_add_target() {
    if constexpr (size >= 2 && fold_site<size - 2>())
      return requires(const layer_t<size - 2>& l, const output_type& t) { l.infer_add_relu(t, t); };
    else
      return false;
  }

  // Runs backward through layers I-1 .. Stop; every layer but the last gets dy as an rvalue.
  template <std::size_t I, std::size_t Stop, class D>
  auto backward_to(D&& dy) {
    if constexpr (I == Stop) {
      return std::remove_cvref_t<D>(std::forward<D>(dy));
    } else if constexpr (ends_fused_pair<I>() && I - 2 >= Stop) {
      if (last_fused_)
        return backward_to<I - 2, Stop>(std::get<I - 2>(layers_).backward_fused_relu(std::forward<D>(dy)));
      auto d = std::get<I - 1>(layers_).backward(std::forward<D>(dy));
      return backward_to<I - 2, Stop>(std::get<I - 2>(layers_).backward(std::move(d)));
    } else {
      return backward_to<I - 1, Stop>(std::get<I - 1>(layers_).backward(std::forward<D>(dy)));
    }
  }

  std::tuple<Layers...> layers_;
  bool fusion_ = true;
  bool last_fused_ = true;
  bool ran_training_ = false;
  bool inference_only_ = false;
  std::array<bool, size> folded_{};  // layer I carries the batch norm after it
};

template <class... L>
Sequential(L...) -> Sequential<L...>;

}  // namespace bnrelu::nn
