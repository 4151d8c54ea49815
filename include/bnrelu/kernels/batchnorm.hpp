// Batch-normalisation arithmetic, optionally fused with ReLU, as free functions.
//
// Every kernel sees its activation as x: [N, C, S] (S = H*W for 4-D input, S = 1 for N x C),
// so channel c is N chunks of S contiguous values. Statistics are kept in double.
//
// The fused training kernels work one channel at a time: its N*S values (200 KiB for
// 64x64x28x28) are read from memory once and stay in L2 for the following passes. The
// backward recomputes the ReLU mask from x with the forward's own arithmetic (one rounding,
// fused multiply-add, in vector and scalar paths alike), so nothing but x is kept between
// the two.
#pragma once

#include <algorithm>
#include <bit>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../tensor.hpp"
#include "../threads.hpp"
#include "simd.hpp"

namespace bnrelu::kernels {

// The affine map of the normalisation: y = x * scale + shift, rounded exactly as the packet
// path's pmadd rounds it (fused where the target has FMA), so every element gets the same
// value however a loop splits into packets and tail: backward recomputes the ReLU mask
// from x and must see exactly what forward saw.
template <class T>
inline T bn_affine(T x, T scale, T shift) {
#if defined(__FMA__) || defined(__AVX512F__)
  return std::fma(x, scale, shift);
#else
  return x * scale + shift;
#endif
}


// ReLU that lets NaN through (as PyTorch's relu does) and maps everything below 0 to 0.
template <class T>
inline T relu_value(T v) {
  return v < T(0) ? T(0) : v;
}

// +0 where the forward's pre-activation was <= 0, else dy: PyTorch's threshold_backward, which
// passes the gradient of a NaN output through.
// A bit mask rather than `pre > 0 ? dy : 0`, which GCC 12 compiles to a branch in loops that
// also reduce in double (~5 ns an element on a random mask).
template <class T>
inline T relu_grad(T pre, T dy) {
  using U = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
  return std::bit_cast<T>(std::bit_cast<U>(dy) & (U(0) - U(!(pre <= T(0)))));
}

// scale and shift of channel c from its statistics, rounded once from double; forward, eval
// and backward all derive them here.
template <class T>
inline void bn_scale_shift(T& scale, T& shift, double mean, double invstd, const T* weight,
                           const T* bias, Index c) {
  const double s = (weight ? static_cast<double>(weight[c]) : 1.0) * invstd;
  scale = static_cast<T>(s);
  shift = static_cast<T>((bias ? static_cast<double>(bias[c]) : 0.0) - mean * s);
}

// The mean split as hi + lo in T: (x - hi) - lo is x - mean to nearly double accuracy even
// when |mean| >> std (data like 1e4 + noise in float): x - hi is exact for x near hi.
template <class T>
struct SplitMean {
  T hi, lo;
  explicit SplitMean(double m) : hi(static_cast<T>(m)), lo(static_cast<T>(m - static_cast<double>(hi))) {}
  T centre(T x) const { return (x - hi) - lo; }
  simd::Packet<T> centre(const simd::Packet<T>& x) const {
    return simd::psub(simd::psub(x, simd::set1(hi)), simd::set1(lo));
  }
};

// What backward needs of one channel to turn dy into the ReLU-masked gradient g and x into
// x - mean, in both the packet and the scalar (tail) path.
template <class T>
struct ChannelGrad {
  T scale, shift;
  SplitMean<T> mu;
  bool relu;
  ChannelGrad(const double* mean, const double* invstd, const T* weight, const T* bias, Index c, bool relu_)
      : mu(mean[c]), relu(relu_) {
    bn_scale_shift(scale, shift, mean[c], invstd[c], weight, bias, c);
  }
  simd::Packet<T> grad(const simd::Packet<T>& x, const simd::Packet<T>& dy) const {
    return relu ? simd::relu_grad(simd::pmadd(x, simd::set1(scale), simd::set1(shift)), dy) : dy;
  }
  T grad(T x, T dy) const { return relu ? relu_grad(bn_affine(x, scale, shift), dy) : dy; }
};

namespace detail {

// A channel is N chunks of S values, C*S apart: too short a stream for the hardware
// prefetcher, which restarts at every chunk. Asking for the next chunk while working on this
// one keeps the memory system busy.
inline constexpr Index kAhead = 2;  // chunks; 1, 2, 4 and 8 measured alike, 2 marginally best

template <class T>
inline void prefetch_chunk(const T* p, Index n, bool for_write = false) {
  constexpr Index kLine = 64 / sizeof(T);
  if (for_write)
    for (Index i = 0; i < n; i += kLine) __builtin_prefetch(p + i, 1);
  else
    for (Index i = 0; i < n; i += kLine) __builtin_prefetch(p + i, 0);
}

// Sums over i in [0, n): pf(i) gives a packet of terms i .. i+width-1, sf(i) the scalar term
// i for the tail. Four packet accumulators hide the adder's latency; the result is double.
template <class T, class PF, class SF>
double reduce(Index n, PF pf, SF sf) {
  constexpr Index L = simd::width<T>;
  auto a0 = simd::set1(T(0)), a1 = a0, a2 = a0, a3 = a0;
  Index i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    a0 = simd::padd(a0, pf(i));
    a1 = simd::padd(a1, pf(i + L));
    a2 = simd::padd(a2, pf(i + 2 * L));
    a3 = simd::padd(a3, pf(i + 3 * L));
  }
  for (; i + L <= n; i += L) a0 = simd::padd(a0, pf(i));
  double total = static_cast<double>(simd::sum(simd::padd(simd::padd(a0, a1), simd::padd(a2, a3))));
  for (; i < n; ++i) total += static_cast<double>(sf(i));
  return total;
}

// Two sums at once, sum(a) and sum(a * b): pf(i, a, b) sets the packets of a and b at i (the
// product is accumulated with a fused multiply-add); sf likewise for the scalar tail.
template <class T, class PF, class SF>
std::pair<double, double> reduce2(Index n, PF pf, SF sf) {
  constexpr Index L = simd::width<T>;
  auto a0 = simd::set1(T(0)), a1 = a0, b0 = a0, b1 = a0;
  Index i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    simd::Packet<T> ta, tb, tc, td;
    pf(i, ta, tb);
    pf(i + L, tc, td);
    a0 = simd::padd(a0, ta);
    b0 = simd::pmadd(ta, tb, b0);
    a1 = simd::padd(a1, tc);
    b1 = simd::pmadd(tc, td, b1);
  }
  for (; i + L <= n; i += L) {
    simd::Packet<T> ta, tb;
    pf(i, ta, tb);
    a0 = simd::padd(a0, ta);
    b0 = simd::pmadd(ta, tb, b0);
  }
  double sa = static_cast<double>(simd::sum(simd::padd(a0, a1)));
  double sb = static_cast<double>(simd::sum(simd::padd(b0, b1)));
  for (; i < n; ++i) {
    T ta, tb;
    sf(i, ta, tb);
    sa += static_cast<double>(ta);
    sb += static_cast<double>(ta) * static_cast<double>(tb);
  }
  return {sa, sb};
}

