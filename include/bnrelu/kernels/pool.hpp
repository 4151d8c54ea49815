// Max-pooling arithmetic.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "../tensor.hpp"
#include "../threads.hpp"

namespace bnrelu::kernels {

struct Pool2dGeometry {
  Index N, C, H, W;  // input
  Index KH, KW, stride, pad;
  Index HO, WO;  // output
};

// x: [N, C, H, W]; y: [N, C, HO, WO]; argmax: [N, C, HO, WO], index into the H*W plane.
// Padding counts as -inf. Ties go to the first maximum in row-major window order; a NaN
// wins over any number (as in PyTorch, a later NaN replaces an earlier one).
template <class T>
void maxpool2d_forward(T* y, std::int32_t* argmax, const T* x, const Pool2dGeometry& g) {
  const Index planes = g.N * g.C;
#pragma omp parallel for schedule(static)
  for (Index p = 0; p < planes; ++p) {
    const T* xp = x + p * g.H * g.W;
    T* yp = y + p * g.HO * g.WO;
    std::int32_t* ap = argmax + p * g.HO * g.WO;
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
            const T v = xp[h * g.W + w];
            if (v > best || std::isnan(v)) {
              best = v;
              best_i = h * g.W + w;
            }
          }
        yp[oh * g.WO + ow] = best;
        ap[oh * g.WO + ow] = static_cast<std::int32_t>(best_i);
      }
    }
  }
}

// dx = 0, then dx[argmax] += dy for every output.
template <class T>
void maxpool2d_backward(T* dx, const T* dy, const std::int32_t* argmax, const Pool2dGeometry& g) {
  const Index planes = g.N * g.C;
#pragma omp parallel for schedule(static)
  for (Index p = 0; p < planes; ++p) {
    T* dxp = dx + p * g.H * g.W;
    const T* dyp = dy + p * g.HO * g.WO;
    const std::int32_t* ap = argmax + p * g.HO * g.WO;
    std::fill(dxp, dxp + g.H * g.W, T(0));
    for (Index i = 0; i < g.HO * g.WO; ++i) dxp[ap[i]] += dyp[i];
  }
}

}  // namespace bnrelu::kernels
