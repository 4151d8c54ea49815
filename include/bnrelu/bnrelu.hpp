// bnrelu: CNN layers over Eigen tensors with BatchNorm and ReLU fused into one pass.
#pragma once

#include "error.hpp"
#include "random.hpp"
#include "tensor.hpp"
#include "threads.hpp"

#include "nn/avgpool2d.hpp"
#include "nn/batchnorm.hpp"
#include "nn/batchnorm_relu.hpp"
#include "nn/conv2d.hpp"
#include "nn/dropout.hpp"
#include "nn/flatten.hpp"
#include "nn/identity.hpp"
#include "nn/layer.hpp"
#include "nn/linear.hpp"
#include "nn/loss.hpp"
#include "nn/maxpool2d.hpp"
#include "nn/relu.hpp"
#include "nn/residual.hpp"
#include "nn/sequential.hpp"

#include "models/resnet.hpp"
#include "models/seed_cnn.hpp"

#include "data/idx.hpp"
#include "data/loader.hpp"
#include "data/mnist.hpp"
#include "io/safetensors.hpp"
#include "optim/adam.hpp"
#include "optim/scheduler.hpp"
#include "optim/sgd.hpp"
#include "testing/gradcheck.hpp"