// Channels per task in the S > 1 kernels. Adjacent channels of one image are contiguous, so
// a block of G channels is read as N runs of G*S values. Measured here: keeping the block's
// slice (G*N*S values) within half of L2 matters most, so G = 1 for 28 x 28 maps; for small
// maps (14 x 14 and below) a few channels per block lengthen the runs to ~4 KiB, which helps
// the prefetchers a little. Every channel is summed in the same order whatever G is, so
// results depend neither on the block size nor on the thread count.
inline constexpr Index kMaxBlock = 64;

inline Index channel_block(Index N, Index C, Index S, Index elem_size, int threads) {
  const Index run = std::max<Index>(1, (4 << 10) / std::max<Index>(1, S * elem_size));
  const Index fit = std::max<Index>(1, (512 << 10) / std::max<Index>(1, N * S * elem_size));  // N may be 0
  const Index spread = std::max<Index>(1, C / (2 * threads));  // two blocks per thread at least
  return std::clamp<Index>(std::min({run, fit, spread}), 1, kMaxBlock);
}

// Mean and biased variance of channels [c0, c1) of x: [N, C, S] in one pass over memory.
// Each chunk of S values is read once from memory and then, from L1, gives its own mean
// (summing x - x0, x0 = the chunk's first value, so partial sums in T stay small even for
// data like 1e4 + noise) and its sum of squared deviations from that mean (no
// cancellation); chunks combine in double with Chan et al.'s pairwise update.
template <class T>
void block_mean_var(double* mean, double* var, const T* x, Index N, Index C, Index S, Index c0, Index c1) {
  const Index G = c1 - c0;
  double mu[kMaxBlock] = {}, m2[kMaxBlock] = {};
  const double s_count = static_cast<double>(S);
  for (Index n = 0; n < N; ++n) {
    const T* run = x + (n * C + c0) * S;
    if (n + kAhead < N) prefetch_chunk(run + kAhead * C * S, G * S);
    for (Index j = 0; j < G; ++j) {
      const T* xc = run + j * S;
      const T o = xc[0];
      const auto po = simd::set1(o);
      const double chunk_mean =
          static_cast<double>(o) +
          reduce<T>(S, [=](Index i) { return simd::psub(simd::load(xc + i), po); },
                    [=](Index i) { return xc[i] - o; }) / s_count;
      const SplitMean<T> cm(chunk_mean);
      const double chunk_m2 = reduce<T>(
          S,
          [=](Index i) {
            const auto d = cm.centre(simd::load(xc + i));
            return simd::pmul(d, d);
          },
          [=](Index i) {
            const T d = cm.centre(xc[i]);
            return d * d;
          });
      // merge (n*S values, mean mu, m2) with (S values, chunk_mean, chunk_m2)
      const double na = static_cast<double>(n) * s_count, total = na + s_count;
      const double delta = chunk_mean - mu[j];
      mu[j] += delta * s_count / total;
      m2[j] += chunk_m2 + delta * delta * na * s_count / total;
    }
  }
  const double M = static_cast<double>(N * S);
  for (Index j = 0; j < G; ++j) {
    mean[j] = mu[j];
    var[j] = m2[j] / M;
  }
}

