// 2-D convolution layer (square kernel, stride, zero padding, dilation).
#pragma once

#include <stdexcept>
#include <utility>
#include <vector>

#include "infer_arena.hpp"
#include "../kernels/conv2d.hpp"
#include "layer.hpp"
#include "weighted.hpp"

namespace bnrelu::nn {

template <class T>
class MaxPool2d;  // maxpool2d.hpp: the pool infer_max_pooled computes

using kernels::ConvAlgorithm;

struct Conv2dOptions {
  Index in_channels = 0;
  Index out_channels = 0;
  Index kernel_size = 0;
  Index stride = 1;
  Index padding = 0;
  Index dilation = 1;
  bool bias = true;
};

namespace detail {
inline const Conv2dOptions& checked(const Conv2dOptions& opt) {
  const char* n = "Conv2d";
  check_extent(opt.in_channels, 1, n, "in_channels");
  check_extent(opt.out_channels, 1, n, "out_channels");
  check_extent(opt.kernel_size, 1, n, "kernel_size");
  check_extent(opt.stride, 1, n, "stride");
  check_extent(opt.padding, 0, n, "padding");
  check_extent(opt.dilation, 1, n, "dilation");
  check_option(opt.dilation * (opt.kernel_size - 1) < kMaxExtent, n, "dilation * (kernel_size - 1) must be < 2^31 - 1");
  checked_elements(n, Dims<4>{opt.out_channels, opt.in_channels, opt.kernel_size, opt.kernel_size}, "weight");
  return opt;
}
// in_channels * k * k, after the checks (function arguments are evaluated in no set order).
inline Index fan_in(const Conv2dOptions& opt) {
  checked(opt);
  return opt.in_channels * opt.kernel_size * opt.kernel_size;
}
}  // namespace detail

// weight: [out_channels, in_channels, k, k]; bias: [out_channels]
template <class T>
class Conv2d : public Module, public detail::WeightAndBias<T, 4> {
  using Params = detail::WeightAndBias<T, 4>;

 public:
  using value_type = T;
  using input_type = Tensor<T, 4>;
  using output_type = Tensor<T, 4>;

  explicit Conv2d(const Conv2dOptions& opt)
      : Params({detail::checked(opt).out_channels, opt.in_channels, opt.kernel_size, opt.kernel_size}, opt.bias,
               detail::fan_in(opt)),
        opt_(opt) {}

  const Conv2dOptions& options() const { return opt_; }

  // How forward and the gradients are computed: automatic (the default) picks Winograd
  // F(2x2, 3x3) for 3x3, stride-1 layers with 8 or more input and output channels and
  // im2col + GEMM otherwise; winograd asks for it wherever it applies (3x3, stride 1, no
  // dilation, padding <= 2). The results agree to float rounding (kernels/winograd.hpp).
  void set_algorithm(ConvAlgorithm a) { algorithm_ = a; }
  ConvAlgorithm algorithm() const { return algorithm_; }

  // Keeps the weight's Winograd transform for the eval-mode forward and infer, which otherwise
  // compute it on every call (a sizeable share of a batch of one). Sequential's
  // fuse_for_inference calls it once the weights are final. Any later mutable access to the
  // weight (weight(), named_parameters(), fold_affine, place_weight) drops it again.
  void prepare_inference() {
    filters_.clear();
    if (opt_.kernel_size != 3) return;  // Winograd F(2x2, 3x3) only
    filters_.resize(static_cast<std::size_t>(16 * opt_.out_channels * opt_.in_channels));
    kernels::winograd_filter_transform(filters_.data(), this->weight_data(), opt_.out_channels, opt_.in_channels);
  }
  bool prepared_for_inference() const { return !filters_.empty(); }

  // The parameters' mutable views, as WeightAndBias gives them, dropping the kept transform.
  Tensor<T, 4>& weight() {
    filters_.clear();
    return Params::weight();
  }
  const Tensor<T, 4>& weight() const { return Params::weight(); }
  std::vector<ParamRef<T>> named_parameters() {
    filters_.clear();
    return Params::named_parameters();
  }
  void fold_affine(const std::vector<double>& scale, const std::vector<double>& shift, bool relu) {
    filters_.clear();
    Params::fold_affine(scale, shift, relu);
  }
  void place_weight(T* value, T* grad, bool copy_values = true) {
    filters_.clear();
    Params::place_weight(value, grad, copy_values);
  }

