// Image sets in memory, and MNIST-format ones (MNIST, Fashion-MNIST, ...) from a folder of IDX
// files.
#pragma once

#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "idx.hpp"

namespace bnrelu::data {

enum class Split { train, test };

// A labelled image set in memory: the type every loader and reader here works with.
struct ImageSet {
  Tensor<float, 4> images;             // N x C x H x W in [0, 1]
  std::vector<std::int64_t> labels;    // N class ids
};
// An MNIST-format set: an ImageSet of N x 1 x H x W images.
using Mnist = ImageSet;

// The file of one split and kind, under either naming users meet ("train-images-idx3-ubyte"
// or "train-images.idx3-ubyte"), with or without ".gz". format_error naming every path tried
// when none exists.
inline std::string find_mnist_file(const std::string& dir, Split split, bool images) {
  const std::string prefix = split == Split::train ? "train" : "t10k";
  const std::string kind = images ? "images" : "labels";
  const std::string idx = images ? "idx3-ubyte" : "idx1-ubyte";
  std::string tried;
  for (const std::string sep : {"-", "."})
    for (const std::string ext : {"", ".gz"}) {
      const auto p = std::filesystem::path(dir) / (prefix + "-" + kind + sep + idx + ext);
      if (std::filesystem::is_regular_file(p)) return p.string();
      tried += "\n  " + p.string();
    }
  throw format_error("load_mnist: no " + prefix + " " + kind + " file in " + dir + "; tried:" + tried);
}

// Loads one split: images scaled to [0, 1], labels as class ids.
inline Mnist load_mnist(const std::string& dir, Split split) {
  const std::string image_path = find_mnist_file(dir, split, true);
  const std::string label_path = find_mnist_file(dir, split, false);
  const IdxArray images = read_idx(image_path);
  const IdxArray labels = read_idx(label_path);
  if (images.dims.size() != 3 || !std::holds_alternative<std::vector<std::uint8_t>>(images.data))
    throw format_error("load_mnist: " + image_path + " must hold u8 images N x H x W, got " +
                       shape_string(images.dims));
  if (labels.dims.size() != 1 || !std::holds_alternative<std::vector<std::uint8_t>>(labels.data))
    throw format_error("load_mnist: " + label_path + " must hold N u8 labels, got " + shape_string(labels.dims));
  if (images.dims[1] < 1 || images.dims[2] < 1 || images.dims[1] > 4096 || images.dims[2] > 4096)
    throw format_error("load_mnist: " + image_path + " has images of " + std::to_string(images.dims[1]) + " x " +
                       std::to_string(images.dims[2]) + "; expected 1 to 4096 pixels a side");
  if (labels.dims[0] != images.dims[0])
    throw format_error("load_mnist: " + std::to_string(images.dims[0]) + " images but " +
                       std::to_string(labels.dims[0]) + " labels");
  Mnist out;
  out.images.resize(images.dims[0], 1, images.dims[1], images.dims[2]);
  const auto& pixels = std::get<std::vector<std::uint8_t>>(images.data);
  for (std::size_t i = 0; i < pixels.size(); ++i) out.images.data()[i] = static_cast<float>(pixels[i]) / 255.0f;
  const auto& ids = std::get<std::vector<std::uint8_t>>(labels.data);
  out.labels.assign(ids.begin(), ids.end());
  return out;
}

// The first n images of a set and their labels (all of them when n <= 0 or n >= its size).
inline Mnist first_n(const Mnist& set, Index n) {
  if (n <= 0 || n >= set.images.dimension(0)) return set;
  Mnist out;
  const Dims<4> extent{n, set.images.dimension(1), set.images.dimension(2), set.images.dimension(3)};
  out.images = set.images.slice(Dims<4>{0, 0, 0, 0}, extent);
  out.labels.assign(set.labels.begin(), set.labels.begin() + n);
  return out;
}
// The same for a set about to be dropped (first_n(load_mnist(...), n)): kept whole, it is moved.
inline Mnist first_n(Mnist&& set, Index n) {
  if (n <= 0 || n >= set.images.dimension(0)) return std::move(set);
  return first_n(std::as_const(set), n);
}

}  // namespace bnrelu::data
