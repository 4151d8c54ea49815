// A layer of your own: a learnable scale per channel, y[n, c, h, w] = x[n, c, h, w] * weight[c].
// It declares what bnrelu::nn::Layer asks for, is checked where it is declared, trains inside a
// Sequential, passes the finite-difference gradient check and saves with the rest of the model.
#include <bnrelu/bnrelu.hpp>

#include <cstdio>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

namespace nn = bnrelu::nn;
using bnrelu::Index;
using bnrelu::Tensor;

template <class T>
class ChannelScale : public nn::Module {  // Module: train(), eval(), is_training()
 public:
  using value_type = T;
  using input_type = Tensor<T, 4>;  // one rank only; a layer for any rank templates forward instead

  explicit ChannelScale(Index channels) : weight_(channels), grad_(channels) {
    weight_.setConstant(T(1));
    grad_.setZero();
  }

  // The output shape for an input shape; shape_error before any state changes.
  bnrelu::Dims<4> output_dims(const bnrelu::Dims<4>& in) const {
    if (in[1] != weight_.dimension(0))
      throw bnrelu::shape_error("ChannelScale: expected " + std::to_string(weight_.dimension(0)) + " channels, got " +
                                bnrelu::shape_string(in));
    return in;
  }

  Tensor<T, 4> forward(const Tensor<T, 4>& x) {
    output_dims(bnrelu::dims_of(x));
    Tensor<T, 4> y(x.dimensions());
    for_each(x, [&](Index i, Index c) { y.data()[i] = x.data()[i] * weight_(c); });
    if (is_training()) x_ = x;  // backward needs x for the weight's gradient
    has_cache_ = is_training();
    return y;
  }

  // dx = dy * weight; the weight's gradient is ADDED to, as every layer does.
  Tensor<T, 4> backward(const Tensor<T, 4>& dy) {
    if (!has_cache_) throw std::logic_error("ChannelScale: backward without a training forward");
    if (bnrelu::dims_of(dy) != bnrelu::dims_of(x_)) throw bnrelu::shape_error("ChannelScale: wrong gradient shape");
    Tensor<T, 4> dx(dy.dimensions());
    for_each(dy, [&](Index i, Index c) {
      dx.data()[i] = dy.data()[i] * weight_(c);
      grad_(c) += dy.data()[i] * x_.data()[i];
    });
    return dx;
  }

  void zero_grad() { grad_.setZero(); }
  std::vector<bnrelu::ParamRef<T>> named_parameters() {
    return {{"weight", bnrelu::shape_vector(weight_), bnrelu::span_of(weight_), bnrelu::span_of(grad_)}};
  }
  std::vector<bnrelu::BufferRef<T>> named_buffers() { return {}; }

 private:
  template <class F>
  static void for_each(const Tensor<T, 4>& t, F&& f) {
    const Index C = t.dimension(1), S = t.dimension(2) * t.dimension(3);
    for (Index i = 0; i < t.size(); ++i) f(i, (i / S) % C);
  }

  Tensor<T, 1> weight_, grad_;
  Tensor<T, 4> x_;
  bool has_cache_ = false;
};

// Checked where it is declared: a missing member is named in the compiler's message.
static_assert(nn::Layer<ChannelScale<float>>);

int main() {
  bnrelu::manual_seed(1);
  // the finite-difference check, in double
  ChannelScale<double> probe(3);
  probe.named_parameters()[0].value[1] = 0.5;
  Tensor<double, 4> x(2, 3, 4, 4);
  x.setRandom();
  const auto check = bnrelu::testing::gradcheck(probe, x);
  std::printf("gradcheck: %s (largest error %.2e)\n", check.ok ? "passed" : "FAILED", check.max_error);

  // inside a Sequential, trained for a few steps
  nn::Sequential model{nn::Conv2d<float>({.in_channels = 1, .out_channels = 8, .kernel_size = 3, .padding = 1}),
                       ChannelScale<float>(8), nn::ReLU<float>{}, nn::Flatten<float>{},
                       nn::Linear<float>({.in_features = 8 * 6 * 6, .out_features = 3})};
  bnrelu::optim::SGD<float> opt(model.named_parameters(), {.lr = 0.1});
  nn::CrossEntropyLoss<float> ce;
  Tensor<float, 4> images(4, 1, 6, 6);
  images.setRandom();
  const std::vector<std::int64_t> labels{0, 1, 2, 1};
  float first = 0, last = 0;
  for (int step = 0; step < 20; ++step) {
    opt.zero_grad();
    const float loss = ce.forward(model.forward(images), labels);
    model.backward(ce.backward());
    opt.step();
    (step == 0 ? first : last) = loss;
  }
  std::printf("loss %.4f -> %.4f\n", first, last);

  // saved and loaded with the model; its parameter is "1.weight"
  const auto path = (std::filesystem::temp_directory_path() / "bnrelu_custom_layer.safetensors").string();
  bnrelu::io::save_safetensors(model, path);
  auto again = model;
  again.get<1>().named_parameters()[0].value[0] = 0;
  bnrelu::io::load_safetensors(again, path);
  std::filesystem::remove(path);
  const bool restored = again.get<1>().named_parameters()[0].value[0] == model.get<1>().named_parameters()[0].value[0];
  std::printf("checkpoint: %s\n", restored ? "restored" : "NOT restored");
  return check.ok && last < first && restored ? 0 : 1;
}