  // N x C x H x W -> N x O x HO x WO; shape_error if C is wrong or the kernel does not fit.
  Dims<4> output_dims(const Dims<4>& in) const {
    detail::check_rank_dims("Conv2d", in);
    const Index k = opt_.kernel_size, span = opt_.dilation * (k - 1) + 1;
    if (in[1] != opt_.in_channels || in[2] < 1 || in[3] < 1 || in[2] + 2 * opt_.padding < span ||
        in[3] + 2 * opt_.padding < span)
      throw shape_error("Conv2d: expected input N x " + std::to_string(opt_.in_channels) +
                        " x H x W with H, W >= 1 and H, W + 2*padding >= " + std::to_string(span) + ", got " +
                        shape_string(in));
    const Dims<4> out{in[0], opt_.out_channels, (in[2] + 2 * opt_.padding - span) / opt_.stride + 1,
                      (in[3] + 2 * opt_.padding - span) / opt_.stride + 1};
    detail::checked_elements("Conv2d", out, "output");
    return out;
  }

  Tensor<T, 4> forward(const Tensor<T, 4>& x) { return forward_impl(x, nullptr); }
  // Takes ownership of x to keep it for backward without a copy.
  Tensor<T, 4> forward(Tensor<T, 4>&& x) { return forward_impl(x, &x); }
  // The eval-mode output (with a folded ReLU, if any), computed without touching the layer: any
  // number of threads may call it at once while nobody changes the layer. The im2col or
  // Winograd workspace is the calling thread's own, kept from one call to the next.
  Tensor<T, 4> infer(const Tensor<T, 4>& x) const { return infer_impl(x, nullptr); }

  // relu(infer(x) + s) with the add and the ReLU in the convolution's epilogue, which writes
  // each output once (a residual block's end after fuse_for_inference folded its batch norm
  // here); the bits of infer(x) followed by a separate add and ReLU. s has the output's shape
  // (shape_error otherwise); std::logic_error if a ReLU was folded into this layer, which would
  // come before the add.
  Tensor<T, 4> infer_add_relu(const Tensor<T, 4>& x, const Tensor<T, 4>& s) const {
    const auto g = geometry(dims_of(x));
    if (dims_of(s) != Dims<4>{g.N, g.O, g.HO, g.WO})
      throw shape_error("Conv2d: the addend is " + shape_string(dims_of(s)) + " but the output " +
                        shape_string(Dims<4>{g.N, g.O, g.HO, g.WO}));
    if (this->relu_) throw std::logic_error("Conv2d: infer_add_relu on a layer with a folded ReLU");
    return infer_impl(x, s.data());
  }

  // The max pool of infer(x) by pool, computed image by image right after each image's
  // convolution, so that only the pooled output is written to the result: the bits of
  // pool.infer(infer(x)). shape_error as the pool's output_dims gives it for infer(x)'s dims.
  Tensor<T, 4> infer_max_pooled(const Tensor<T, 4>& x, const MaxPool2d<T>& pool) const {
    const auto g = geometry(dims_of(x));
    const kernels::Pool2dGeometry window = pool.pool_geometry(Dims<4>{g.N, g.O, g.HO, g.WO});
    return infer_impl(x, nullptr, &window);
  }

  Tensor<T, 4> backward(const Tensor<T, 4>& dy) {
    const auto g = backward_geometry(dy);
    Tensor<T, 4> dx = x_.take_grad_storage();
    backward_impl(dx.data(), dy, g);
    return dx;
  }
  // Gives dy's storage to the next forward's output.
  Tensor<T, 4> backward(Tensor<T, 4>&& dy) {
    auto dx = backward(std::as_const(dy));
    y_.give(std::move(dy));
    return dx;
  }
  // Parameter gradients only, without dLoss/dx (for a first layer whose input needs none).
  void backward_params(Tensor<T, 4>&& dy) {
    backward_impl(nullptr, dy, backward_geometry(dy));
    y_.give(std::move(dy));
  }

