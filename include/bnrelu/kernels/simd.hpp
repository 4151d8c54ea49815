// Thin wrappers over Eigen's packet primitives: the widest vector the build targets (8 floats
// with AVX2, 16 with AVX-512, 4 with SSE2), for kernels that need control the compiler's
// auto-vectoriser does not give (several accumulators, masks next to double reductions).
#pragma once

#include "../detail/eigen.hpp"

#include <cstdint>
#if defined(EIGEN_VECTORIZE_SSE2)
#include <immintrin.h>
#endif

namespace bnrelu::kernels::simd {

template <class T>
using Packet = typename Eigen::internal::packet_traits<T>::type;

template <class T>
inline constexpr long width = Eigen::internal::unpacket_traits<Packet<T>>::size;

template <class T>
inline Packet<T> load(const T* p) { return Eigen::internal::ploadu<Packet<T>>(p); }
template <class T>
inline void store(T* p, const Packet<T>& v) { Eigen::internal::pstoreu(p, v); }
template <class T>
inline Packet<T> set1(T v) { return Eigen::internal::pset1<Packet<T>>(v); }

using Eigen::internal::padd;
using Eigen::internal::pmadd;
using Eigen::internal::pmul;
using Eigen::internal::psub;

template <class P>
inline auto sum(const P& p) { return Eigen::internal::predux(p); }

// max(0, v) that lets NaN through: v where !(v < 0), else 0.
template <class P>
inline P relu(const P& v) {
  return Eigen::internal::pandnot(v, Eigen::internal::pcmp_lt(v, Eigen::internal::pzero(v)));
}

// +0 where pre <= 0, else dy (NaN passes the gradient, as in PyTorch).
template <class P>
inline P relu_grad(const P& pre, const P& dy) {
  return Eigen::internal::pandnot(dy, Eigen::internal::pcmp_le(pre, Eigen::internal::pzero(pre)));
}

// A ReLU's mask as bits: bit k set where !(v[k] <= 0) (NaN included), the lanes that pass
// gradient; and its inverse, dy[k] where bit k of bits is set, else +0 (relu_grad's values).
// One instruction or three per packet where the target has them, lane by lane elsewhere. With
// AVX-512 (DQ) the inverse ANDs dy with the bits spread to whole lanes, where a zero-masking move
// would let GCC fold the load of dy into a masked load: with those, a residual block's
// BatchNorm+Add+ReLU, whose backward reads dy through the forward's mask in passes over memory,
// took 1.10-1.17x as long at 256x64x56x56 on the AMD Zen 5 machine (docs/performance.md, Fused
// BatchNorm + Add + ReLU).
template <class T>
inline std::uint32_t positive_bits_by_lane(const Packet<T>& v) {
  alignas(64) T d[width<T>];
  Eigen::internal::pstore(d, v);
  std::uint32_t bits = 0;
  for (long k = 0; k < width<T>; ++k) bits |= static_cast<std::uint32_t>(!(d[k] <= T(0))) << k;
  return bits;
}
template <class T>
inline Packet<T> select_bits_by_lane(std::uint32_t bits, const Packet<T>& dy) {
  alignas(64) T d[width<T>];
  Eigen::internal::pstore(d, dy);
  for (long k = 0; k < width<T>; ++k)
    if (!((bits >> k) & 1u)) d[k] = T(0);
  return Eigen::internal::pload<Packet<T>>(d);
}
inline std::uint32_t positive_bits(const Packet<float>& v) {
#if defined(EIGEN_VECTORIZE_AVX512)
  return _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NLE_UQ);
#elif defined(EIGEN_VECTORIZE_AVX)
  return static_cast<std::uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NLE_UQ)));
#elif defined(EIGEN_VECTORIZE_SSE2)
  return static_cast<std::uint32_t>(_mm_movemask_ps(_mm_cmpnle_ps(v, _mm_setzero_ps())));
