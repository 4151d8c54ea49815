// 2-D convolution layer (square kernel, stride, zero padding, dilation).
#pragma once

#include <vector>

#include "../kernels/conv2d.hpp"
#include "init.hpp"
#include "layer.hpp"

namespace bnrelu::nn {

struct Conv2dOptions {
  Index in_channels = 0;
  Index out_channels = 0;
  Index kernel_size = 0;
  Index stride = 1;
  Index padding = 0;
  Index dilation = 1;
  bool bias = true;
};

template <class T>
class Conv2d : public Module {
 public:
  using value_type = T;
  using input_type = Tensor<T, 4>;
  using output_type = Tensor<T, 4>;

  explicit Conv2d(const Conv2dOptions& opt) : opt_(opt) {
    const char* n = "Conv2d";
    detail::check_option(opt.in_channels > 0, n, "in_channels must be > 0");
    detail::check_option(opt.out_channels > 0, n, "out_channels must be > 0");
    detail::check_option(opt.kernel_size > 0, n, "kernel_size must be > 0");
    detail::check_option(opt.stride > 0, n, "stride must be > 0");
    detail::check_option(opt.padding >= 0, n, "padding must be >= 0");
    detail::check_option(opt.dilation > 0, n, "dilation must be > 0");
    const Index k = opt.kernel_size;
    weight_.resize(opt.out_channels, opt.in_channels, k, k);
    dweight_.resize(weight_.dimensions());
    init::uniform_fan_in(weight_, opt.in_channels * k * k);
    if (opt.bias) {
      bias_.resize(opt.out_channels);
      dbias_.resize(opt.out_channels);
      init::uniform_fan_in(bias_, opt.in_channels * k * k);
    }
    zero_grad();
  }

  const Conv2dOptions& options() const { return opt_; }

  // N x C x H x W -> N x O x HO x WO; shape_error if C is wrong or the kernel does not fit.
  Dims<4> output_dims(const Dims<4>& in) const {
    detail::check_rank_dims("Conv2d", in);
    const Index k = opt_.kernel_size, span = opt_.dilation * (k - 1) + 1;
    if (in[1] != opt_.in_channels || in[2] + 2 * opt_.padding < span ||
        in[3] + 2 * opt_.padding < span)
      throw shape_error("Conv2d: expected input N x " + std::to_string(opt_.in_channels) +
                        " x H x W with H, W + 2*padding >= " + std::to_string(span) + ", got " +
                        shape_string(in));
    return {in[0], opt_.out_channels, (in[2] + 2 * opt_.padding - span) / opt_.stride + 1,
            (in[3] + 2 * opt_.padding - span) / opt_.stride + 1};
  }

  Tensor<T, 4> forward(const Tensor<T, 4>& x) { return forward_impl(x, nullptr); }
  // Takes ownership of x to keep it for backward without a copy.
  Tensor<T, 4> forward(Tensor<T, 4>&& x) { return forward_impl(x, &x); }

  Tensor<T, 4> backward(const Tensor<T, 4>& dy) {
    if (!has_cache_) detail::no_forward("Conv2d");
    const auto g = geometry(dims_of(x_));
    detail::check_grad_dims("Conv2d", Dims<4>{g.N, g.O, g.HO, g.WO}, dims_of(dy));
    Tensor<T, 4> dx(x_.dimensions());
    workspace_.resize(static_cast<std::size_t>(kernels::conv2d_backward_workspace(g)));
    kernels::conv2d_backward(dx.data(), dweight_.data(), opt_.bias ? dbias_.data() : nullptr,
                             workspace_.data(), dy.data(), x_.data(), weight_.data(), g);
    return dx;
  }

  void zero_grad() {
    dweight_.setZero();
    if (opt_.bias) dbias_.setZero();
  }

  std::vector<ParamRef<T>> named_parameters() {
    std::vector<ParamRef<T>> p{{"weight", shape_vector(weight_), span_of(weight_), span_of(dweight_)}};
    if (opt_.bias) p.push_back({"bias", shape_vector(bias_), span_of(bias_), span_of(dbias_)});
    return p;
  }
  std::vector<BufferRef<T>> named_buffers() { return {}; }

  Tensor<T, 4>& weight() { return weight_; }
  Tensor<T, 1>& bias() { return bias_; }
  const Tensor<T, 4>& weight_grad() const { return dweight_; }
  const Tensor<T, 1>& bias_grad() const { return dbias_; }

 private:
  kernels::Conv2dGeometry geometry(const Dims<4>& in) const {
    const auto out = output_dims(in);
    return {in[0],        in[1],        in[2],   in[3],           opt_.out_channels,
            opt_.kernel_size, opt_.kernel_size, opt_.stride, opt_.padding, opt_.dilation,
            out[2],       out[3]};
  }

  Tensor<T, 4> forward_impl(const Tensor<T, 4>& x, Tensor<T, 4>* owned) {
    const auto g = geometry(dims_of(x));  // throws before any change
    Tensor<T, 4> y(g.N, g.O, g.HO, g.WO);
    workspace_.resize(static_cast<std::size_t>(kernels::conv2d_forward_workspace(g)));
    kernels::conv2d_forward(y.data(), workspace_.data(), x.data(), weight_.data(),
                            opt_.bias ? bias_.data() : nullptr, g);
    has_cache_ = is_training();
    if (!is_training()) x_ = Tensor<T, 4>();
    else if (owned) x_ = std::move(*owned);
    else x_ = x;
    return y;
  }

  Conv2dOptions opt_;
  Tensor<T, 4> weight_, dweight_;
  Tensor<T, 1> bias_, dbias_;
  Tensor<T, 4> x_;  // cache for backward
  bool has_cache_ = false;
  std::vector<T> workspace_;
};

}  // namespace bnrelu::nn
