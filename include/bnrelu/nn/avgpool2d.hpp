// 2-D average pooling: fixed square windows (AvgPool2d) and windows that divide the input into
// a given output size (AdaptiveAvgPool2d; 1 x 1 is global average pooling).
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "infer_arena.hpp"
#include "../kernels/avgpool.hpp"
#include "layer.hpp"

namespace bnrelu::nn {

namespace detail {

// Caching and storage shared by the two average pools; Derived supplies geometry(in dims).
template <class T, class Derived>
class AvgPoolBase : public Module {
 public:
  using value_type = T;
  using input_type = Tensor<T, 4>;
  using output_type = Tensor<T, 4>;

  Tensor<T, 4> forward(const Tensor<T, 4>& x) {
    const auto g = self().geometry(dims_of(x));
    Tensor<T, 4> y = y_.take({g.N, g.C, g.HO, g.WO});
    kernels::avgpool2d_forward(y.data(), x.data(), g);
    geometry_ = g;
    has_cache_ = is_training();
    return y;
  }
  // The eval-mode output, computed without touching the layer (any number of threads at once).
  Tensor<T, 4> infer(const Tensor<T, 4>& x) const {
    const auto g = static_cast<const Derived&>(*this).geometry(dims_of(x));
    Tensor<T, 4> y = detail::infer_output<T>(Dims<4>{g.N, g.C, g.HO, g.WO});
    kernels::avgpool2d_forward(y.data(), x.data(), g);
    return y;
  }
  // Keeps x's storage (not needed for backward) for the input gradient.
  Tensor<T, 4> forward(Tensor<T, 4>&& x) {
    auto y = forward(std::as_const(x));
    if (has_cache_) dx_.give(std::move(x));
    return y;
  }

  Tensor<T, 4> backward(const Tensor<T, 4>& dy) {
    if (!has_cache_) no_forward(Derived::kName);
    const auto& g = geometry_;
    check_grad_dims(Derived::kName, Dims<4>{g.N, g.C, g.HO, g.WO}, dims_of(dy));
    Tensor<T, 4> dx = dx_.take({g.N, g.C, g.H, g.W});
    kernels::avgpool2d_backward(dx.data(), dy.data(), g);
    return dx;
  }
  // Gives dy's storage to the next forward's output.
  Tensor<T, 4> backward(Tensor<T, 4>&& dy) {
    auto dx = backward(std::as_const(dy));
    y_.give(std::move(dy));
    return dx;
  }

  Dims<4> output_dims(const Dims<4>& in) const {
    const auto g = self().geometry(in);
    return {g.N, g.C, g.HO, g.WO};
  }

  // Takes back an output of this layer that is no longer needed, for the next output.
  void recycle_output(Tensor<T, 4>&& y) { y_.give(std::move(y)); }
  void zero_grad() {}
  std::vector<ParamRef<T>> named_parameters() { return {}; }
  std::vector<BufferRef<T>> named_buffers() { return {}; }

 private:
  const Derived& self() const { return static_cast<const Derived&>(*this); }

  kernels::AvgPool2dGeometry geometry_{};
  Recycler<T, 4> y_, dx_;  // storage for the next output and input gradient
  bool has_cache_ = false;
};

}  // namespace detail

struct AvgPool2dOptions {
  Index kernel_size = 0;
  std::optional<Index> stride = std::nullopt;  // defaults to kernel_size
  Index padding = 0;
  bool count_include_pad = true;  // PyTorch's default: padding counts in the divisor
};

// PyTorch's nn.AvgPool2d with a square window, ceil_mode = false and no divisor_override.
template <class T>
class AvgPool2d : public detail::AvgPoolBase<T, AvgPool2d<T>> {
 public:
  static constexpr const char* kName = "AvgPool2d";

  explicit AvgPool2d(const AvgPool2dOptions& opt)
      : kernel_(opt.kernel_size), stride_(opt.stride.value_or(opt.kernel_size)), pad_(opt.padding),
        count_include_pad_(opt.count_include_pad) {
    detail::check_extent(kernel_, 1, kName, "kernel_size");
    detail::check_extent(stride_, 1, kName, "stride");
    detail::check_extent(pad_, 0, kName, "padding");
    detail::check_option(2 * pad_ <= kernel_, kName, "padding must be at most half of kernel_size");
  }

  Index kernel_size() const { return kernel_; }
  Index stride() const { return stride_; }
  Index padding() const { return pad_; }
  bool count_include_pad() const { return count_include_pad_; }

  kernels::AvgPool2dGeometry geometry(const Dims<4>& in) const {
    detail::check_rank_dims(kName, in);
    if (in[2] < 1 || in[3] < 1 || in[2] + 2 * pad_ < kernel_ || in[3] + 2 * pad_ < kernel_)
      throw shape_error(std::string(kName) + ": expected input N x C x H x W with H, W >= 1 and H, W + 2*padding >= " +
                        std::to_string(kernel_) + ", got " + shape_string(in));
    kernels::AvgPool2dGeometry g{in[0], in[1], in[2], in[3], (in[2] + 2 * pad_ - kernel_) / stride_ + 1,
                                 (in[3] + 2 * pad_ - kernel_) / stride_ + 1};
    g.K = kernel_;
    g.stride = stride_;
    g.pad = pad_;
    g.count_include_pad = count_include_pad_;
    return g;
  }

 private:
  Index kernel_, stride_, pad_;
  bool count_include_pad_;
};

struct AdaptiveAvgPool2dOptions {
  Index output_size = 1;                           // the output's height (and width by default)
  std::optional<Index> output_width = std::nullopt;  // defaults to output_size
};

// PyTorch's nn.AdaptiveAvgPool2d((OH, OW)): output (i, j) averages input rows
// [floor(i*H/OH), ceil((i+1)*H/OH)) and columns likewise. The default 1 x 1 is global average
// pooling.
template <class T>
class AdaptiveAvgPool2d : public detail::AvgPoolBase<T, AdaptiveAvgPool2d<T>> {
 public:
  static constexpr const char* kName = "AdaptiveAvgPool2d";

  explicit AdaptiveAvgPool2d(const AdaptiveAvgPool2dOptions& opt = {})
      : oh_(opt.output_size), ow_(opt.output_width.value_or(opt.output_size)) {
    detail::check_extent(oh_, 1, kName, "output_size");
    detail::check_extent(ow_, 1, kName, "output_width");
  }

  Index output_height() const { return oh_; }
  Index output_width() const { return ow_; }

  kernels::AvgPool2dGeometry geometry(const Dims<4>& in) const {
    detail::check_rank_dims(kName, in);
    if (in[2] < 1 || in[3] < 1)
      throw shape_error(std::string(kName) + ": expected input N x C x H x W with H, W >= 1, got " + shape_string(in));
    kernels::AvgPool2dGeometry g{in[0], in[1], in[2], in[3], oh_, ow_};
    g.adaptive = true;
    return g;
  }

 private:
  Index oh_, ow_;
};

}  // namespace bnrelu::nn
