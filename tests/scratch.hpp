// Files the tests write: a directory of the test process's own under the system's temporary
// directory, created at first use and removed, with everything in it, when the process exits.
// Its name carries the process id, so test processes running side by side never share a file.
#pragma once

#include <unistd.h>

#include <filesystem>
#include <string>
#include <system_error>

namespace bnrelu::test {

inline std::filesystem::path scratch_path(const std::string& name) {
  struct Directory {
    std::filesystem::path path =
        std::filesystem::temp_directory_path() / ("bnrelu_test_" + std::to_string(::getpid()));
    Directory() { std::filesystem::create_directories(path); }
    ~Directory() {
      std::error_code ignored;  // nothing to report to once the tests have ended
      std::filesystem::remove_all(path, ignored);
    }
  };
  static const Directory directory;
  return directory.path / name;
}

}  // namespace bnrelu::test
