// CIFAR-10 in its binary version (cifar-10-batches-bin): data_batch_1.bin .. data_batch_5.bin
// for training, test_batch.bin for testing.
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "../error.hpp"
#include "mnist.hpp"

namespace bnrelu::data {

// One record: a label byte (0..9), then 32 x 32 red, green and blue planes, one byte a pixel.
inline constexpr Index kCifarSide = 32;
inline constexpr Index kCifarRecord = 1 + 3 * kCifarSide * kCifarSide;

// The images of one CIFAR-10 binary file, N x 3 x 32 x 32 scaled to [0, 1], and their labels.
// format_error naming the file for a size that is not a whole number of records, or a label
// above 9.
inline ImageSet read_cifar10_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw format_error("read_cifar10: cannot open " + path);
  const std::vector<unsigned char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw format_error("read_cifar10: cannot read " + path);
  const auto size = static_cast<Index>(bytes.size());
  if (size == 0 || size % kCifarRecord != 0)
    throw format_error("read_cifar10: " + path + " has " + std::to_string(size) + " bytes, not a whole number of " +
                       std::to_string(kCifarRecord) + "-byte records");
  const Index N = size / kCifarRecord, plane = 3 * kCifarSide * kCifarSide;
  ImageSet out;
  out.images.resize(N, 3, kCifarSide, kCifarSide);
  out.labels.resize(static_cast<std::size_t>(N));
  for (Index n = 0; n < N; ++n) {
    const unsigned char* r = bytes.data() + n * kCifarRecord;
    if (r[0] > 9)
      throw format_error("read_cifar10: record " + std::to_string(n) + " of " + path + " has label " +
                         std::to_string(r[0]) + "; CIFAR-10 labels are 0 to 9");
    out.labels[static_cast<std::size_t>(n)] = r[0];
    float* to = out.images.data() + n * plane;
    for (Index k = 0; k < plane; ++k) to[k] = static_cast<float>(r[1 + k]) / 255.0f;
  }
  return out;
}

// The training split (data_batch_1.bin .. data_batch_5.bin, in order) or the test split
// (test_batch.bin) of a cifar-10-batches-bin folder. format_error naming the missing file.
inline ImageSet load_cifar10(const std::string& dir, Split split) {
  std::vector<std::string> names;
  if (split == Split::test)
    names = {"test_batch.bin"};
  else
    for (int i = 1; i <= 5; ++i) names.push_back("data_batch_" + std::to_string(i) + ".bin");
  std::vector<ImageSet> parts;
  Index total = 0;
  for (const auto& name : names) {
    const auto path = (std::filesystem::path(dir) / name).string();
    if (!std::filesystem::is_regular_file(path)) throw format_error("load_cifar10: no file " + path);
    parts.push_back(read_cifar10_file(path));
    total += parts.back().images.dimension(0);
  }
  ImageSet out;
  out.images.resize(total, 3, kCifarSide, kCifarSide);
  Index at = 0;
  for (const auto& p : parts) {
    std::copy_n(p.images.data(), p.images.size(), out.images.data() + at);
    at += p.images.size();
    out.labels.insert(out.labels.end(), p.labels.begin(), p.labels.end());
  }
  return out;
}

}  // namespace bnrelu::data
