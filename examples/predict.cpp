// Loads a seed_cnn or resnet20 checkpoint (written by train_mnist or by PyTorch) and writes the
// eval-mode logits of the first test images to a safetensors file, for comparisons across
// frameworks. The model is told by the checkpoint's names.
//
//   predict --checkpoint bnrelu_mnist.safetensors --count 64 --out logits.safetensors
#include <CLI/CLI.hpp>
#include <cstdio>
#include <string>

#include <bnrelu/bnrelu.hpp>

int main(int argc, char** argv) {
  std::string checkpoint, out = "logits.safetensors", data = "/usr/share/datasets/fashion-mnist";
  bnrelu::Index count = 64;
  CLI::App app{"Eval-mode logits of a seed_cnn or resnet20 checkpoint on the first test images"};
  app.add_option("--checkpoint", checkpoint, "model state_dict (.safetensors)")->required();
  app.add_option("--data", data, "MNIST-format folder")->capture_default_str();
  app.add_option("--count", count, "number of test images")->capture_default_str()->check(CLI::Range(bnrelu::Index{1}, bnrelu::Index{1} << 30));
  app.add_option("--out", out, "where to write the logits")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  try {
    const auto file = bnrelu::io::read_safetensors(checkpoint);
    // the last layer (seed_cnn's 12, resnet20's 14) tells the number of classes
    const bool resnet = file.tensors.count("3.main.0.weight") != 0;
    const std::string last_name = resnet ? "14.bias" : "12.bias";
    const auto last = file.tensors.find(last_name);
    if (last == file.tensors.end() || last->second.shape.size() != 1 || last->second.numel() < 1)
      throw bnrelu::format_error(checkpoint + " is no " + (resnet ? "resnet20" : "seed_cnn") +
                                 " checkpoint: it lacks a 1-D tensor " + last_name);
    const auto classes = last->second.numel();
    // the pixel normalisation train_mnist recorded (none for a checkpoint written elsewhere)
    const auto meta = [&](const char* key, double fallback) {
      return file.metadata.count(key) ? bnrelu::io::metadata_number<double>(file, key, -1e6, 1e6) : fallback;
    };
    const double pixel_mean = meta("pixel_mean", 0), pixel_std = meta("pixel_std", 1);
    if (!(pixel_std > 0)) throw bnrelu::format_error(checkpoint + ": metadata pixel_std must be > 0");
    const auto test = bnrelu::data::load_mnist(data, bnrelu::data::Split::test);
    count = std::min(count, test.images.dimension(0));
    const auto first = bnrelu::data::first_n(test, count);
    bnrelu::data::DataLoader<float> loader(first, {.batch_size = count, .shuffle = false,
                                                   .mean = static_cast<float>(pixel_mean), .std = static_cast<float>(pixel_std)});
    bnrelu::data::Batch<float> batch;
    loader.next(batch);
    const auto run = [&](auto model) {
      bnrelu::io::load_state_dict(model, file, checkpoint);
      model.eval();
      return model.forward(batch.images);
    };
    const auto logits = resnet ? run(bnrelu::models::resnet20<float>(1, classes))
                               : run(bnrelu::models::seed_cnn<float>(1, classes, test.images.dimension(2),
                                                                     test.images.dimension(3)));
    bnrelu::io::write_safetensors(out, {{"logits", bnrelu::io::RawTensor::from<float>(std::span<const float>(logits.data(), static_cast<std::size_t>(logits.size())), {logits.dimension(0), logits.dimension(1)})}});
    std::printf("wrote %s: logits of %ld test images (%ld classes)\n", out.c_str(), static_cast<long>(count), static_cast<long>(classes));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "predict: %s\n", e.what());
    return 1;
  }
}