#else
  return positive_bits_by_lane<float>(v);
#endif
}
inline std::uint32_t positive_bits(const Packet<double>& v) {
#if defined(EIGEN_VECTORIZE_AVX512)
  return _mm512_cmp_pd_mask(v, _mm512_setzero_pd(), _CMP_NLE_UQ);
#elif defined(EIGEN_VECTORIZE_AVX)
  return static_cast<std::uint32_t>(_mm256_movemask_pd(_mm256_cmp_pd(v, _mm256_setzero_pd(), _CMP_NLE_UQ)));
#elif defined(EIGEN_VECTORIZE_SSE2)
  return static_cast<std::uint32_t>(_mm_movemask_pd(_mm_cmpnle_pd(v, _mm_setzero_pd())));
#else
  return positive_bits_by_lane<double>(v);
#endif
}
inline Packet<float> select_bits(std::uint32_t bits, const Packet<float>& dy) {
#if defined(EIGEN_VECTORIZE_AVX512)
#if defined(EIGEN_VECTORIZE_AVX512DQ)
  return _mm512_and_ps(dy, _mm512_castsi512_ps(_mm512_movm_epi32(static_cast<__mmask16>(bits))));
#else
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(bits), dy);
#endif
#elif defined(EIGEN_VECTORIZE_AVX2)
  const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i on = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), lane), lane);
  return _mm256_and_ps(dy, _mm256_castsi256_ps(on));
#elif defined(EIGEN_VECTORIZE_AVX) || !defined(EIGEN_VECTORIZE_SSE2)
  return select_bits_by_lane<float>(bits, dy);
#else
  const __m128i lane = _mm_setr_epi32(1, 2, 4, 8);
  const __m128i on = _mm_cmpeq_epi32(_mm_and_si128(_mm_set1_epi32(static_cast<int>(bits)), lane), lane);
  return _mm_and_ps(dy, _mm_castsi128_ps(on));
#endif
}
inline Packet<double> select_bits(std::uint32_t bits, const Packet<double>& dy) {
#if defined(EIGEN_VECTORIZE_AVX512)
#if defined(EIGEN_VECTORIZE_AVX512DQ)
  return _mm512_and_pd(dy, _mm512_castsi512_pd(_mm512_movm_epi64(static_cast<__mmask8>(bits))));
#else
  return _mm512_maskz_mov_pd(static_cast<__mmask8>(bits), dy);
#endif
#elif defined(EIGEN_VECTORIZE_AVX2)
  const __m256i lane = _mm256_setr_epi64x(1, 2, 4, 8);
  const __m256i on = _mm256_cmpeq_epi64(_mm256_and_si256(_mm256_set1_epi64x(bits), lane), lane);
  return _mm256_and_pd(dy, _mm256_castsi256_pd(on));
#else
  return select_bits_by_lane<double>(bits, dy);
#endif
}

// Max pooling's step over a window: v where v > best or v is NaN, else best (a later value wins
// if greater or NaN, as kernels/pool.hpp and PyTorch order a window).
template <class P>
inline P pool_max(const P& best, const P& v) {
  using namespace Eigen::internal;
  const P v_is_nan = pandnot(ptrue(v), pcmp_eq(v, v));
  return pselect(por(pcmp_lt(best, v), v_is_nan), v, best);
}

