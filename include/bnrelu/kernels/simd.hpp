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

// Elements from p to the next packet-aligned address (p aligned to its element).
template <class T>
inline long to_alignment(const T* p) {
  constexpr auto bytes = static_cast<std::uintptr_t>(width<T>) * sizeof(T);
  return static_cast<long>(((bytes - reinterpret_cast<std::uintptr_t>(p) % bytes) % bytes) / sizeof(T));
}

}  // namespace bnrelu::kernels::simd
