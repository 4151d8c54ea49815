// He et al.'s CIFAR-style ResNet-20 (Deep Residual Learning for Image Recognition, 2016,
// section 4.2), for inputs of any size.
#pragma once

#include "../nn/avgpool2d.hpp"
#include "../nn/batchnorm.hpp"
#include "../nn/conv2d.hpp"
#include "../nn/flatten.hpp"
#include "../nn/linear.hpp"
#include "../nn/relu.hpp"
#include "../nn/residual.hpp"
#include "../nn/sequential.hpp"

namespace bnrelu::models {

// conv3x3, BN, ReLU, conv3x3, BN: a basic block's main branch.
template <class T>
using BasicMain = nn::Sequential<nn::Conv2d<T>, nn::BatchNorm2d<T>, nn::ReLU<T>, nn::Conv2d<T>, nn::BatchNorm2d<T>>;
// A block that keeps the shape (identity shortcut), and one that halves H and W and widens
// the channels (1x1 stride-2 conv + BN shortcut).
template <class T>
using BasicBlock = nn::Residual<BasicMain<T>>;
template <class T>
using DownBlock = nn::Residual<BasicMain<T>, nn::Sequential<nn::Conv2d<T>, nn::BatchNorm2d<T>>>;

template <class T>
using ResNet20 = nn::Sequential<nn::Conv2d<T>, nn::BatchNorm2d<T>, nn::ReLU<T>,                //
                                BasicBlock<T>, BasicBlock<T>, BasicBlock<T>,                   // 16 channels
                                DownBlock<T>, BasicBlock<T>, BasicBlock<T>,                    // 32, H/2
                                DownBlock<T>, BasicBlock<T>, BasicBlock<T>,                    // 64, H/4
                                nn::AdaptiveAvgPool2d<T>, nn::Flatten<T>, nn::Linear<T>>;

namespace detail {

template <class T>
nn::Conv2d<T> conv3x3(Index in, Index out, Index stride) {
  return nn::Conv2d<T>(
      {.in_channels = in, .out_channels = out, .kernel_size = 3, .stride = stride, .padding = 1, .bias = false});
}

template <class T>
BasicMain<T> basic_main(Index in, Index out, Index stride) {
  return BasicMain<T>(conv3x3<T>(in, out, stride), nn::BatchNorm2d<T>({.num_features = out}), nn::ReLU<T>{},
                      conv3x3<T>(out, out, 1), nn::BatchNorm2d<T>({.num_features = out}));
}

template <class T>
BasicBlock<T> basic_block(Index channels) {
  return BasicBlock<T>(basic_main<T>(channels, channels, 1));
}

template <class T>
DownBlock<T> down_block(Index in, Index out) {
  return DownBlock<T>(basic_main<T>(in, out, 2),
                      nn::Sequential<nn::Conv2d<T>, nn::BatchNorm2d<T>>(
                          nn::Conv2d<T>({.in_channels = in, .out_channels = out, .kernel_size = 1, .stride = 2, .bias = false}),
                          nn::BatchNorm2d<T>({.num_features = out})));
}

}  // namespace detail

// A 3x3 conv to 16 channels, BN, ReLU; three stages of three basic blocks at 16, 32 and 64
// channels, the first block of stages 2 and 3 with stride 2 and a projection shortcut; global
// average pooling; a Linear to num_classes. Convolutions have no bias (BatchNorm follows each).
// Layers are initialised as PyTorch initialises them (the generator of manual_seed).
template <class T>
ResNet20<T> resnet20(Index in_channels, Index num_classes) {
  using namespace detail;
  return ResNet20<T>(conv3x3<T>(in_channels, 16, 1), nn::BatchNorm2d<T>({.num_features = 16}), nn::ReLU<T>{},
                     basic_block<T>(16), basic_block<T>(16), basic_block<T>(16),  //
                     down_block<T>(16, 32), basic_block<T>(32), basic_block<T>(32),  //
                     down_block<T>(32, 64), basic_block<T>(64), basic_block<T>(64),  //
                     nn::AdaptiveAvgPool2d<T>({.output_size = 1}), nn::Flatten<T>{},
                     nn::Linear<T>({.in_features = 64, .out_features = num_classes}));
}

}  // namespace bnrelu::models
