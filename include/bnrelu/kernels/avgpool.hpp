// Average-pooling arithmetic: fixed windows (AvgPool2d) and adaptive ones (AdaptiveAvgPool2d).
#pragma once

#include <algorithm>

#include "../tensor.hpp"
#include "../threads.hpp"

namespace bnrelu::kernels {

// Where the windows of an average pool lie. Fixed (adaptive = false): output oh covers input
// rows [oh*stride - pad, + K), clipped to the input; the divisor counts padding when
// count_include_pad. Adaptive: output oh of HO covers rows [floor(oh*H/HO), ceil((oh+1)*H/HO)).
struct AvgPool2dGeometry {
  Index N, C, H, W;  // input
  Index HO, WO;      // output
  Index K = 0, stride = 1, pad = 0;
  bool count_include_pad = true;
  bool adaptive = false;
};

namespace detail {

struct Window {
  Index h0, h1, w0, w1;
  Index divisor;  // fixed windows: what the sum is divided by
};

inline Window window(const AvgPool2dGeometry& g, Index oh, Index ow) {
  if (g.adaptive)
    return {oh * g.H / g.HO, ((oh + 1) * g.H + g.HO - 1) / g.HO, ow * g.W / g.WO, ((ow + 1) * g.W + g.WO - 1) / g.WO, 0};
  Index h0 = oh * g.stride - g.pad, w0 = ow * g.stride - g.pad;
  Index h1 = std::min(h0 + g.K, g.H + g.pad), w1 = std::min(w0 + g.K, g.W + g.pad);
  const Index padded = (h1 - h0) * (w1 - w0);
  h0 = std::max<Index>(h0, 0);
  w0 = std::max<Index>(w0, 0);
  h1 = std::min(h1, g.H);
  w1 = std::min(w1, g.W);
  return {h0, h1, w0, w1, g.count_include_pad ? padded : (h1 - h0) * (w1 - w0)};
}

// The mean of a window's sum, divided as PyTorch 1.13's CPU kernels divide it: by the
// divisor for fixed windows, by the height then the width for adaptive ones.
template <class T>
T mean_of(T sum, const Window& w, bool adaptive) {
  if (adaptive) return sum / static_cast<T>(w.h1 - w.h0) / static_cast<T>(w.w1 - w.w0);
  return sum / static_cast<T>(w.divisor);
}

}  // namespace detail

// y: [N, C, HO, WO] = the mean of each window of x: [N, C, H, W], summed in row-major order.
template <class T>
void avgpool2d_forward(T* y, const T* x, const AvgPool2dGeometry& g) {
  const Index planes = g.N * g.C;
#pragma omp parallel for schedule(static) num_threads(bnrelu::num_threads())
  for (Index p = 0; p < planes; ++p) {
    const T* xp = x + p * g.H * g.W;
    T* yp = y + p * g.HO * g.WO;
    for (Index oh = 0; oh < g.HO; ++oh)
      for (Index ow = 0; ow < g.WO; ++ow) {
        const auto w = detail::window(g, oh, ow);
        T sum = 0;
        for (Index h = w.h0; h < w.h1; ++h)
          for (Index c = w.w0; c < w.w1; ++c) sum += xp[h * g.W + c];
        yp[oh * g.WO + ow] = detail::mean_of(sum, w, g.adaptive);
      }
  }
}

// dx: [N, C, H, W] = each dy spread evenly over its window (overlapping windows add).
template <class T>
void avgpool2d_backward(T* dx, const T* dy, const AvgPool2dGeometry& g) {
  const Index planes = g.N * g.C;
#pragma omp parallel for schedule(static) num_threads(bnrelu::num_threads())
  for (Index p = 0; p < planes; ++p) {
    T* dxp = dx + p * g.H * g.W;
    const T* dyp = dy + p * g.HO * g.WO;
    std::fill(dxp, dxp + g.H * g.W, T(0));
    for (Index oh = 0; oh < g.HO; ++oh)
      for (Index ow = 0; ow < g.WO; ++ow) {
        const auto w = detail::window(g, oh, ow);
        const T d = detail::mean_of(dyp[oh * g.WO + ow], w, g.adaptive);
        for (Index h = w.h0; h < w.h1; ++h)
          for (Index c = w.w0; c < w.w1; ++c) dxp[h * g.W + c] += d;
      }
  }
}

}  // namespace bnrelu::kernels
