// The founding document's two-block CNN, for inputs of any height and width (28 x 28 in the
// document).
#pragma once

#include "../nn/batchnorm.hpp"
#include "../nn/conv2d.hpp"
#include "../nn/flatten.hpp"
#include "../nn/linear.hpp"
#include "../nn/maxpool2d.hpp"
#include "../nn/relu.hpp"
#include "../nn/sequential.hpp"

namespace bnrelu::models {

template <class T>
using SeedCNN = nn::Sequential<nn::Conv2d<T>, nn::BatchNorm2d<T>, nn::ReLU<T>, nn::MaxPool2d<T>,
                               nn::Conv2d<T>, nn::BatchNorm2d<T>, nn::ReLU<T>, nn::MaxPool2d<T>,
                               nn::Flatten<T>, nn::Linear<T>, nn::BatchNorm1d<T>, nn::ReLU<T>,
                               nn::Linear<T>>;

// conv(->64, 3x3, pad 1) bn relu pool(2)  conv(->128) bn relu pool(2)
// flatten linear(128 * (height/4) * (width/4) -> 512) bn1d relu linear(->num_classes);
// 6272 inputs to the first Linear at 28 x 28. shape_error for height or width below 4.
template <class T>
SeedCNN<T> seed_cnn(Index in_channels, Index num_classes, Index height = 28, Index width = 28) {
  namespace nn = bnrelu::nn;
  nn::detail::check_extent(height, 4, "seed_cnn", "height");
  nn::detail::check_extent(width, 4, "seed_cnn", "width");
  nn::detail::check_option(height / 4 <= nn::detail::kMaxExtent / 128 / (width / 4), "seed_cnn",
                           "128 * (height / 4) * (width / 4) must be at most 2^31 - 1");
  return SeedCNN<T>(
      nn::Conv2d<T>({.in_channels = in_channels, .out_channels = 64, .kernel_size = 3, .padding = 1}),
      nn::BatchNorm2d<T>({.num_features = 64}), nn::ReLU<T>{},
      nn::MaxPool2d<T>({.kernel_size = 2}),
      nn::Conv2d<T>({.in_channels = 64, .out_channels = 128, .kernel_size = 3, .padding = 1}),
      nn::BatchNorm2d<T>({.num_features = 128}), nn::ReLU<T>{},
      nn::MaxPool2d<T>({.kernel_size = 2}), nn::Flatten<T>{},
      nn::Linear<T>({.in_features = 128 * (height / 4) * (width / 4), .out_features = 512}),
      nn::BatchNorm1d<T>({.num_features = 512}), nn::ReLU<T>{},
      nn::Linear<T>({.in_features = 512, .out_features = num_classes}));
}

}  // namespace bnrelu::models
