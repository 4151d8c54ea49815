// ONNX export: the graph ONNX's checker accepts, the operators each layer becomes, refusals that
// touch no file, and ONNX Runtime (the npm package onnxruntime-node, run through node) giving
// bnrelu's logits.
#include <bnrelu/io/onnx.hpp>
#include <bnrelu/models/resnet.hpp>
#include <bnrelu/models/seed_cnn.hpp>
#include <bnrelu/random.hpp>

#include <onnx/checker.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "../scratch.hpp"

namespace nn = bnrelu::nn;
namespace fs = std::filesystem;
using bnrelu::Index;
using bnrelu::Tensor;
using bnrelu::test::scratch_path;

namespace {

template <int R>
Tensor<float, R> random_input(const bnrelu::Dims<R>& d) {
  Tensor<float, R> x(d);
  bnrelu::fill_uniform(x.data(), x.size(), -1, 1);
  return x;
}

// Running statistics and affine parameters away from their initial 0/1, so that an exporter that
// dropped or swapped them would change the logits.
template <class Model>
void perturb_batchnorms(Model& model) {
  for (auto& b : model.named_buffers()) {
    if (!b.name.ends_with("running_mean") && !b.name.ends_with("running_var")) continue;
    const bool var = b.name.ends_with("var");
    for (auto& v : b.value) v = static_cast<float>(var ? bnrelu::uniform(0.5, 2) : bnrelu::uniform(-0.3, 0.3));
  }
  for (auto& p : model.named_parameters())
    if (p.shape.size() == 1 && p.name.ends_with("weight"))  // a batch norm's gamma
      for (auto& v : p.value) v = static_cast<float>(bnrelu::uniform(0.5, 1.5));
}

std::vector<std::string> op_types(const onnx::ModelProto& m) {
  std::vector<std::string> ops;
  for (const auto& n : m.graph().node()) ops.push_back(n.op_type());
  return ops;
}

TEST(OnnxExport, SeedCnnGraphIsValidWithADynamicBatch) {
  bnrelu::manual_seed(1);
  auto model = bnrelu::models::seed_cnn<float>(1, 10);
  model.eval();
  const onnx::ModelProto m = bnrelu::io::to_onnx(model, bnrelu::Dims<4>{2, 1, 28, 28});
  EXPECT_NO_THROW(onnx::checker::check_model(m));
  EXPECT_EQ(op_types(m), (std::vector<std::string>{"Conv", "BatchNormalization", "Relu", "MaxPool", "Conv",
                                                   "BatchNormalization", "Relu", "MaxPool", "Flatten", "Gemm",
                                                   "BatchNormalization", "Relu", "Gemm"}));
  ASSERT_EQ(m.graph().input_size(), 1);
  const auto& in = m.graph().input(0).type().tensor_type().shape();
  ASSERT_EQ(in.dim_size(), 4);
  EXPECT_EQ(in.dim(0).dim_param(), "batch");
  EXPECT_EQ(in.dim(3).dim_value(), 28);
  const auto& out = m.graph().output(0).type().tensor_type().shape();
  ASSERT_EQ(out.dim_size(), 2);
  EXPECT_EQ(out.dim(1).dim_value(), 10);
  // every parameter and running statistic, under its state_dict name
  std::vector<std::string> names;
  for (const auto& t : m.graph().initializer()) names.push_back(t.name());
  for (const auto& p : model.named_parameters())
    EXPECT_NE(std::find(names.begin(), names.end(), p.name), names.end()) << p.name;
  for (const auto& b : model.named_buffers()) {
    if (b.name.ends_with("num_batches_tracked")) continue;
    EXPECT_NE(std::find(names.begin(), names.end(), b.name), names.end()) << b.name;
  }
}

TEST(OnnxExport, FoldedModelExportsConvAndGemmWithTheirReLU) {
  auto model = bnrelu::models::seed_cnn<float>(1, 10);
  model.fuse_for_inference();
  const onnx::ModelProto m = bnrelu::io::to_onnx(model, bnrelu::Dims<4>{1, 1, 28, 28});
  EXPECT_NO_THROW(onnx::checker::check_model(m));
  EXPECT_EQ(op_types(m), (std::vector<std::string>{"Conv", "Relu", "MaxPool", "Conv", "Relu", "MaxPool", "Flatten",
                                                   "Gemm", "Relu", "Gemm"}));
}

TEST(OnnxExport, ResNet20HasAnAddAndReLUPerBlock) {
  auto model = bnrelu::models::resnet20<float>(3, 10);
  model.eval();
  const onnx::ModelProto m = bnrelu::io::to_onnx(model, bnrelu::Dims<4>{1, 3, 32, 32});
  EXPECT_NO_THROW(onnx::checker::check_model(m));
  const auto ops = op_types(m);
  EXPECT_EQ(std::count(ops.begin(), ops.end(), "Add"), 9);
  EXPECT_EQ(std::count(ops.begin(), ops.end(), "Conv"), 21);  // 19 + 2 projection shortcuts
  EXPECT_EQ(std::count(ops.begin(), ops.end(), "GlobalAveragePool"), 1);
}

TEST(OnnxExport, PoolingLayersBecomeTheirOperators) {
  nn::Sequential model(nn::AvgPool2d<float>({.kernel_size = 3, .stride = 2, .padding = 1, .count_include_pad = false}),
                       nn::AdaptiveAvgPool2d<float>({.output_size = 2}), nn::Dropout<float>({.p = 0.3}),
                       nn::Identity<float>{}, nn::Flatten<float>{});
  model.eval();
  const onnx::ModelProto m = bnrelu::io::to_onnx(model, bnrelu::Dims<4>{1, 2, 8, 8});
  EXPECT_NO_THROW(onnx::checker::check_model(m));
  EXPECT_EQ(op_types(m), (std::vector<std::string>{"AveragePool", "AveragePool", "Flatten"}));
  EXPECT_EQ(m.graph().node(0).attribute(3).name(), "count_include_pad");
  EXPECT_EQ(m.graph().node(0).attribute(3).i(), 0);
  EXPECT_EQ(m.graph().node(2).output(0), "output");
}

TEST(OnnxExport, ALoneLayerKeepsItsStateDictNames) {
  nn::Conv2d<float> conv({.in_channels = 2, .out_channels = 3, .kernel_size = 3, .padding = 1});
  const onnx::ModelProto m = bnrelu::io::to_onnx(conv, {1, 2, 5, 5});
  EXPECT_NO_THROW(onnx::checker::check_model(m));
  ASSERT_EQ(m.graph().initializer_size(), 2);
  EXPECT_EQ(m.graph().initializer(0).name(), "weight");
  EXPECT_EQ(m.graph().initializer(1).name(), "bias");
  EXPECT_EQ(m.graph().node(0).output(0), "output");
}

// A layer of the user's own, which the exporter cannot know.
struct Doubler : nn::Module {
  using value_type = float;
  using input_type = Tensor<float, 4>;
  using output_type = Tensor<float, 4>;
  bnrelu::Dims<4> output_dims(const bnrelu::Dims<4>& in) const { return in; }
  Tensor<float, 4> forward(const Tensor<float, 4>& x) { return x * 2.0f; }
  Tensor<float, 4> backward(const Tensor<float, 4>& dy) { return dy * 2.0f; }
  void zero_grad() {}
  std::vector<bnrelu::ParamRef<float>> named_parameters() { return {}; }
  std::vector<bnrelu::BufferRef<float>> named_buffers() { return {}; }
};

TEST(OnnxExport, RefusesWhatOnnxCannotExpressAndWritesNothing) {
  const fs::path path = scratch_path("refused.onnx");
  {
    std::ofstream(path) << "old";
  }
  auto old_content = [&] {
    std::ifstream f(path);
    return std::string(std::istreambuf_iterator<char>(f), {});
  };
  nn::Sequential custom(nn::ReLU<float>{}, Doubler{});
  EXPECT_THROW(bnrelu::io::save_onnx(custom, path.string(), bnrelu::Dims<4>{1, 1, 4, 4}), std::invalid_argument);
  nn::Sequential uneven(nn::AdaptiveAvgPool2d<float>({.output_size = 3}));
  EXPECT_THROW(bnrelu::io::save_onnx(uneven, path.string(), bnrelu::Dims<4>{1, 1, 7, 7}), std::invalid_argument);
  nn::Sequential batch_only(nn::BatchNorm2d<float>({.num_features = 2, .track_running_stats = false}));
  EXPECT_THROW(bnrelu::io::save_onnx(batch_only, path.string(), bnrelu::Dims<4>{1, 2, 4, 4}), std::invalid_argument);
  auto model = bnrelu::models::seed_cnn<float>(1, 10);
  EXPECT_THROW(bnrelu::io::save_onnx(model, path.string(), bnrelu::Dims<4>{1, 3, 28, 28}), bnrelu::shape_error);
  EXPECT_THROW(bnrelu::io::save_onnx(model, path.string(), bnrelu::Dims<4>{1, 1, 20, 20}), bnrelu::shape_error);
  EXPECT_EQ(old_content(), "old");
  EXPECT_THROW(bnrelu::io::save_onnx(model, (scratch_path("no_such_dir") / "m.onnx").string(), bnrelu::Dims<4>{1, 1, 28, 28}),
               std::runtime_error);
  EXPECT_THROW(bnrelu::io::save_onnx(model, path.string(), {1, 1, 0, 28}), bnrelu::shape_error);
  EXPECT_THROW(bnrelu::io::save_onnx(model, path.string(), {1, 28}), std::invalid_argument);  // rank 2 into a Conv2d
  EXPECT_EQ(old_content(), "old");
  bnrelu::io::save_onnx(model, path.string(), {1, 1, 28, 28});  // as docs/api.md writes it
  EXPECT_NO_THROW(onnx::checker::check_model(path.string()));
}

#ifdef BNRELU_ORT_SCRIPT
// Runs the exported model in ONNX Runtime on x and returns its output.
std::vector<float> run_onnxruntime(const fs::path& model, const Tensor<float, 4>& x, Index out_size) {
  const fs::path in = model.string() + ".in", out = model.string() + ".out";
  {
    std::ofstream f(in, std::ios::binary);
    f.write(reinterpret_cast<const char*>(x.data()), static_cast<std::streamsize>(x.size() * sizeof(float)));
  }
  const auto d = x.dimensions();
  const std::string dims = std::to_string(d[0]) + "x" + std::to_string(d[1]) + "x" + std::to_string(d[2]) + "x" +
                           std::to_string(d[3]);
  const std::string cmd = std::string(BNRELU_NODE) + " " + BNRELU_ORT_SCRIPT + " " + model.string() + " " +
                          in.string() + " " + dims + " " + out.string();
  const int rc = std::system(cmd.c_str());
  EXPECT_EQ(rc, 0) << cmd;
  std::vector<float> y(static_cast<std::size_t>(out_size));
  std::ifstream f(out, std::ios::binary);
  f.read(reinterpret_cast<char*>(y.data()), static_cast<std::streamsize>(y.size() * sizeof(float)));
  EXPECT_EQ(f.gcount(), static_cast<std::streamsize>(y.size() * sizeof(float))) << "ONNX Runtime's output is short";
  return y;
}

// max |a - b| over max |b|: the logits' difference relative to the largest logit.
double relative_difference(const std::vector<float>& a, const Tensor<float, 2>& b) {
  double diff = 0, scale = 0;
  for (Index i = 0; i < b.size(); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(a[static_cast<std::size_t>(i)]) - b.data()[i]));
    scale = std::max(scale, std::abs(static_cast<double>(b.data()[i])));
  }
  return diff / scale;
}