// y = [relu](x * scale + shift) over n contiguous values.
template <class T>
void affine(T* y, const T* x, Index n, T scale, T shift, bool relu) {
  constexpr Index L = simd::width<T>;
  const auto ps = simd::set1(scale), ph = simd::set1(shift);
  Index i = 0;
  if (relu) {
    for (; i + L <= n; i += L) simd::store(y + i, simd::relu(simd::pmadd(simd::load(x + i), ps, ph)));
    for (; i < n; ++i) y[i] = relu_value(bn_affine(x[i], scale, shift));
  } else {
    for (; i + L <= n; i += L) simd::store(y + i, simd::pmadd(simd::load(x + i), ps, ph));
    for (; i < n; ++i) y[i] = bn_affine(x[i], scale, shift);
  }
}

// Pass 1 of the backward for channels [c0, c1): sum[c - c0] += sum(g), dot[c - c0] +=
// sum(g * (x - mean)), reading x and dy once.
template <class T>
void backward_sums(double* sum, double* dot, const T* dy, const T* x, const double* mean, const double* invstd,
                   const T* weight, const T* bias, Index N, Index C, Index S, Index c0, Index c1, bool relu) {
  for (Index n = 0; n < N; ++n) {
    const Index run = (n * C + c0) * S;
    if (n + kAhead < N) {
      prefetch_chunk(x + run + kAhead * C * S, (c1 - c0) * S);
      prefetch_chunk(dy + run + kAhead * C * S, (c1 - c0) * S);
    }
    for (Index c = c0; c < c1; ++c) {
      const ChannelGrad<T> ch(mean, invstd, weight, bias, c, relu);
      const T* xc = x + (n * C + c) * S;
      const T* dyc = dy + (n * C + c) * S;
      // sum(g * (x - mean)) as sum(g * (x - hi)) - lo * sum(g): x - hi is exact near hi
      const auto phi = simd::set1(ch.mu.hi);
      const auto part = reduce2<T>(
          S,
          [&](Index i, simd::Packet<T>& g, simd::Packet<T>& d) {
            const auto xv = simd::load(xc + i);
            g = ch.grad(xv, simd::load(dyc + i));
            d = simd::psub(xv, phi);
          },
          [&](Index i, T& g, T& d) {
            g = ch.grad(xc[i], dyc[i]);
            d = xc[i] - ch.mu.hi;
          });
      sum[c - c0] += part.first;
      dot[c - c0] += part.second - static_cast<double>(ch.mu.lo) * part.first;
    }
  }
}

