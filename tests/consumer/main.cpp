// A program written only against the public API: train one step of the seed CNN.
#include <bnrelu/bnrelu.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  namespace nn = bnrelu::nn;
  bnrelu::manual_seed(1);
  auto model = bnrelu::models::seed_cnn<float>(1, 10);
  bnrelu::Tensor<float, 4> x(4, 1, 28, 28);
  x.setRandom();
  const std::vector<std::int64_t> labels{0, 1, 2, 3};
  nn::CrossEntropyLoss<float> loss;
  const float l = loss.forward(model.forward(x), labels);
  const bnrelu::Tensor<float, 4> dx = model.backward(loss.backward());
  std::printf("loss %.4f, dx %ldx%ldx%ldx%ld\n", l, dx.dimension(0), dx.dimension(1), dx.dimension(2), dx.dimension(3));
  return std::isfinite(l) && dx.dimension(3) == 28 ? 0 : 1;
}
