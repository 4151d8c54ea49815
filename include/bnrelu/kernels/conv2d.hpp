// Convolution arithmetic: im2col + Eigen GEMM, one image per thread.
#pragma once

#include <algorithm>
#include <cstring>
#include <vector>

#include <Eigen/Core>

#include "../tensor.hpp"
#include "../threads.hpp"
#include "batchnorm.hpp"  // relu_value

namespace bnrelu::kernels {

struct Conv2dGeometry {
  Index N, C, H, W;  // input
  Index O, KH, KW, stride, pad, dil;
  Index HO, WO;  // output
  Index col_rows() const { return C * KH * KW; }
  Index col_cols() const { return HO * WO; }
};

template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using MatrixMap = Eigen::Map<RowMatrix<T>>;
template <class T>
using ConstMatrixMap = Eigen::Map<const RowMatrix<T>>;

// The output columns [first, last) of a kernel tap at column offset off (kw * dil - pad) whose
// input column ow * stride + off lies inside the image; outside them the tap reads padding.
inline void valid_columns(Index& first, Index& last, Index off, const Conv2dGeometry& g) {
  first = off >= 0 ? 0 : (-off + g.stride - 1) / g.stride;
  last = g.W - off <= 0 ? 0 : std::min(g.WO, (g.W - off + g.stride - 1) / g.stride);
  first = std::min(first, last);
}

// x: [C, H, W] one image -> col: [C*KH*KW, HO*WO]; out-of-image taps are 0.
template <class T>
void im2col(T* col, const T* x, const Conv2dGeometry& g) {
  for (Index c = 0; c < g.C; ++c)
    for (Index kh = 0; kh < g.KH; ++kh)
      for (Index kw = 0; kw < g.KW; ++kw) {
        T* row = col + ((c * g.KH + kh) * g.KW + kw) * g.HO * g.WO;
        for (Index oh = 0; oh < g.HO; ++oh) {
          const Index ih = oh * g.stride - g.pad + kh * g.dil;
          T* out = row + oh * g.WO;
          if (ih < 0 || ih >= g.H) {
            std::fill(out, out + g.WO, T(0));
            continue;
          }
          const T* in = x + (c * g.H + ih) * g.W;
          const Index off = kw * g.dil - g.pad;
          Index first, last;
          valid_columns(first, last, off, g);
          std::fill(out, out + first, T(0));
          if (g.stride == 1)
            std::copy(in + first + off, in + last + off, out + first);
          else
            for (Index ow = first; ow < last; ++ow) out[ow] = in[ow * g.stride + off];
          std::fill(out + last, out + g.WO, T(0));
        }
      }
}

// The adjoint of im2col: dx[C, H, W] += scatter of col.
template <class T>
void col2im_add(T* dx, const T* col, const Conv2dGeometry& g) {
  for (Index c = 0; c < g.C; ++c)
    for (Index kh = 0; kh < g.KH; ++kh)
      for (Index kw = 0; kw < g.KW; ++kw) {
        const T* row = col + ((c * g.KH + kh) * g.KW + kw) * g.HO * g.WO;
        for (Index oh = 0; oh < g.HO; ++oh) {
          const Index ih = oh * g.stride - g.pad + kh * g.dil;
          if (ih < 0 || ih >= g.H) continue;
          T* out = dx + (c * g.H + ih) * g.W;
          const T* in = row + oh * g.WO;
          const Index off = kw * g.dil - g.pad;
          Index first, last;
          valid_columns(first, last, off, g);
          if (g.stride == 1) {
            for (Index ow = first; ow < last; ++ow) out[ow + off] += in[ow];
          } else {
            for (Index ow = first; ow < last; ++ow) out[ow * g.stride + off] += in[ow];
          }
        }
      }
}

// Images are spread over threads when there are enough of them; otherwise one image at a
// time with Eigen threading the GEMM.
inline int conv_image_threads(Index N) { return N >= num_threads() ? num_threads() : 1; }

// y[n] = weight * im2col(x[n]) + bias, then max(0, .) when relu (while the image is in cache)
// x: [N, C, H, W]; weight: [O, C*KH*KW]; bias: [O] or null; y: [N, O, HO, WO]
// workspace: at least conv_image_threads(N) * col_rows * col_cols elements.
template <class T>
void conv2d_forward(T* y, T* workspace, const T* x, const T* weight, const T* bias,
                    const Conv2dGeometry& g, bool relu = false) {
  const Index K = g.col_rows(), P = g.col_cols();
  const int threads = conv_image_threads(g.N);
  ConstMatrixMap<T> w(weight, g.O, K);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (Index n = 0; n < g.N; ++n) {
    T* col = workspace + static_cast<Index>(bnrelu::detail::thread_index()) * K * P;
    im2col(col, x + n * g.C * g.H * g.W, g);
    MatrixMap<T> yn(y + n * g.O * P, g.O, P);
    yn.noalias() = w * ConstMatrixMap<T>(col, K, P);
    if (bias) yn.colwise() += Eigen::Map<const Eigen::Vector<T, Eigen::Dynamic>>(bias, g.O);
    if (relu) {
      T* out = y + n * g.O * P;
      for (Index i = 0; i < g.O * P; ++i) out[i] = relu_value(out[i]);
    }
  }
}

// dx = col2im(weight^T * dy[n]);  dweight += dy[n] * im2col(x[n])^T;  dbias += sum dy[n]
// dx may be null (not wanted). workspace: 2 * conv_image_threads(N) * K * P, plus
// (threads - 1) * O * (K + 1) for the per-thread weight-gradient partial sums.
template <class T>
void conv2d_backward(T* dx, T* dweight, T* dbias, T* workspace, const T* dy, const T* x,
                     const T* weight, const Conv2dGeometry& g) {
  const Index K = g.col_rows(), P = g.col_cols(), O = g.O;
  const int threads = conv_image_threads(g.N);
  ConstMatrixMap<T> w(weight, O, K);
  T* partials = workspace + 2 * static_cast<Index>(threads) * K * P;
  if (threads > 1) std::fill(partials, partials + (threads - 1) * O * (K + 1), T(0));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const Index t = bnrelu::detail::thread_index();
    T* col = workspace + 2 * t * K * P;
    T* dcol = col + K * P;
    // thread 0 adds straight into dweight/dbias; the others into their own partials
    T* dw = t == 0 ? dweight : partials + (t - 1) * O * (K + 1);
    T* db = t == 0 ? dbias : (dbias ? dw + O * K : nullptr);
    MatrixMap<T> dwm(dw, O, K);
#pragma omp for schedule(static)
    for (Index n = 0; n < g.N; ++n) {
      ConstMatrixMap<T> dyn(dy + n * O * P, O, P);
      im2col(col, x + n * g.C * g.H * g.W, g);
      dwm.noalias() += dyn * ConstMatrixMap<T>(col, K, P).transpose();
      if (db) Eigen::Map<Eigen::Vector<T, Eigen::Dynamic>>(db, O) += dyn.rowwise().sum();
      if (dx) {
        MatrixMap<T> dc(dcol, K, P);
        dc.noalias() = w.transpose() * dyn;
        T* dxn = dx + n * g.C * g.H * g.W;
        std::fill(dxn, dxn + g.C * g.H * g.W, T(0));
        col2im_add(dxn, dcol, g);
      }
    }
  }
  for (int t = 1; t < threads; ++t) {  // fixed order: deterministic for a thread count
    const T* p = partials + (t - 1) * O * (K + 1);
    for (Index i = 0; i < O * K; ++i) dweight[i] += p[i];
    if (dbias)
      for (Index o = 0; o < O; ++o) dbias[o] += p[O * K + o];
  }
}

// Workspace sizes for the two passes.
inline Index conv2d_forward_workspace(const Conv2dGeometry& g) {
  return conv_image_threads(g.N) * g.col_rows() * g.col_cols();
}
inline Index conv2d_backward_workspace(const Conv2dGeometry& g) {
  const Index t = conv_image_threads(g.N);
  return 2 * t * g.col_rows() * g.col_cols() + (t - 1) * g.O * (g.col_rows() + 1);
}

}  // namespace bnrelu::kernels
