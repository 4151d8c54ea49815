// A short training run end to end on a small synthetic set: the loss must fall, and the same
// seed must give the same loss curve bit for bit.
#include <bnrelu/bnrelu.hpp>

#include "golden.hpp"

namespace nn = bnrelu::nn;
using bnrelu::Tensor;

namespace {

// 3 classes of 1 x 8 x 8 images: a bright row, a bright column or a bright diagonal, plus noise.
bnrelu::data::Mnist synthetic(int n) {
  bnrelu::data::Mnist set;
  set.images.resize(n, 1, 8, 8);
  for (int i = 0; i < n; ++i) {
    const int cls = i % 3, k = (i / 3) % 8;
    for (int r = 0; r < 8; ++r)
      for (int c = 0; c < 8; ++c) {
        const bool on = (cls == 0 && r == k) || (cls == 1 && c == k) || (cls == 2 && r == c);
        set.images(i, 0, r, c) = (on ? 0.8f : 0.1f) + static_cast<float>(bnrelu::uniform(0, 0.1));
      }
    set.labels.push_back(cls);
  }
  return set;
}

std::vector<float> train(std::uint64_t seed, int epochs, bool fused) {
  bnrelu::manual_seed(seed);
  const auto set = synthetic(96);
  nn::Sequential model{nn::Conv2d<float>({.in_channels = 1, .out_channels = 4, .kernel_size = 3, .padding = 1}),
                       nn::BatchNorm2d<float>({.num_features = 4}), nn::ReLU<float>{},
                       nn::MaxPool2d<float>({.kernel_size = 2}), nn::Flatten<float>{},
                       nn::Linear<float>({.in_features = 64, .out_features = 16}),
                       nn::BatchNorm1d<float>({.num_features = 16}), nn::ReLU<float>{},
                       nn::Linear<float>({.in_features = 16, .out_features = 3})};
  model.set_fusion(fused);
  bnrelu::optim::SGD<float> opt(model.named_parameters(), {.lr = 0.05, .momentum = 0.9});
  bnrelu::data::DataLoader<float> loader(set, {.batch_size = 16, .seed = seed});
  nn::CrossEntropyLoss<float> ce;
  std::vector<float> epoch_loss;
  bnrelu::data::Batch<float> b;
  for (int e = 0; e < epochs; ++e) {
    loader.start_epoch(e);
    double sum = 0;
    int count = 0;
    while (loader.next(b)) {
      opt.zero_grad();
      const float l = ce.forward(model.forward(b.images), b.labels);
      model.backward(ce.backward());
      opt.step();
      sum += l;
      ++count;
    }
    epoch_loss.push_back(static_cast<float>(sum / count));
  }
  return epoch_loss;
}

}  // namespace

TEST(Training, LossFallsAndRunsAreReproducible) {
  const auto a = train(3, 8, true);
  EXPECT_LT(a.back(), 0.25f * a.front()) << "first " << a.front() << " last " << a.back();
  EXPECT_EQ(train(3, 8, true), a);  // bit-identical for the same seed and thread count
  const auto unfused = train(3, 8, false);
  for (std::size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(unfused[i], a[i], 1e-3 * std::max(1.0f, a[i]));
}
