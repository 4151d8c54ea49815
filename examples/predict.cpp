// Loads a seed_cnn checkpoint (written by train_mnist or by PyTorch) and writes the eval-mode
// logits of the first test images to a safetensors file, for comparisons across frameworks.
//
//   predict --checkpoint bnrelu_mnist.safetensors --count 64 --out logits.safetensors
#include <CLI/CLI.hpp>
#include <cstdio>
#include <string>

#include <bnrelu/bnrelu.hpp>

int main(int argc, char** argv) {
  std::string checkpoint, out = "logits.safetensors", data = "/usr/share/datasets/fashion-mnist";
  bnrelu::Index count = 64;
  CLI::App app{"Eval-mode logits of a seed_cnn checkpoint on the first test images"};
  app.add_option("--checkpoint", checkpoint, "model state_dict (.safetensors)")->required();
  app.add_option("--data", data, "MNIST-format folder")->capture_default_str();
  app.add_option("--count", count, "number of test images")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--out", out, "where to write the logits")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  try {
    const auto file = bnrelu::io::read_safetensors(checkpoint);
    const auto meta = [&](const char* key, const std::string& fallback) {
      const auto it = file.metadata.find(key);
      return it == file.metadata.end() ? fallback : it->second;
    };
    const auto classes = file.tensors.at("12.bias").numel();
    auto model = bnrelu::models::seed_cnn<float>(1, classes);
    bnrelu::io::load_state_dict(model, file, checkpoint);
    model.eval();
    const auto test = bnrelu::data::load_mnist(data, bnrelu::data::Split::test);
    count = std::min(count, test.images.dimension(0));
    const auto first = bnrelu::data::first_n(test, count);
    bnrelu::data::DataLoader<float> loader(first, {.batch_size = count, .shuffle = false,
                                                   .mean = std::stof(meta("pixel_mean", "0")), .std = std::stof(meta("pixel_std", "1"))});
    bnrelu::data::Batch<float> batch;
    loader.next(batch);
    const auto logits = model.forward(batch.images);
    bnrelu::io::write_safetensors(out, {{"logits", bnrelu::io::RawTensor::from<float>(std::span<const float>(logits.data(), static_cast<std::size_t>(logits.size())), {logits.dimension(0), logits.dimension(1)})}});
    std::printf("wrote %s: logits of %ld test images (%ld classes)\n", out.c_str(), static_cast<long>(count), static_cast<long>(classes));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "predict: %s\n", e.what());
    return 1;
  }
}
