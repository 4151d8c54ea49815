// The matrix products of the seed CNN's inference at the shapes its kernels hand them over, on
// one thread: by Eigen, as the kernels call it (row-major maps, `noalias()`), and by oneDNN's
// dnnl_sgemm where oneDNN is usable (the other GEMM Debian packages), next to each other. GFLOP/s
// count 2 m n k per product.
//
//   winograd_image   conv2 64 -> 128 at 14 x 14: one of Winograd's 16 products for one image,
//                    U[xi] (128 x 64) * V[xi] (64 x 49 tiles)
//   winograd_16      the same product over 16 images' tiles (64 x 784)
//   conv1_im2col     conv1 1 -> 64 at 28 x 28: the weight (64 x 9) * im2col's columns (9 x 784)
//   fc1_batch64      fc1 6272 -> 512 at batch 64: x (64 x 6272) * W^T, W 512 x 6272
//   fc1_batch1       the same at batch 1: W x, a matrix-vector product
#include <benchmark/benchmark.h>
#include <omp.h>

#include <string>
#include <vector>

#include <bnrelu/kernels/matrix.hpp>
#ifdef BNRELU_HAVE_DNNL
#include <dnnl.h>
#endif

#include "common.hpp"

namespace {

using bnrelu::Index;
namespace k = bnrelu::kernels;

struct Product {
  const char* name;
  Index m, n, k;
  bool b_transposed;  // B given as its transpose (n x k, row-major): Linear's weight
};

struct Operands {
  std::vector<float> a, b, c;
  explicit Operands(const Product& p)
      : a(static_cast<std::size_t>(p.m * p.k)), b(static_cast<std::size_t>(p.k * p.n)),
        c(static_cast<std::size_t>(p.m * p.n)) {
    bnrelu::fill_uniform(a.data(), p.m * p.k, -1, 1);
    bnrelu::fill_uniform(b.data(), p.k * p.n, -1, 1);
  }
};

void set_rate(benchmark::State& state, const Product& p) {
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * static_cast<double>(p.m * p.n * p.k) * 1e-9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

void eigen(benchmark::State& state, const Product& p) {
  Operands o(p);
  k::ConstMatrixMap<float> a(o.a.data(), p.m, p.k);
  k::MatrixMap<float> c(o.c.data(), p.m, p.n);
  for (auto _ : state) {
    if (p.b_transposed)
      c.noalias() = a * k::ConstMatrixMap<float>(o.b.data(), p.n, p.k).transpose();
    else
      c.noalias() = a * k::ConstMatrixMap<float>(o.b.data(), p.k, p.n);
    benchmark::DoNotOptimize(o.c.data());
    benchmark::ClobberMemory();
  }
  set_rate(state, p);
}

#ifdef BNRELU_HAVE_DNNL
void onednn(benchmark::State& state, const Product& p) {
  Operands o(p);
  const auto m = static_cast<dnnl_dim_t>(p.m), n = static_cast<dnnl_dim_t>(p.n), kk = static_cast<dnnl_dim_t>(p.k);
  for (auto _ : state) {
    const dnnl_status_t status = dnnl_sgemm('N', p.b_transposed ? 'T' : 'N', m, n, kk, 1.0f, o.a.data(), kk,
                                            o.b.data(), p.b_transposed ? kk : n, 0.0f, o.c.data(), n);
    if (status != dnnl_success) {
      state.SkipWithError("dnnl_sgemm failed");
      break;
    }
    benchmark::DoNotOptimize(o.c.data());
    benchmark::ClobberMemory();
  }
  set_rate(state, p);
}
#endif

int register_all() {
  // one thread for Eigen (its products run inside the kernels' own parallel loops) and for
  // oneDNN, which takes OpenMP's thread count
  Eigen::setNbThreads(1);
  omp_set_num_threads(1);
  static const Product products[] = {{"winograd_image", 128, 49, 64, false},
                                     {"winograd_16", 128, 784, 64, false},
                                     {"conv1_im2col", 64, 784, 9, false},
                                     {"fc1_batch64", 64, 512, 6272, true},
                                     {"fc1_batch1", 1, 512, 6272, true}};
  for (const auto& p : products) {
    benchmark::RegisterBenchmark((std::string("eigen/") + p.name).c_str(), [&p](benchmark::State& s) { eigen(s, p); })
        ->Unit(benchmark::kMicrosecond);
#ifdef BNRELU_HAVE_DNNL
    benchmark::RegisterBenchmark((std::string("onednn/") + p.name).c_str(), [&p](benchmark::State& s) { onednn(s, p); })
        ->Unit(benchmark::kMicrosecond);
#endif
  }
  return 0;
}
const int registered = register_all();

}  // namespace

BENCHMARK_MAIN();
