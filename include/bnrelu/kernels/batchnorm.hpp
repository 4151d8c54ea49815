// Batch-normalisation arithmetic, optionally fused with ReLU, as free functions.
//
// Every kernel sees its activation as x: [N, C, S] (S = H*W for 4-D input, S = 1 for N x C),
// so channel c is N chunks of S contiguous values. Statistics accumulate in double.
#pragma once

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstring>

#include "../tensor.hpp"
#include "../threads.hpp"

namespace bnrelu::kernels {

// The affine map both forward and backward evaluate, so the ReLU mask that backward
// recomputes from x is bit-for-bit the mask forward applied.
template <class T>
inline T bn_affine(T x, T scale, T shift) {
  return x * scale + shift;
}

// ReLU that lets NaN through (as PyTorch's relu does) and maps everything below 0 to 0.
template <class T>
inline T relu_value(T v) {
  return v < T(0) ? T(0) : v;
}

// The per-channel affine map of the normalisation, y = x * scale + shift, from the batch (or
// running) statistics in double; forward and backward both derive it here.
template <class T>
inline void bn_scale_shift(T& scale, T& shift, double mean, double invstd, const T* weight,
                           const T* bias, Index c) {
  const double s = (weight ? static_cast<double>(weight[c]) : 1.0) * invstd;
  scale = static_cast<T>(s);
  shift = static_cast<T>((bias ? static_cast<double>(bias[c]) : 0.0) - mean * s);
}

// The mean split as hi + lo in T: (x - hi) - lo is x - mean to nearly double accuracy even
// when |mean| >> std (data like 1e4 + noise in float).
template <class T>
struct SplitMean {
  T hi, lo;
  explicit SplitMean(double m) : hi(static_cast<T>(m)), lo(static_cast<T>(m - static_cast<double>(hi))) {}
  T centre(T x) const { return (x - hi) - lo; }
};

namespace detail {

// sum over one channel of x: [N, C, S]
template <class T>
double channel_sum(const T* x, Index N, Index C, Index S, Index c) {
  double acc = 0;
  for (Index n = 0; n < N; ++n) {
    const T* xc = x + (n * C + c) * S;
#pragma omp simd reduction(+ : acc)
    for (Index s = 0; s < S; ++s) acc += static_cast<double>(xc[s]);
  }
  return acc;
}

// sum over one channel of (x - mean)^2
template <class T>
double channel_m2(const T* x, Index N, Index C, Index S, Index c, double mean) {
  double acc = 0;
  for (Index n = 0; n < N; ++n) {
    const T* xc = x + (n * C + c) * S;
#pragma omp simd reduction(+ : acc)
    for (Index s = 0; s < S; ++s) {
      const double d = static_cast<double>(xc[s]) - mean;
      acc += d * d;
    }
  }
  return acc;
}

// y = [relu](x * scale + shift) over one channel
template <class T>
void channel_affine(T* y, const T* x, Index N, Index C, Index S, Index c, T scale, T shift,
                    bool relu) {
  for (Index n = 0; n < N; ++n) {
    const T* xc = x + (n * C + c) * S;
    T* yc = y + (n * C + c) * S;
    if (relu) {
#pragma omp simd
      for (Index s = 0; s < S; ++s) yc[s] = relu_value(bn_affine(xc[s], scale, shift));
    } else {
#pragma omp simd
      for (Index s = 0; s < S; ++s) yc[s] = bn_affine(xc[s], scale, shift);
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
#pragma omp parallel for schedule(static)
  for (Index c = 0; c < C; ++c) {
    const T* src = x;
    if (x_copy) {
      for (Index n = 0; n < N; ++n)
        std::memcpy(x_copy + (n * C + c) * S, x + (n * C + c) * S, S * sizeof(T));
      src = x_copy;
    }
    mean[c] = detail::channel_sum(src, N, C, S, c) / M;
    var[c] = detail::channel_m2(src, N, C, S, c, mean[c]) / M;  // two passes: no cancellation
    invstd[c] = 1.0 / std::sqrt(var[c] + eps);
    T scale, shift;
    bn_scale_shift(scale, shift, mean[c], invstd[c], weight, bias, c);
    detail::channel_affine(y, src, N, C, S, c, scale, shift, relu);
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
    for (Index c = 0; c < C; ++c) {
      const T* xc = x + (n * C + c) * S;
      T* yc = y + (n * C + c) * S;
      const T sc = scale[c], sh = shift[c];
      if (relu) {
#pragma omp simd
        for (Index s = 0; s < S; ++s) yc[s] = relu_value(bn_affine(xc[s], sc, sh));
      } else {
#pragma omp simd
        for (Index s = 0; s < S; ++s) yc[s] = bn_affine(xc[s], sc, sh);
      }
    }
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
          const T g = (!relu || bn_affine(xr[j], scale[j], shift[j]) > T(0)) ? dyr[j] : T(0);
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
        gs[j] = static_cast<T>(is * (weight ? weight[c] : T(1)));
      }
      for (Index n = 0; n < N; ++n) {
        const T* xr = x + n * C + c0;
        const T* dyr = dy + n * C + c0;
        T* dxr = dx + n * C + c0;
#pragma omp simd
        for (Index j = 0; j < w; ++j) {
          const T g = (!relu || bn_affine(xr[j], scale[j], shift[j]) > T(0)) ? dyr[j] : T(0);
          dxr[j] = (g - ((xr[j] - mu_hi[j]) - mu_lo[j]) * k[j] - mean_g[j]) * gs[j];
        }
      }
    }
    return;
  }
#pragma omp parallel for schedule(static)
  for (Index c = 0; c < C; ++c) {
    T scale, shift;
    bn_scale_shift(scale, shift, mean[c], invstd[c], weight, bias, c);
    const SplitMean<T> mu(mean[c]);
    double sum = 0, dot = 0;
    for (Index n = 0; n < N; ++n) {
      const T* xc = x + (n * C + c) * S;
      const T* dyc = dy + (n * C + c) * S;
      if (relu) {
#pragma omp simd reduction(+ : sum, dot)
        for (Index s = 0; s < S; ++s) {
          const T g = bn_affine(xc[s], scale, shift) > T(0) ? dyc[s] : T(0);
          sum += static_cast<double>(g);
          dot += static_cast<double>(g) * static_cast<double>(mu.centre(xc[s]));
        }
      } else {
#pragma omp simd reduction(+ : sum, dot)
        for (Index s = 0; s < S; ++s) {
          sum += static_cast<double>(dyc[s]);
          dot += static_cast<double>(dyc[s]) * static_cast<double>(mu.centre(xc[s]));
        }
      }
    }
    const double is = invstd[c];
    if (dbias) dbias[c] += static_cast<T>(sum);
    if (dweight) dweight[c] += static_cast<T>(dot * is);
    const T k = static_cast<T>(dot * is * is / M);
    const T mean_g = static_cast<T>(sum / M);
    const T gs = static_cast<T>(is * (weight ? weight[c] : T(1)));
    for (Index n = 0; n < N; ++n) {
      const T* xc = x + (n * C + c) * S;
      const T* dyc = dy + (n * C + c) * S;
      T* dxc = dx + (n * C + c) * S;
      if (relu) {
#pragma omp simd
        for (Index s = 0; s < S; ++s) {
          const T g = bn_affine(xc[s], scale, shift) > T(0) ? dyc[s] : T(0);
          dxc[s] = (g - mu.centre(xc[s]) * k - mean_g) * gs;
        }
      } else {
#pragma omp simd
        for (Index s = 0; s < S; ++s) dxc[s] = (dyc[s] - mu.centre(xc[s]) * k - mean_g) * gs;
      }
    }
  }
}

}  // namespace bnrelu::kernels
