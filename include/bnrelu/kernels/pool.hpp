// Max-pooling arithmetic.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../tensor.hpp"
#include "../threads.hpp"

namespace bnrelu::kernels {

struct Pool2dGeometry {
  Index N, C, H, W;  // input
  Index KH, KW, stride, pad;
  Index HO, WO;  // output
};

namespace detail {

// The common case of windows that tile the map: no padding, stride == kernel.
inline bool tiling_pool(const Pool2dGeometry& g) {
  return g.pad == 0 && g.KH == g.stride && g.KW == g.stride;
}

#if defined(__AVX2__)
// Eight windows of a 2x2, stride-2 pool from two input rows: the row pairs are split into even
// and odd columns, then a select chain in row-major window order (a later value wins if greater
// or NaN). Lanes at and above `count` are neither read nor written; argmax may be null.
inline void maxpool2x2_avx2(float* y, std::int32_t* argmax, const float* r0, const float* r1, std::int32_t first,
                            std::int32_t W, int count) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  auto mask = [&](int from) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(2 * count - from), lane); };
  auto split = [&](const float* p, __m256& even, __m256& odd) {
    const __m256 lo = count == 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask(0));
    const __m256 hi = count == 8 ? _mm256_loadu_ps(p + 8) : _mm256_maskload_ps(p + 8, mask(8));
    auto gather = [](__m256 v) { return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), 0xd8)); };
    even = gather(_mm256_shuffle_ps(lo, hi, 0x88));  // lo0 lo2 hi0 hi2 | lo4 lo6 hi4 hi6, then 64-bit 0 2 1 3
    odd = gather(_mm256_shuffle_ps(lo, hi, 0xdd));
  };
  __m256 a, b, c, d;
  split(r0, a, b);
  split(r1, c, d);
  __m256 best = a;
  __m256i off = _mm256_setzero_si256();
  auto take = [&](__m256 v, std::int32_t k) {
    const __m256 win = _mm256_or_ps(_mm256_cmp_ps(v, best, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    best = _mm256_blendv_ps(best, v, win);
    if (argmax) off = _mm256_blendv_epi8(off, _mm256_set1_epi32(k), _mm256_castps_si256(win));
  };
  take(b, 1);
  take(c, W);
  take(d, W + 1);
  const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(count), lane);
  if (count == 8)
    _mm256_storeu_ps(y, best);
  else
    _mm256_maskstore_ps(y, m, best);
  if (!argmax) return;
  const __m256i at = _mm256_add_epi32(_mm256_add_epi32(_mm256_set1_epi32(first), _mm256_add_epi32(lane, lane)), off);
  if (count == 8)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(argmax), at);
  else
    _mm256_maskstore_epi32(argmax, m, at);
}

// The adjoint for eight windows: each input element gets dy where it was its window's argmax,
// else 0; even and odd columns are interleaved back into the two rows.
inline void maxpool2x2_backward_avx2(float* r0, float* r1, const float* dy, const std::int32_t* argmax,
                                     std::int32_t first, std::int32_t W, int count) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  auto mask = [&](int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane); };
  const __m256 d = count == 8 ? _mm256_loadu_ps(dy) : _mm256_maskload_ps(dy, mask(count));
  const __m256i at = count == 8 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(argmax))
                                : _mm256_maskload_epi32(argmax, mask(count));
  const __m256i off = _mm256_sub_epi32(at, _mm256_add_epi32(_mm256_set1_epi32(first), _mm256_add_epi32(lane, lane)));
  auto pick = [&](std::int32_t k) {
    return _mm256_and_ps(d, _mm256_castsi256_ps(_mm256_cmpeq_epi32(off, _mm256_set1_epi32(k))));
  };
  auto store_row = [&](float* row, __m256 even, __m256 odd) {
    const __m256 lo = _mm256_unpacklo_ps(even, odd), hi = _mm256_unpackhi_ps(even, odd);
    const __m256 first8 = _mm256_permute2f128_ps(lo, hi, 0x20), last8 = _mm256_permute2f128_ps(lo, hi, 0x31);
    if (count == 8) {
      _mm256_storeu_ps(row, first8);
      _mm256_storeu_ps(row + 8, last8);
    } else {
      _mm256_maskstore_ps(row, mask(2 * count), first8);
      _mm256_maskstore_ps(row + 8, mask(2 * count - 8), last8);
    }
  };
  store_row(r0, pick(0), pick(1));
  store_row(r1, pick(W), pick(W + 1));
}
#endif

