#include <bnrelu/bnrelu.hpp>

#include <cstdint>
#include <cstdio>
#include <vector>

int main() {
  namespace nn = bnrelu::nn;
  bnrelu::manual_seed(1);
  nn::Sequential model{
      nn::Conv2d<float>({.in_channels = 1, .out_channels = 16, .kernel_size = 3, .padding = 1}),
      nn::BatchNorm2d<float>({.num_features = 16}),
      nn::ReLU<float>{},                                 // BatchNorm + ReLU run as one fused pass
      nn::MaxPool2d<float>({.kernel_size = 2}),          // 28 x 28 -> 14 x 14
      nn::Flatten<float>{},
      nn::Linear<float>({.in_features = 16 * 14 * 14, .out_features = 10})};
  bnrelu::optim::SGD<float> opt(model.named_parameters(), {.lr = 0.01, .momentum = 0.9});
  nn::CrossEntropyLoss<float> loss;

  bnrelu::Tensor<float, 4> x(8, 1, 28, 28);              // N x C x H x W, row-major like PyTorch
  x.setRandom();
  const std::vector<std::int64_t> labels{0, 1, 2, 3, 4, 5, 6, 7};
  for (int step = 0; step < 20; ++step) {
    opt.zero_grad();
    const float l = loss.forward(model.forward(x), labels);  // keeps a copy of x (reused
                                                              // below); forward(std::move(x)) keeps x itself
    model.backward(loss.backward());                      // adds into every parameter's grad
    opt.step();
    std::printf("step %d: loss %.4f\n", step, l);
  }
  model.eval();
  const bnrelu::Tensor<float, 2> logits = model.forward(x);  // 8 x 10
  bnrelu::io::save_safetensors(model, "model.safetensors");  // loads into PyTorch as a state_dict
  return logits.dimension(1) == 10 ? 0 : 1;
}
