// libFuzzer target: parse_safetensors on arbitrary bytes, then a strict load into a small
// model. Either succeeds or throws format_error; a failed load must leave the model unchanged.
// The same bytes read from a file by read_safetensors (header first, then the declared body)
// must be accepted or refused alike, and give the same tensors.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include <bnrelu/bnrelu.hpp>

namespace nn = bnrelu::nn;

namespace {

// conv(1->2, 3x3) bn relu flatten linear(8->3), for 1 x 4 x 4 inputs: the seed corpus holds
// its state_dict.
auto make_model() {
  return nn::Sequential{nn::Conv2d<float>({.in_channels = 1, .out_channels = 2, .kernel_size = 3}),
                        nn::BatchNorm2d<float>({.num_features = 2}), nn::ReLU<float>{}, nn::Flatten<float>{},
                        nn::Linear<float>({.in_features = 8, .out_features = 3})};
}

template <class M>
std::vector<float> snapshot(M& m) {
  std::vector<float> s;
  for (auto& p : m.named_parameters()) s.insert(s.end(), p.value.begin(), p.value.end());
  for (auto& b : m.named_buffers()) s.insert(s.end(), b.value.begin(), b.value.end());
  s.push_back(static_cast<float>(m.template get<1>().num_batches_tracked()));
  return s;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static auto model = make_model();
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  bnrelu::io::SafetensorsFile file, from_disk;
  bool parsed = true, read = true;
  try {
    file = bnrelu::io::parse_safetensors(bytes, "fuzz input");
  } catch (const bnrelu::format_error&) {
    parsed = false;
  }
  // in $TMPDIR, which fuzz/run.sh points into build/fuzz
  static const std::string path =
      (std::filesystem::temp_directory_path() / ("bnrelu_fuzz_safetensors_" + std::to_string(::getpid()))).string();
  if (std::FILE* f = std::fopen(path.c_str(), "wb")) {
    std::fwrite(data, 1, size, f);
    std::fclose(f);
    try {
      from_disk = bnrelu::io::read_safetensors(path);
    } catch (const bnrelu::format_error&) {
      read = false;
    }
    if (read != parsed) __builtin_trap();
    if (read && (from_disk.metadata != file.metadata || from_disk.tensors.size() != file.tensors.size())) __builtin_trap();
    for (const auto& [name, t] : from_disk.tensors) {
      const auto it = file.tensors.find(name);
      if (it == file.tensors.end() || it->second.bytes != t.bytes || it->second.shape != t.shape) __builtin_trap();
    }
  }
  if (!parsed) return 0;
  const auto before = snapshot(model);
  try {
    bnrelu::io::load_state_dict(model, file, "fuzz input");
  } catch (const bnrelu::format_error&) {
    const auto after = snapshot(model);
    // compare bit patterns: NaN loaded by an earlier input must compare equal to itself
    if (std::memcmp(before.data(), after.data(), before.size() * sizeof(float)) != 0) __builtin_trap();
  }
  return 0;
}