// One plane of a 2x2, stride-2 pool: two input rows per output row. argmax may be null.
template <class T>
void maxpool2x2_plane(T* y, std::int32_t* argmax, const T* x, const Pool2dGeometry& g) {
  const auto W = static_cast<std::int32_t>(g.W);
  for (Index oh = 0; oh < g.HO; ++oh) {
    const T* r0 = x + 2 * oh * g.W;
    const T* r1 = r0 + g.W;
    const auto base = static_cast<std::int32_t>(2 * oh * g.W);
    T* yr = y + oh * g.WO;
    std::int32_t* ar = argmax ? argmax + oh * g.WO : nullptr;
#if defined(__AVX2__)
    if constexpr (std::is_same_v<T, float>) {
      for (Index ow = 0; ow < g.WO; ow += 8)
        maxpool2x2_avx2(yr + ow, ar ? ar + ow : nullptr, r0 + 2 * ow, r1 + 2 * ow, base + static_cast<std::int32_t>(2 * ow), W,
                        static_cast<int>(std::min<Index>(8, g.WO - ow)));
      continue;
    }
#endif
    for (Index ow = 0; ow < g.WO; ++ow) {
      const T a = r0[2 * ow], b = r0[2 * ow + 1], c = r1[2 * ow], d = r1[2 * ow + 1];
      const bool wb = b > a || b != b;  // a later value wins if greater or NaN
      const T ab = wb ? b : a;
      const bool wc = c > ab || c != c;
      const T abc = wc ? c : ab;
      const bool wd = d > abc || d != d;
      yr[ow] = wd ? d : abc;
      if (ar) ar[ow] = base + static_cast<std::int32_t>(2 * ow) + (wd ? W + 1 : wc ? W : wb ? 1 : 0);
    }
  }
}

// The adjoint of maxpool2x2_plane for one plane: every input element is written once.
template <class T>
void maxpool2x2_plane_backward(T* dx, const T* dy, const std::int32_t* argmax, const Pool2dGeometry& g) {
  for (Index oh = 0; oh < g.HO; ++oh) {
    T* r0 = dx + 2 * oh * g.W;
    T* r1 = r0 + g.W;
    const T* dyr = dy + oh * g.WO;
    const std::int32_t* ar = argmax + oh * g.WO;
    const auto base = static_cast<std::int32_t>(2 * oh * g.W);
    const auto W = static_cast<std::int32_t>(g.W);
    Index ow = 0;
#if defined(__AVX2__)
    if constexpr (std::is_same_v<T, float>)
      for (; ow < g.WO; ow += 8)
        maxpool2x2_backward_avx2(r0 + 2 * ow, r1 + 2 * ow, dyr + ow, ar + ow, base + static_cast<std::int32_t>(2 * ow),
                                 W, static_cast<int>(std::min<Index>(8, g.WO - ow)));
#endif
    for (; ow < g.WO; ++ow) {
      const std::int32_t at = ar[ow] - base - static_cast<std::int32_t>(2 * ow);
      const T d = dyr[ow];
      r0[2 * ow] = at == 0 ? d : T(0);
      r0[2 * ow + 1] = at == 1 ? d : T(0);
      r1[2 * ow] = at == W ? d : T(0);
      r1[2 * ow + 1] = at == W + 1 ? d : T(0);
    }
    std::fill(r0 + 2 * g.WO, r0 + g.W, T(0));  // an odd last column
    std::fill(r1 + 2 * g.WO, r1 + g.W, T(0));
  }
  std::fill(dx + 2 * g.HO * g.W, dx + g.H * g.W, T(0));  // an odd last row
}

}  // namespace detail