  // Takes back an output of this layer that is no longer needed, for the next output.
  void recycle_output(Tensor<T, 4>&& y) { y_.give(std::move(y)); }

  std::vector<BufferRef<T>> named_buffers() { return {}; }

 private:
  using Workspace = std::vector<T, Eigen::aligned_allocator<T>>;

  // A workspace of at least n elements. It only grows: resized down and up again, a vector
  // zero-fills the elements it regains, and the forward's and the backward's sizes (or two
  // layers' sharing a thread's infer workspace) alternate on every step.
  static T* at_least(Workspace& workspace, Index n) {
    if (workspace.size() < static_cast<std::size_t>(n)) workspace.resize(static_cast<std::size_t>(n));
    return workspace.data();
  }

  kernels::Conv2dGeometry geometry(const Dims<4>& in) const {
    const auto out = output_dims(in);
    return {in[0],        in[1],        in[2],   in[3],           opt_.out_channels,
            opt_.kernel_size, opt_.kernel_size, opt_.stride, opt_.padding, opt_.dilation,
            out[2],       out[3]};
  }

  kernels::Conv2dGeometry backward_geometry(const Tensor<T, 4>& dy) const {
    if (!x_.valid()) detail::no_forward("Conv2d");
    const auto g = geometry(dims_of(x_.get()));
    detail::check_grad_dims("Conv2d", Dims<4>{g.N, g.O, g.HO, g.WO}, dims_of(dy));
    return g;
  }

  void backward_impl(T* dx, const Tensor<T, 4>& dy, const kernels::Conv2dGeometry& g) {
    kernels::conv2d_backward(dx, this->dweight_data(), this->dbias_data(),
                             at_least(workspace_, kernels::conv2d_backward_workspace<T>(g, algorithm_)), dy.data(),
                             x_.get().data(), this->weight_data(), g, algorithm_);
  }

  // infer's output, relu(conv(x) + addend) when the addend is given, or its max pool by pool.
  Tensor<T, 4> infer_impl(const Tensor<T, 4>& x, const T* addend,
                          const kernels::Pool2dGeometry* pool = nullptr) const {
    const auto g = geometry(dims_of(x));
    Tensor<T, 4> y = detail::infer_output<T>(pool ? Dims<4>{g.N, g.O, pool->HO, pool->WO} : Dims<4>{g.N, g.O, g.HO, g.WO});
    thread_local Workspace workspace;  // one for every Conv2d<T> the thread runs
    kernels::conv2d_forward(y.data(), at_least(workspace, kernels::conv2d_forward_workspace<T>(g, algorithm_, pool)),
                            x.data(), this->weight_data(), this->bias_data(), g,
                            this->relu_ || addend, algorithm_, filters_.empty() ? nullptr : filters_.data(),
                            addend, pool);
    return y;
  }

  Tensor<T, 4> forward_impl(const Tensor<T, 4>& x, Tensor<T, 4>* owned) {
    const auto g = geometry(dims_of(x));  // throws before any change
    if (this->relu_ && is_training()) detail::inference_only("Conv2d");
    Tensor<T, 4> y = y_.take({g.N, g.O, g.HO, g.WO});
    const bool kept = !filters_.empty() && !is_training();
    kernels::conv2d_forward(y.data(), at_least(workspace_, kernels::conv2d_forward_workspace<T>(g, algorithm_)), x.data(),
                            this->weight_data(), this->bias_data(), g,
                            this->relu_, algorithm_, kept ? filters_.data() : nullptr);
    x_.keep(x, owned, is_training());
    return y;
  }

  Conv2dOptions opt_;
  std::vector<T> filters_;      // prepare_inference's Winograd transform of the weight, or empty
  detail::InputCache<T, 4> x_;  // cache for backward
  detail::Recycler<T, 4> y_;    // storage for the next output
  ConvAlgorithm algorithm_ = ConvAlgorithm::automatic;
  Workspace workspace_;         // im2col columns or Winograd transforms, reused across calls
};

}  // namespace bnrelu::nn