// Non-temporal store of a packet to a packet-aligned address: the line goes to memory without
// first being read (no write-allocate) and without displacing cached data. For outputs too big
// to stay in cache; stream_fence() orders such stores before the data is handed to another
// thread.
inline void stream(float* p, const Packet<float>& v) {
#if defined(EIGEN_VECTORIZE_AVX512)
  _mm512_stream_ps(p, v);
#elif defined(EIGEN_VECTORIZE_AVX)
  _mm256_stream_ps(p, v);
#elif defined(EIGEN_VECTORIZE_SSE2)
  _mm_stream_ps(p, v);
#else
  Eigen::internal::pstore(p, v);
#endif
}
inline void stream(double* p, const Packet<double>& v) {
#if defined(EIGEN_VECTORIZE_AVX512)
  _mm512_stream_pd(p, v);
#elif defined(EIGEN_VECTORIZE_AVX)
  _mm256_stream_pd(p, v);
#elif defined(EIGEN_VECTORIZE_SSE2)
  _mm_stream_pd(p, v);
#else
  Eigen::internal::pstore(p, v);
#endif
}
inline void stream_fence() {
#if defined(EIGEN_VECTORIZE_SSE2)
  _mm_sfence();
#endif
}

// Lanes [lo, hi) of v stored at p + lo, ..., p + hi - 1 (0 <= lo <= hi <= width<T>); nothing
// else at p is touched, so p may point before or into the end of an array whose lanes outside
// [lo, hi) lie beyond it (all lanes: a plain store). And the first n values at p loaded into a
// packet whose other lanes are 0, reading nothing at or past p + n. Masked moves where the
// target has them, lane by lane elsewhere.
template <class T>
inline void store_lanes_by_lane(T* p, const Packet<T>& v, long lo, long hi) {
  alignas(64) T d[width<T>];
  Eigen::internal::pstore(d, v);
  for (long k = lo; k < hi; ++k) p[k] = d[k];
}
template <class T>
inline Packet<T> load_first_by_lane(const T* p, long n) {
  alignas(64) T d[width<T>] = {};
  for (long k = 0; k < n; ++k) d[k] = p[k];
  return Eigen::internal::pload<Packet<T>>(d);
}
#if defined(EIGEN_VECTORIZE_AVX512)
inline __mmask16 lanes_mask(long lo, long hi) { return static_cast<__mmask16>((1u << hi) - (1u << lo)); }
#elif defined(EIGEN_VECTORIZE_AVX2)
inline __m256i lanes_mask32(long lo, long hi) {  // 32-bit lanes k with lo <= k < hi all ones
  const __m256i k = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(lo)), k),
                             _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(hi)), k));
}
inline __m256i lanes_mask64(long lo, long hi) {
  const __m256i k = _mm256_setr_epi64x(0, 1, 2, 3);
  return _mm256_andnot_si256(_mm256_cmpgt_epi64(_mm256_set1_epi64x(lo), k), _mm256_cmpgt_epi64(_mm256_set1_epi64x(hi), k));
}
#endif
inline void store_lanes(float* p, const Packet<float>& v, long lo, long hi) {
  if (lo == 0 && hi == width<float>) return store(p, v);  // masked stores are slower on some CPUs
#if defined(EIGEN_VECTORIZE_AVX512)
  _mm512_mask_storeu_ps(p, lanes_mask(lo, hi), v);
#elif defined(EIGEN_VECTORIZE_AVX2)
  _mm256_maskstore_ps(p, lanes_mask32(lo, hi), v);
#else
  store_lanes_by_lane<float>(p, v, lo, hi);
#endif
}
inline void store_lanes(double* p, const Packet<double>& v, long lo, long hi) {
  if (lo == 0 && hi == width<double>) return store(p, v);
#if defined(EIGEN_VECTORIZE_AVX512)
  _mm512_mask_storeu_pd(p, static_cast<__mmask8>(lanes_mask(lo, hi)), v);
#elif defined(EIGEN_VECTORIZE_AVX2)
  _mm256_maskstore_pd(p, lanes_mask64(lo, hi), v);
#else
  store_lanes_by_lane<double>(p, v, lo, hi);
#endif
}
inline Packet<float> load_first(const float* p, long n) {
#if defined(EIGEN_VECTORIZE_AVX512)
  return _mm512_maskz_loadu_ps(lanes_mask(0, n), p);
#elif defined(EIGEN_VECTORIZE_AVX2)
  return _mm256_maskload_ps(p, lanes_mask32(0, n));
#else
  return load_first_by_lane<float>(p, n);
#endif
}
inline Packet<double> load_first(const double* p, long n) {
#if defined(EIGEN_VECTORIZE_AVX512)
  return _mm512_maskz_loadu_pd(static_cast<__mmask8>(lanes_mask(0, n)), p);
#elif defined(EIGEN_VECTORIZE_AVX2)
  return _mm256_maskload_pd(p, lanes_mask64(0, n));
#else
  return load_first_by_lane<double>(p, n);
#endif
}

