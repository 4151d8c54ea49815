// The library's exception types.
#pragma once

#include <stdexcept>
#include <string>

namespace bnrelu {

// A wrong shape, rank or option; thrown before any state changes.
class shape_error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// A bad or truncated file.
class format_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace bnrelu
