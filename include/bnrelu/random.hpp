// Seeded random numbers for initialisation and shuffling.
#pragma once

#include <cstdint>
#include <random>

namespace bnrelu {

namespace detail {
inline std::mt19937_64& global_generator() {
  static std::mt19937_64 gen{0x5eed'b47c'4e1aULL};
  return gen;
}
}  // namespace detail

// Makes initialisation and shuffling reproducible.
inline void manual_seed(std::uint64_t seed) { detail::global_generator().seed(seed); }

// The generator behind manual_seed, for users who draw their own numbers.
inline std::mt19937_64& generator() { return detail::global_generator(); }

// Uniform in [lo, hi), computed the same way on every platform (53 random bits).
inline double uniform(double lo, double hi) {
  const double u = static_cast<double>(generator()() >> 11) * 0x1.0p-53;
  return lo + (hi - lo) * u;
}

}  // namespace bnrelu
