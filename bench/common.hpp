// Shared pieces of the benchmark programs: the build's vector ISA and BatchNorm's streaming
// threshold in every report, a STREAM triad for the machine's memory limit, one pass over
// memory written each way the kernels write, and helpers for tensors and thread counts.
#pragma once

#include <benchmark/benchmark.h>
#include <omp.h>

#include <string>
#include <vector>

#include <bnrelu/kernels/simd.hpp>
#include <bnrelu/kernels/tuning.hpp>
#include <bnrelu/random.hpp>
#include <bnrelu/tensor.hpp>
#include <bnrelu/threads.hpp>

namespace bnrelu::bench {

// The vector instructions this build's kernels use, in every report's context (the console
// header and the JSON "context"), next to Google Benchmark's own CPU and cache lines.
inline const char* build_isa() {
#if defined(__AVX512F__)
  return "AVX-512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "AVX2 + FMA";
#elif defined(__AVX__)
  return "AVX";
#else
  return "SSE2";
#endif
}
inline const bool isa_in_context = (benchmark::AddCustomContext("bnrelu_isa", build_isa()), true);

// The BatchNorm streaming-store threshold this run's kernels took from the machine's caches
// (kernels/tuning.hpp), in KiB, beside the ISA.
inline const bool stream_threshold_in_context =
    (benchmark::AddCustomContext("bnrelu_stream_threshold_kib",
                                 std::to_string(kernels::detail::stream_threshold() >> 10)),
     true);

// Benchmark buffers aligned as the library's tensors are (Eigen's allocator: to the widest
// packet the build uses). A plain std::vector of a large size starts 16 bytes past a page
// boundary, and in an AVX-512 build every 64-byte load or store then touches two cache lines
// (docs/performance.md, Portable and native builds, measures what that cost).
template <class T>
using AlignedVector = std::vector<T, Eigen::aligned_allocator<T>>;

// a = b + s * c over arrays far larger than the L3 cache; bytes moved = 3 arrays (STREAM's
// convention, no write-allocate traffic counted).
inline void stream_triad(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  const Index n = Index{1} << 25;  // 3 x 128 MiB
  AlignedVector<float> a(n), b(n, 1.0f), c(n, 2.0f);
  // plain OpenMP loops: bnrelu::set_num_threads leaves OpenMP's default count alone
#pragma omp parallel for schedule(static) num_threads(threads)
  for (Index i = 0; i < n; ++i) a[i] = 0;  // first touch by the threads that use the pages
  const float s = 3.0f;
  for (auto _ : state) {
#pragma omp parallel for simd schedule(static) num_threads(threads)
    for (Index i = 0; i < n; ++i) a[i] = b[i] + s * c[i];
    benchmark::DoNotOptimize(a.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * 3 * n * static_cast<Index>(sizeof(float)));
  state.counters["threads"] = threads;
}

// What one pass over a tensor far larger than the caches costs by the way it writes: the
// passes of BatchNorm, the add and the ReLU are each one of these. Bytes counted: the tensors
// the pass reads and writes (a read and an in-place write of one tensor count 2), as the
// fused and unfused rows count theirs.
enum class MemoryPass {
  read,            // sum of x
  write_in_place,  // x = -x: each line read, then written back from the cache
  write,           // y = -x: y's lines are read in before they are written (write-allocate)
  stream_write,    // y = -x with non-temporal stores: y's lines are written around the caches
};

inline void memory_pass(benchmark::State& state, MemoryPass pass) {
  namespace simd = kernels::simd;
  const int threads = static_cast<int>(state.range(0));
  const Index n = Index{1} << 26;  // 256 MiB per array
  constexpr Index L = simd::width<float>;
  AlignedVector<float> x(n), y(n);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (Index i = 0; i < n; ++i) x[i] = y[i] = 1.0f;  // first touch by the threads that use the pages
  const auto zero = simd::set1<float>(0.0f);
  for (auto _ : state) {
    float total = 0;
#pragma omp parallel for schedule(static) reduction(+ : total) num_threads(threads)
    for (Index b = 0; b < n; b += 4096) {  // blocks of 16 KiB
      auto sum = zero;
      for (Index i = b; i < b + 4096; i += L) {
        const auto v = simd::load(&x[i]);
        switch (pass) {
          case MemoryPass::read: sum = simd::padd(sum, v); break;
          case MemoryPass::write_in_place: simd::store(&x[i], simd::psub(zero, v)); break;
          case MemoryPass::write: simd::store(&y[i], simd::psub(zero, v)); break;
          case MemoryPass::stream_write: simd::stream(&y[i], simd::psub(zero, v)); break;
        }
      }
      total += Eigen::internal::predux(sum);
    }
    if (pass == MemoryPass::stream_write) simd::stream_fence();
    benchmark::DoNotOptimize(total);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * (pass == MemoryPass::read ? 1 : 2) * n *
                          static_cast<Index>(sizeof(float)));
  state.counters["threads"] = threads;
}

template <int Rank>
Tensor<float, Rank> random_tensor(const Dims<Rank>& d) {
  Tensor<float, Rank> t(d);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<float>(uniform(-2, 2));
  return t;
}

}  // namespace bnrelu::bench
