// 2-D max pooling (square window) with -inf padding.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "infer_arena.hpp"
#include "../kernels/pool.hpp"
#include "layer.hpp"

namespace bnrelu::nn {

struct MaxPool2dOptions {
  Index kernel_size = 0;
  std::optional<Index> stride = std::nullopt;  // defaults to kernel_size
  Index padding = 0;
};

template <class T>
class MaxPool2d : public Module {
 public:
  using value_type = T;
  using input_type = Tensor<T, 4>;
  using output_type = Tensor<T, 4>;

  explicit MaxPool2d(const MaxPool2dOptions& opt)
      : kernel_(opt.kernel_size), stride_(opt.stride.value_or(opt.kernel_size)), pad_(opt.padding) {
    detail::check_extent(kernel_, 1, "MaxPool2d", "kernel_size");
    detail::check_extent(stride_, 1, "MaxPool2d", "stride");
    detail::check_extent(pad_, 0, "MaxPool2d", "padding");
    detail::check_option(pad_ >= 0 && 2 * pad_ <= kernel_, "MaxPool2d",
                         "padding must be >= 0 and at most half of kernel_size");
  }

  Index kernel_size() const { return kernel_; }
  Index stride() const { return stride_; }
  Index padding() const { return pad_; }

  Dims<4> output_dims(const Dims<4>& in) const {
    detail::check_rank_dims("MaxPool2d", in);
    // H, W >= 1 so that no window holds padding alone (padding <= kernel_size / 2)
    if (in[2] < 1 || in[3] < 1 || in[2] + 2 * pad_ < kernel_ || in[3] + 2 * pad_ < kernel_)
      throw shape_error("MaxPool2d: expected input N x C x H x W with H, W >= 1 and H, W + 2*padding >= " +
                        std::to_string(kernel_) + ", got " + shape_string(in));
    return {in[0], in[1], (in[2] + 2 * pad_ - kernel_) / stride_ + 1,
            (in[3] + 2 * pad_ - kernel_) / stride_ + 1};
  }

  // The pooling of an input of dims in, as the kernels take it (shape_error as output_dims).
  kernels::Pool2dGeometry pool_geometry(const Dims<4>& in) const {
    const auto out = output_dims(in);
    return {in[0], in[1], in[2], in[3], kernel_, kernel_, stride_, pad_, out[2], out[3]};
  }

  Tensor<T, 4> forward(const Tensor<T, 4>& x) {
    const auto g = pool_geometry(dims_of(x));
    Tensor<T, 4> y = y_.take({g.N, g.C, g.HO, g.WO});
    has_cache_ = is_training();
    argmax_.resize(has_cache_ ? static_cast<std::size_t>(y.size()) : 0);  // eval keeps no argmax
    kernels::maxpool2d_forward(y.data(), has_cache_ ? argmax_.data() : nullptr, x.data(), g);
    geometry_ = g;
    return y;
  }

  // The eval-mode output, computed without touching the layer (any number of threads at once).
  Tensor<T, 4> infer(const Tensor<T, 4>& x) const {
    const auto g = pool_geometry(dims_of(x));
    Tensor<T, 4> y = detail::infer_output<T>(Dims<4>{g.N, g.C, g.HO, g.WO});
    kernels::maxpool2d_forward(y.data(), static_cast<std::int32_t*>(nullptr), x.data(), g);
    return y;
  }

  // Keeps x's storage (not needed for backward) for the input gradient.
  Tensor<T, 4> forward(Tensor<T, 4>&& x) {
    auto y = forward(std::as_const(x));
    if (has_cache_) dx_.give(std::move(x));
    return y;
  }

  Tensor<T, 4> backward(const Tensor<T, 4>& dy) {
    if (!has_cache_) detail::no_forward("MaxPool2d");
    const auto& g = geometry_;
    detail::check_grad_dims("MaxPool2d", Dims<4>{g.N, g.C, g.HO, g.WO}, dims_of(dy));
    Tensor<T, 4> dx = dx_.take({g.N, g.C, g.H, g.W});
    kernels::maxpool2d_backward(dx.data(), dy.data(), argmax_.data(), g);
    return dx;
  }
  // Gives dy's storage to the next forward's output.
  Tensor<T, 4> backward(Tensor<T, 4>&& dy) {
    auto dx = backward(std::as_const(dy));
    y_.give(std::move(dy));
    return dx;
  }

  // Where each output of the last training-mode forward took its maximum: the index in its
  // H*W input plane, in the output's [N, C, HO, WO] order; empty after an eval forward.
  std::span<const std::int32_t> argmax() const { return argmax_; }

  void zero_grad() {}
  std::vector<ParamRef<T>> named_parameters() { return {}; }
  // Takes back an output of this layer that is no longer needed, for the next output.
  void recycle_output(Tensor<T, 4>&& y) { y_.give(std::move(y)); }

  std::vector<BufferRef<T>> named_buffers() { return {}; }

 private:
  Index kernel_, stride_, pad_;
  std::vector<std::int32_t> argmax_;  // cache: index of each output's maximum in its H*W plane
  kernels::Pool2dGeometry geometry_{};
  detail::Recycler<T, 4> y_, dx_;  // storage for the next output and input gradient
  bool has_cache_ = false;
};

}  // namespace bnrelu::nn
