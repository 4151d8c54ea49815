// libFuzzer target: read_idx on arbitrary bytes (raw or gzip) must return or throw
// format_error, never crash, hang or allocate without bound.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>

#include <bnrelu/data/idx.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // in $TMPDIR, which fuzz/run.sh points into build/fuzz
  static const std::string path =
      (std::filesystem::temp_directory_path() / ("bnrelu_fuzz_idx_" + std::to_string(::getpid()))).string();
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return 0;
  std::fwrite(data, 1, size, f);
  std::fclose(f);
  try {
    const auto a = bnrelu::data::read_idx(path);
    bnrelu::Index n = 1;
    for (auto d : a.dims) n *= d;
    if (n != a.size()) __builtin_trap();  // the header and the data must agree
  } catch (const bnrelu::format_error&) {
  }
  return 0;
}