// One plane of max pooling: x [H, W] -> y [HO, WO]; argmax (index into the H*W plane) may be
// null. Padding counts as -inf. Ties go to the first maximum in row-major window order; a NaN
// wins over any number (as in PyTorch, a later NaN replaces an earlier one).
template <class T>
void maxpool_plane(T* y, std::int32_t* argmax, const T* x, const Pool2dGeometry& g) {
  if (g.KH == 2 && g.KW == 2 && detail::tiling_pool(g)) return detail::maxpool2x2_plane(y, argmax, x, g);
  for (Index oh = 0; oh < g.HO; ++oh) {
    const Index h0 = oh * g.stride - g.pad;
    const Index hs = std::max<Index>(h0, 0), he = std::min<Index>(h0 + g.KH, g.H);
    for (Index ow = 0; ow < g.WO; ++ow) {
      const Index w0 = ow * g.stride - g.pad;
      const Index ws = std::max<Index>(w0, 0), we = std::min<Index>(w0 + g.KW, g.W);
      T best = -std::numeric_limits<T>::infinity();
      Index best_i = hs * g.W + ws;
      for (Index h = hs; h < he; ++h)
        for (Index w = ws; w < we; ++w) {
          const T v = x[h * g.W + w];
          if (v > best || std::isnan(v)) {
            best = v;
            best_i = h * g.W + w;
          }
        }
      y[oh * g.WO + ow] = best;
      if (argmax) argmax[oh * g.WO + ow] = static_cast<std::int32_t>(best_i);
    }
  }
}

// x: [N, C, H, W]; y: [N, C, HO, WO]; argmax: [N, C, HO, WO], index into the H*W plane, or
// null when not wanted (eval). Each plane as maxpool_plane computes it.
template <class T>
void maxpool2d_forward(T* y, std::int32_t* argmax, const T* x, const Pool2dGeometry& g) {
  const Index planes = g.N * g.C;
#pragma omp parallel for schedule(static) num_threads(bnrelu::num_threads())
  for (Index p = 0; p < planes; ++p)
    maxpool_plane(y + p * g.HO * g.WO, argmax ? argmax + p * g.HO * g.WO : nullptr, x + p * g.H * g.W, g);
}

// dx = 0, then dx[argmax] += dy for every output. When windows tile the map, each input
// element belongs to at most one window and is written once, without the zero fill.
template <class T>
void maxpool2d_backward(T* dx, const T* dy, const std::int32_t* argmax, const Pool2dGeometry& g) {
  const Index planes = g.N * g.C;
  const bool tiles = detail::tiling_pool(g);
#pragma omp parallel for schedule(static) num_threads(bnrelu::num_threads())
  for (Index p = 0; p < planes; ++p) {
    T* dxp = dx + p * g.H * g.W;
    const T* dyp = dy + p * g.HO * g.WO;
    const std::int32_t* ap = argmax + p * g.HO * g.WO;
    if (tiles && g.KH == 2 && g.KW == 2) {
      detail::maxpool2x2_plane_backward(dxp, dyp, ap, g);
      continue;
    }
    if (!tiles) {
      std::fill(dxp, dxp + g.H * g.W, T(0));
      for (Index i = 0; i < g.HO * g.WO; ++i) dxp[ap[i]] += dyp[i];
      continue;
    }
    for (Index h = 0; h < g.H; ++h) {
      T* row = dxp + h * g.W;
      const Index oh = h / g.KH;
      if (oh >= g.HO) {  // rows below the last window
        std::fill(row, row + g.W, T(0));
        continue;
      }
      const T* dyr = dyp + oh * g.WO;
      const std::int32_t* ar = ap + oh * g.WO;
      const auto first = static_cast<std::int32_t>(h * g.W);
      for (Index w = 0; w < g.WO * g.KW; ++w) {
        const Index ow = w / g.KW;
        row[w] = ar[ow] == first + static_cast<std::int32_t>(w) ? dyr[ow] : T(0);
      }
      std::fill(row + g.WO * g.KW, row + g.W, T(0));  // columns right of the last window
    }
  }
}

}  // namespace bnrelu::kernels