// The 2 * width<T> values a, b (a first) split by index parity: even gets a[0], a[2], ...,
// b[0], b[2], ...; odd gets a[1], a[3], ..., b[1], ... A permute or two per packet where the
// target has them, lane by lane elsewhere.
template <class T>
inline void deinterleave_by_lane(const Packet<T>& a, const Packet<T>& b, Packet<T>& even, Packet<T>& odd) {
  alignas(64) T p[2 * width<T>], e[width<T>], o[width<T>];
  Eigen::internal::pstore(p, a);
  Eigen::internal::pstore(p + width<T>, b);
  for (long k = 0; k < width<T>; ++k) {
    e[k] = p[2 * k];
    o[k] = p[2 * k + 1];
  }
  even = Eigen::internal::pload<Packet<T>>(e);
  odd = Eigen::internal::pload<Packet<T>>(o);
}
inline void deinterleave(const Packet<float>& a, const Packet<float>& b, Packet<float>& even, Packet<float>& odd) {
#if defined(EIGEN_VECTORIZE_AVX512)
  const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  even = _mm512_permutex2var_ps(a, ie, b);
  odd = _mm512_permutex2var_ps(a, io, b);
#elif defined(EIGEN_VECTORIZE_AVX2)
  // per 128-bit lane: a0 a2 b0 b2 | a4 a6 b4 b6, then the 64-bit pairs put in order
  even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))),
                                                _MM_SHUFFLE(3, 1, 2, 0)));
  odd = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1))),
                                               _MM_SHUFFLE(3, 1, 2, 0)));
#elif defined(EIGEN_VECTORIZE_AVX) || !defined(EIGEN_VECTORIZE_SSE2)
  deinterleave_by_lane<float>(a, b, even, odd);
#else
  even = _mm_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
  odd = _mm_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
#endif
}
inline void deinterleave(const Packet<double>& a, const Packet<double>& b, Packet<double>& even, Packet<double>& odd) {
#if defined(EIGEN_VECTORIZE_AVX512)
  even = _mm512_permutex2var_pd(a, _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14), b);
  odd = _mm512_permutex2var_pd(a, _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15), b);
#elif defined(EIGEN_VECTORIZE_AVX2)
  // a0 b0 | a2 b2 and a1 b1 | a3 b3, then the middle pair swapped
  even = _mm256_permute4x64_pd(_mm256_unpacklo_pd(a, b), _MM_SHUFFLE(3, 1, 2, 0));
  odd = _mm256_permute4x64_pd(_mm256_unpackhi_pd(a, b), _MM_SHUFFLE(3, 1, 2, 0));
#elif defined(EIGEN_VECTORIZE_AVX) || !defined(EIGEN_VECTORIZE_SSE2)
  deinterleave_by_lane<double>(a, b, even, odd);
#else
  even = _mm_unpacklo_pd(a, b);
  odd = _mm_unpackhi_pd(a, b);
#endif
}

// Elements from p to the next packet-aligned address (p aligned to its element).
template <class T>
inline long to_alignment(const T* p) {
  constexpr auto bytes = static_cast<std::uintptr_t>(width<T>) * sizeof(T);
  return static_cast<long>(((bytes - reinterpret_cast<std::uintptr_t>(p) % bytes) % bytes) / sizeof(T));
}

}  // namespace bnrelu::kernels::simd
