// Streaming loops over contiguous runs of values for the kernels that walk an activation
// chunk by chunk (kernels/batchnorm.hpp): sums with several packet accumulators, element-wise
// writes with optional non-temporal stores, and software prefetch of a chunk further on.
#pragma once

#include <algorithm>
#include <cmath>
#include <utility>

#include "../tensor.hpp"
#include "simd.hpp"

namespace bnrelu::kernels::detail {

// A channel is N chunks of S values, C*S apart: too short a run for the hardware prefetcher,
// which starts over at every chunk. So each pass over a chunk asks for the lines of a chunk
// further on, spread over its own iterations (a burst of requests at the start of each chunk
// would wait on the core's line-fill buffers). Ahead holds those streams: line(i) asks for the
// line of element i of each stream that is set.
template <class T>
struct Ahead {
  const T* a = nullptr;
  const T* b = nullptr;
  T* w = nullptr;  // to be written
  const T* c = nullptr;  // a third read stream (a residual block's shortcut)
  static constexpr Index kLine = 64 / static_cast<Index>(sizeof(T));
  void line(Index i) const {
    if (a) __builtin_prefetch(a + i, 0);
    if (b) __builtin_prefetch(b + i, 0);
    if (w) __builtin_prefetch(w + i, 1);
    if (c) __builtin_prefetch(c + i, 0);
  }
  // the lines of [i0, n), for the tail a packet loop leaves
  void lines(Index i0, Index n) const {
    for (Index i = i0; i < n; i += kLine) line(i);
    if (i0 < n) line(n - 1);
  }
};

// Sums over i in [0, n): pf(i) gives a packet of terms i .. i+width-1, sf(i) the scalar term
// i for the tail. Four packet accumulators hide the adder's latency; the result is double.
template <class T, class PF, class SF>
double reduce(Index n, PF pf, SF sf, const Ahead<T>& ahead = {}) {
  constexpr Index L = simd::width<T>, K = Ahead<T>::kLine;
  auto a0 = simd::set1(T(0)), a1 = a0, a2 = a0, a3 = a0;
  Index i = 0;
  ahead.lines(n - n % (4 * L), n);
  for (; i + 4 * L <= n; i += 4 * L) {
    for (Index j = 0; j < 4 * L; j += K) ahead.line(i + j);
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

// sum(d * d) over i in [0, n), pf(i) giving a packet of d, sf(i) the scalar: the squares are
// accumulated with fused multiply-adds in four packets; the result is double.
template <class T, class PF, class SF>
double reduce_squares(Index n, PF pf, SF sf) {
  constexpr Index L = simd::width<T>;
  auto a0 = simd::set1(T(0)), a1 = a0, a2 = a0, a3 = a0;
  Index i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    const auto d0 = pf(i), d1 = pf(i + L), d2 = pf(i + 2 * L), d3 = pf(i + 3 * L);
    a0 = simd::pmadd(d0, d0, a0);
    a1 = simd::pmadd(d1, d1, a1);
    a2 = simd::pmadd(d2, d2, a2);
    a3 = simd::pmadd(d3, d3, a3);
  }
  for (; i + L <= n; i += L) {
    const auto d = pf(i);
    a0 = simd::pmadd(d, d, a0);
  }
  double total = static_cast<double>(simd::sum(simd::padd(simd::padd(a0, a1), simd::padd(a2, a3))));
  for (; i < n; ++i) {
    const double d = static_cast<double>(sf(i));
    total += d * d;
  }
  return total;
}

// Two sums at once, sum(a) and sum(a * b): pf(i, a, b) sets the packets of a and b at i (the
// product is accumulated with a fused multiply-add); sf likewise for the scalar tail. Four
// accumulators each hide the latency of the adds and fused multiply-adds.
template <class T, class PF, class SF>
std::pair<double, double> reduce2(Index n, PF pf, SF sf, const Ahead<T>& ahead = {}) {
  constexpr Index L = simd::width<T>, K = Ahead<T>::kLine;
  simd::Packet<T> a[4], b[4];
  for (int k = 0; k < 4; ++k) a[k] = b[k] = simd::set1(T(0));
  Index i = 0;
  ahead.lines(n - n % (4 * L), n);
  for (; i + 4 * L <= n; i += 4 * L) {
    for (Index j = 0; j < 4 * L; j += K) ahead.line(i + j);
    for (int k = 0; k < 4; ++k) {
      simd::Packet<T> ta, tb;
      pf(i + k * L, ta, tb);
      a[k] = simd::padd(a[k], ta);
      b[k] = simd::pmadd(ta, tb, b[k]);
    }
  }
  for (; i + L <= n; i += L) {
    simd::Packet<T> ta, tb;
    pf(i, ta, tb);
    a[0] = simd::padd(a[0], ta);
    b[0] = simd::pmadd(ta, tb, b[0]);
  }
  double sa = static_cast<double>(simd::sum(simd::padd(simd::padd(a[0], a[1]), simd::padd(a[2], a[3]))));
  double sb = static_cast<double>(simd::sum(simd::padd(simd::padd(b[0], b[1]), simd::padd(b[2], b[3]))));
  for (; i < n; ++i) {
    T ta, tb;
    sf(i, ta, tb);
    sa += static_cast<double>(ta);
    // one rounding, whether or not the compiler would contract a * b + c here (for float
    // the product is exact in double and this is the plain sum)
    sb = std::fma(static_cast<double>(ta), static_cast<double>(tb), sb);
  }
  return {sa, sb};
}

// out[i] = pf(i) (a packet of elements i .. i + width - 1) or sf(i) (element i) for i in
// [0, n), called in order of i: non-temporal stores when stream, after a scalar head up to
// packet alignment.
template <class T, class PF, class SF>
void write_each(T* out, Index n, bool stream, PF pf, SF sf, const Ahead<T>& ahead = {}) {
  constexpr Index L = simd::width<T>, K = Ahead<T>::kLine;
  Index i = 0;
  if (stream)
    for (const Index head = std::min(n, simd::to_alignment(out)); i < head; ++i) out[i] = sf(i);
  for (; i + L <= n; i += L) {
    if (i % K < L) ahead.line(i);
    if (stream)
      simd::stream(out + i, pf(i));
    else
      simd::store(out + i, pf(i));
  }
  for (; i < n; ++i) out[i] = sf(i);
}

}  // namespace bnrelu::kernels::detail