// Pass 2 for channels [c0, c1): dx = weight * invstd * (g - sum/M - (x - mean) * invstd^2 * dot/M),
// computed as g * gs - (x - hi) * a + b with gs = weight * invstd, a = k * gs and
// b = (lo * k - sum/M) * gs (x - mean = (x - hi) - lo, k = invstd^2 * dot/M).
template <class T>
void backward_dx(T* dx, const double* sum, const double* dot, double M, const T* dy, const T* x, const double* mean,
                 const double* invstd, const T* weight, const T* bias, Index N, Index C, Index S, Index c0, Index c1,
                 bool relu) {
  constexpr Index L = simd::width<T>;
  for (Index n = 0; n < N; ++n) {
    if (n + 1 < N) prefetch_chunk(dx + (n + 1) * C * S + c0 * S, (c1 - c0) * S, true);
    for (Index c = c0; c < c1; ++c) {
      const ChannelGrad<T> ch(mean, invstd, weight, bias, c, relu);
      const double is = invstd[c];
      const double k = dot[c - c0] * is * is / M, gs_d = is * (weight ? static_cast<double>(weight[c]) : 1.0);
      const T gs = static_cast<T>(gs_d), na = static_cast<T>(-k * gs_d);
      const T b = static_cast<T>((static_cast<double>(ch.mu.lo) * k - sum[c - c0] / M) * gs_d);
      const auto pg = simd::set1(gs), pa = simd::set1(na), pb = simd::set1(b), phi = simd::set1(ch.mu.hi);
      const T* xc = x + (n * C + c) * S;
      const T* dyc = dy + (n * C + c) * S;
      T* dxc = dx + (n * C + c) * S;
      Index i = 0;
      for (; i + L <= S; i += L) {
        const auto xv = simd::load(xc + i);
        const auto g = ch.grad(xv, simd::load(dyc + i));
        simd::store(dxc + i, simd::pmadd(g, pg, simd::pmadd(simd::psub(xv, phi), pa, pb)));
      }
      for (; i < S; ++i) dxc[i] = ch.grad(xc[i], dyc[i]) * gs + ((xc[i] - ch.mu.hi) * na + b);
    }
  }
}

}  // namespace detail

