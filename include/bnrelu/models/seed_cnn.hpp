// The founding document's two-block CNN for 28 x 28 inputs.
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
// flatten linear(6272->512) bn1d relu linear(->num_classes)
template <class T>
SeedCNN<T> seed_cnn(Index in_channels, Index num_classes) {
  namespace nn = bnrelu::nn;
  return SeedCNN<T>(
      nn::Conv2d<T>({.in_channels = in_channels, .out_channels = 64, .kernel_size = 3, .padding = 1}),
      nn::BatchNorm2d<T>({.num_features = 64}), nn::ReLU<T>{},
      nn::MaxPool2d<T>({.kernel_size = 2}),
      nn::Conv2d<T>({.in_channels = 64, .out_channels = 128, .kernel_size = 3, .padding = 1}),
      nn::BatchNorm2d<T>({.num_features = 128}), nn::ReLU<T>{},
      nn::MaxPool2d<T>({.kernel_size = 2}), nn::Flatten<T>{},
      nn::Linear<T>({.in_features = 128 * 7 * 7, .out_features = 512}),
      nn::BatchNorm1d<T>({.num_features = 512}), nn::ReLU<T>{},
      nn::Linear<T>({.in_features = 512, .out_features = num_classes}));
}

}  // namespace bnrelu::models
