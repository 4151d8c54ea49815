// Seeded random numbers for initialisation and shuffling.
//
// One process-wide generator, as PyTorch's default generator: manual_seed on any thread seeds
// what every thread draws next. Each draw takes a lock, so threads that build models at the
// same time are safe; the values each thread gets then depend on how their draws interleave.
// For reproducible results from several threads, seed and build on one thread, or build under
// a lock of your own.
#pragma once

#include <cstdint>
#include <mutex>
#include <random>

namespace bnrelu {

namespace detail {
struct GlobalGenerator {
  std::mutex mutex;
  std::mt19937_64 engine{0x5eed'b47c'4e1aULL};
};
inline GlobalGenerator& global_generator() {
  static GlobalGenerator gen;
  return gen;
}
// 53 random bits as a double in [0, 1), computed the same way on every platform.
inline double unit(std::mt19937_64& engine) { return static_cast<double>(engine() >> 11) * 0x1.0p-53; }
}  // namespace detail

// Makes initialisation and shuffling reproducible.
inline void manual_seed(std::uint64_t seed) {
  auto& g = detail::global_generator();
  std::lock_guard lock(g.mutex);
  g.engine.seed(seed);
}

// The generator behind manual_seed, for users who draw their own numbers. Not locked: draw
// from it on one thread at a time, or use uniform() / fill_uniform(), which lock.
inline std::mt19937_64& generator() { return detail::global_generator().engine; }

// Uniform in [lo, hi).
inline double uniform(double lo, double hi) {
  auto& g = detail::global_generator();
  std::lock_guard lock(g.mutex);
  return lo + (hi - lo) * detail::unit(g.engine);
}

// out[i] = uniform(lo, hi) for i in [0, n), the same values as n calls in a row, under one lock.
template <class T>
void fill_uniform(T* out, std::int64_t n, double lo, double hi) {
  auto& g = detail::global_generator();
  std::lock_guard lock(g.mutex);
  for (std::int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(lo + (hi - lo) * detail::unit(g.engine));
}

}  // namespace bnrelu