// Training forward: batch statistics, then y = [relu](gamma * (x - mean) * invstd + beta),
// computed per channel while the channel's slice is in cache (x read from memory once).
// x: [N, C, S]; y: [N, C, S]; weight, bias: [C] or null (affine = false)
// mean, var (biased), invstd: [C] outputs in double. If x_copy is given, x is copied there
// first and every pass reads the copy (the layer keeps it for backward).
template <class T>
void batchnorm_forward_train(T* y, T* x_copy, double* mean, double* var, double* invstd, const T* x,
                             const T* weight, const T* bias, Index N, Index C, Index S,
                             double eps, bool relu) {
  assert(N * S > 0);
  const double M = static_cast<double>(N * S);
  if (S == 1) {
    // N x C: vectorise across channels, walk rows; each thread owns a block of channels.
    constexpr Index kBlock = 64;
    const Index nblocks = (C + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
    for (Index b = 0; b < nblocks; ++b) {
      const Index c0 = b * kBlock, c1 = std::min(C, c0 + kBlock), w = c1 - c0;
      double acc[kBlock] = {}, m2[kBlock] = {};
      T scale[kBlock], shift[kBlock];
      const T* src = x;
      if (x_copy) {
        for (Index n = 0; n < N; ++n) std::memcpy(x_copy + n * C + c0, x + n * C + c0, w * sizeof(T));
        src = x_copy;
      }
      for (Index n = 0; n < N; ++n) {
        const T* xr = src + n * C + c0;
#pragma omp simd
        for (Index j = 0; j < w; ++j) acc[j] += static_cast<double>(xr[j]);
      }
      for (Index j = 0; j < w; ++j) acc[j] /= M;
      for (Index n = 0; n < N; ++n) {
        const T* xr = src + n * C + c0;
#pragma omp simd
        for (Index j = 0; j < w; ++j) {
          const double d = static_cast<double>(xr[j]) - acc[j];
          m2[j] += d * d;
        }
      }
      for (Index j = 0; j < w; ++j) {
        const Index c = c0 + j;
        mean[c] = acc[j];
        var[c] = m2[j] / M;
        invstd[c] = 1.0 / std::sqrt(var[c] + eps);
        bn_scale_shift(scale[j], shift[j], mean[c], invstd[c], weight, bias, c);
      }
      for (Index n = 0; n < N; ++n) {
        const T* xr = src + n * C + c0;
        T* yr = y + n * C + c0;
        if (relu) {
#pragma omp simd
          for (Index j = 0; j < w; ++j) yr[j] = relu_value(bn_affine(xr[j], scale[j], shift[j]));
        } else {
#pragma omp simd
          for (Index j = 0; j < w; ++j) yr[j] = bn_affine(xr[j], scale[j], shift[j]);
        }
      }
    }
    return;
  }
  const Index G = detail::channel_block(N, C, S, sizeof(T), num_threads());
  const Index nblocks = (C + G - 1) / G;
#pragma omp parallel for schedule(static)
  for (Index blk = 0; blk < nblocks; ++blk) {
    const Index c0 = blk * G, c1 = std::min(C, c0 + G);
    const T* src = x;
    if (x_copy) {
      for (Index n = 0; n < N; ++n)
        std::memcpy(x_copy + (n * C + c0) * S, x + (n * C + c0) * S, (c1 - c0) * S * sizeof(T));
      src = x_copy;
    }
    detail::block_mean_var(mean + c0, var + c0, src, N, C, S, c0, c1);
    T scale[detail::kMaxBlock], shift[detail::kMaxBlock];
    for (Index c = c0; c < c1; ++c) {
      invstd[c] = 1.0 / std::sqrt(var[c] + eps);
      bn_scale_shift(scale[c - c0], shift[c - c0], mean[c], invstd[c], weight, bias, c);
    }
    for (Index n = 0; n < N; ++n) {
      if (n + 1 < N) detail::prefetch_chunk(y + ((n + 1) * C + c0) * S, (c1 - c0) * S, true);
      for (Index c = c0; c < c1; ++c)
        detail::affine(y + (n * C + c) * S, src + (n * C + c) * S, S, scale[c - c0], shift[c - c0], relu);
    }
  }
}

// Eval forward, one pass: y = [relu](x * scale[c] + shift[c]).
template <class T>
void batchnorm_forward_eval(T* y, const T* x, const T* scale, const T* shift, Index N, Index C,
                            Index S, bool relu) {
  if (S == 1) {
#pragma omp parallel for schedule(static)
    for (Index n = 0; n < N; ++n) {
      const T* xr = x + n * C;
      T* yr = y + n * C;
      if (relu) {
#pragma omp simd
        for (Index c = 0; c < C; ++c) yr[c] = relu_value(bn_affine(xr[c], scale[c], shift[c]));
      } else {
#pragma omp simd
        for (Index c = 0; c < C; ++c) yr[c] = bn_affine(xr[c], scale[c], shift[c]);
      }
    }
    return;
  }
#pragma omp parallel for collapse(2) schedule(static)
  for (Index n = 0; n < N; ++n)
    for (Index c = 0; c < C; ++c)
      detail::affine(y + (n * C + c) * S, x + (n * C + c) * S, S, scale[c], shift[c], relu);
}

// Training backward. With g = dy masked by the ReLU (pre > 0, recomputed from x exactly as
// forward computed it) or g = dy without ReLU, and xhat = (x - mean) * invstd, M = N*S:
//   dbias   += sum(g)
//   dweight += sum(g * xhat) = invstd * sum(g * (x - mean))
//   dx = weight * invstd * (g - sum(g)/M - (x - mean) * invstd^2 * sum(g * (x - mean))/M)
// x, dy: [N, C, S]; dx: [N, C, S]; mean, invstd: [C] from the forward; dweight, dbias: [C]
// or null.
template <class T>
void batchnorm_backward(T* dx, T* dweight, T* dbias, const T* dy, const T* x, const double* mean,
                        const double* invstd, const T* weight, const T* bias, Index N, Index C,
                        Index S, bool relu) {
  const double M = static_cast<double>(N * S);
  if (S == 1) {
    constexpr Index kBlock = 64;
    const Index nblocks = (C + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
    for (Index b = 0; b < nblocks; ++b) {
      const Index c0 = b * kBlock, c1 = std::min(C, c0 + kBlock), w = c1 - c0;
      double sum[kBlock] = {}, dot[kBlock] = {};
      T scale[kBlock], shift[kBlock], mu_hi[kBlock], mu_lo[kBlock];
      for (Index j = 0; j < w; ++j) {
        bn_scale_shift(scale[j], shift[j], mean[c0 + j], invstd[c0 + j], weight, bias, c0 + j);
        const SplitMean<T> mu(mean[c0 + j]);
        mu_hi[j] = mu.hi;
        mu_lo[j] = mu.lo;
      }
      for (Index n = 0; n < N; ++n) {
        const T* xr = x + n * C + c0;
        const T* dyr = dy + n * C + c0;
#pragma omp simd
        for (Index j = 0; j < w; ++j) {
          const T g = relu ? relu_grad(bn_affine(xr[j], scale[j], shift[j]), dyr[j]) : dyr[j];
          sum[j] += static_cast<double>(g);
          dot[j] += static_cast<double>(g) * static_cast<double>((xr[j] - mu_hi[j]) - mu_lo[j]);
        }
      }
      T k[kBlock], mean_g[kBlock], gs[kBlock];
      for (Index j = 0; j < w; ++j) {
        const Index c = c0 + j;
        const double is = invstd[c];
        if (dbias) dbias[c] += static_cast<T>(sum[j]);
        if (dweight) dweight[c] += static_cast<T>(dot[j] * is);
        k[j] = static_cast<T>(dot[j] * is * is / M);
        mean_g[j] = static_cast<T>(sum[j] / M);
        gs[j] = static_cast<T>(is * (weight ? static_cast<double>(weight[c]) : 1.0));
      }
      for (Index n = 0; n < N; ++n) {
        const T* xr = x + n * C + c0;
        const T* dyr = dy + n * C + c0;
        T* dxr = dx + n * C + c0;
#pragma omp simd
        for (Index j = 0; j < w; ++j) {
          const T g = relu ? relu_grad(bn_affine(xr[j], scale[j], shift[j]), dyr[j]) : dyr[j];
          dxr[j] = (g - ((xr[j] - mu_hi[j]) - mu_lo[j]) * k[j] - mean_g[j]) * gs[j];
        }
      }
    }
    return;
  }
  const Index G = detail::channel_block(N, C, S, 2 * sizeof(T), num_threads());  // x and dy
  const Index nblocks = (C + G - 1) / G;
#pragma omp parallel for schedule(static)
  for (Index blk = 0; blk < nblocks; ++blk) {
    const Index c0 = blk * G, c1 = std::min(C, c0 + G);
    double sum[detail::kMaxBlock] = {}, dot[detail::kMaxBlock] = {};
    // pass 1 (x and dy from memory), pass 2 (x and dy from cache)
    detail::backward_sums(sum, dot, dy, x, mean, invstd, weight, bias, N, C, S, c0, c1, relu);
    for (Index c = c0; c < c1; ++c) {
      if (dbias) dbias[c] += static_cast<T>(sum[c - c0]);
      if (dweight) dweight[c] += static_cast<T>(dot[c - c0] * invstd[c]);
    }
    detail::backward_dx(dx, sum, dot, M, dy, x, mean, invstd, weight, bias, N, C, S, c0, c1, relu);
  }
}

// The two halves of batchnorm_forward_train and batchnorm_backward with a cross-replica
// reduction between them (SyncBatchNorm): every channel is read from memory in each half.

// Per-channel mean and biased variance of x: [N, C, S].
template <class T>
void batchnorm_statistics(double* mean, double* var, const T* x, Index N, Index C, Index S) {
  const Index G = detail::channel_block(N, C, S, sizeof(T), num_threads());
  const Index nblocks = (C + G - 1) / G;
#pragma omp parallel for schedule(static)
  for (Index blk = 0; blk < nblocks; ++blk) {
    const Index c0 = blk * G, c1 = std::min(C, c0 + G);
    detail::block_mean_var(mean + c0, var + c0, x, N, C, S, c0, c1);
  }
}

// Per-channel sum(g) and sum(g * (x - mean)), g the ReLU-masked (or plain) dy, as in
// batchnorm_backward.
template <class T>
void batchnorm_backward_sums(double* sum, double* dot, const T* dy, const T* x, const double* mean,
                             const double* invstd, const T* weight, const T* bias, Index N, Index C, Index S,
                             bool relu) {
  const Index G = detail::channel_block(N, C, S, 2 * sizeof(T), num_threads());
  const Index nblocks = (C + G - 1) / G;
#pragma omp parallel for schedule(static)
  for (Index blk = 0; blk < nblocks; ++blk) {
    const Index c0 = blk * G, c1 = std::min(C, c0 + G);
    std::fill(sum + c0, sum + c1, 0.0);
    std::fill(dot + c0, dot + c1, 0.0);
    detail::backward_sums(sum + c0, dot + c0, dy, x, mean, invstd, weight, bias, N, C, S, c0, c1, relu);
  }
}

// dx from given per-channel sums over M values (all replicas' for SyncBatchNorm).
template <class T>
void batchnorm_backward_dx(T* dx, const double* sum, const double* dot, double M, const T* dy, const T* x,
                           const double* mean, const double* invstd, const T* weight, const T* bias, Index N,
                           Index C, Index S, bool relu) {
  const Index G = detail::channel_block(N, C, S, 2 * sizeof(T), num_threads());
  const Index nblocks = (C + G - 1) / G;
#pragma omp parallel for schedule(static)
  for (Index blk = 0; blk < nblocks; ++blk) {
    const Index c0 = blk * G, c1 = std::min(C, c0 + G);
    detail::backward_dx(dx, sum + c0, dot + c0, M, dy, x, mean, invstd, weight, bias, N, C, S, c0, c1, relu);
  }
}

}  // namespace bnrelu::kernels