// The model's eval-mode logits and, after fuse_for_inference, the folded model's, against ONNX
// Runtime's on the exported file, at batch 1 and 64.
template <class Model>
void expect_onnxruntime_agrees(Model model, const std::string& name, Index C, Index H, Index W) {
  perturb_batchnorms(model);
  model.eval();
  for (bool folded : {false, true}) {
    if (folded) model.fuse_for_inference();
    const fs::path path = scratch_path(name + (folded ? "_folded.onnx" : "_eval.onnx"));
    bnrelu::io::save_onnx(model, path.string(), bnrelu::Dims<4>{1, C, H, W});
    for (Index batch : {Index{1}, Index{64}}) {
      SCOPED_TRACE(path.filename().string() + ", batch " + std::to_string(batch));
      const auto x = random_input<4>({batch, C, H, W});
      const Tensor<float, 2> y = model.forward(x);
      const auto ort = run_onnxruntime(path, x, y.size());
      EXPECT_LE(relative_difference(ort, y), 1e-5);
    }
  }
}

TEST(OnnxRuntime, RunsTheExportedSeedCnnWithBnrelusLogits) {
  bnrelu::manual_seed(7);
  expect_onnxruntime_agrees(bnrelu::models::seed_cnn<float>(1, 10), "seed", 1, 28, 28);
}

TEST(OnnxRuntime, RunsTheExportedResNet20WithBnrelusLogits) {
  bnrelu::manual_seed(8);
  expect_onnxruntime_agrees(bnrelu::models::resnet20<float>(3, 10), "resnet20", 3, 32, 32);
}
#endif

}  // namespace
