// Convolution arithmetic: im2col + Eigen GEMM, or Winograd F(2x2, 3x3) for the 3x3, stride-1
// layers it serves better (winograd.hpp); one image per thread either way, or for a batch
// smaller than the thread count, each image's forward shared by all the threads.
#pragma once

#include <algorithm>
#include <cassert>
#include <cstring>
#include <vector>

#include "../detail/eigen.hpp"

#include "../tensor.hpp"
#include "../threads.hpp"
#include "activation.hpp"
#include "matrix.hpp"
#include "pool.hpp"
#include "winograd.hpp"

namespace bnrelu::kernels {

struct Conv2dGeometry {
  Index N, C, H, W;  // input
  Index O, KH, KW, stride, pad, dil;
  Index HO, WO;  // output
  Index col_rows() const { return C * KH * KW; }
  Index col_cols() const { return HO * WO; }
};

// The output columns [first, last) of a kernel tap at column offset off (kw * dil - pad) whose
// input column ow * stride + off lies inside the image; outside them the tap reads padding.
inline void valid_columns(Index& first, Index& last, Index off, const Conv2dGeometry& g) {
  first = off >= 0 ? 0 : (-off + g.stride - 1) / g.stride;
  last = g.W - off <= 0 ? 0 : std::min(g.WO, (g.W - off + g.stride - 1) / g.stride);
  first = std::min(first, last);
}

// x: [C, H, W] one image -> col: [C*KH*KW, HO*WO]; out-of-image taps are 0. The rows of
// channels [c0, c1) only when given (a team's share).
template <class T>
void im2col(T* col, const T* x, const Conv2dGeometry& g, Index c0 = 0, Index c1 = -1) {
  if (c1 < 0) c1 = g.C;
  for (Index c = c0; c < c1; ++c)
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

// How a convolution computes its output and gradients. automatic takes Winograd where it
// applies and has at least 8 input and 8 output channels: with fewer, the transforms cost more
// than the smaller products save (bench_training's conv_algorithm measures the choice by shape;
// docs/performance.md has the figures).
enum class ConvAlgorithm { automatic, im2col, winograd };

// Winograd F(2x2, 3x3) computes 3x3 kernels at stride 1 without dilation; padding up to 2
// keeps the input gradient's own padding (2 - padding) valid.
inline bool winograd_applies(const Conv2dGeometry& g) {
  return g.KH == 3 && g.KW == 3 && g.stride == 1 && g.dil == 1 && g.pad <= 2;
}
inline bool use_winograd(const Conv2dGeometry& g, ConvAlgorithm a) {
  if (a == ConvAlgorithm::im2col || !winograd_applies(g)) return false;
  return a == ConvAlgorithm::winograd || (g.C >= 8 && g.O >= 8);
}
// The forward as a Winograd convolution of x, and the input gradient as one of dy.
inline WinogradGeometry winograd_forward_geometry(const Conv2dGeometry& g) {
  return {g.N, g.C, g.H, g.W, g.O, g.pad};
}
inline WinogradGeometry winograd_backward_geometry(const Conv2dGeometry& g) {
  return {g.N, g.O, g.HO, g.WO, g.C, 2 - g.pad};
}

// Images are spread over threads when there are at least as many as threads. A smaller
// batch runs one image at a time on the whole team (the forward only; the backward of such a
// batch runs on one thread).
inline int conv_image_threads(Index N) { return N >= num_threads() ? num_threads() : 1; }
// Whether the forward shares each image among the threads. An im2col product too small for
// Eigen's GEMM (rows + columns + depth under EIGEN_GEMM_TO_COEFFBASED_THRESHOLD, 20) is
// computed coefficient by coefficient, rounding otherwise; such a layer is not shared, so that
// every output is the same whatever the thread count.
inline bool conv_team_forward(const Conv2dGeometry& g, bool winograd) {
  return g.N < num_threads() && (winograd || g.col_rows() + g.col_cols() >= 20);
}

// Output channels [o0, o1) of one image from its columns: the rows of weight * col, + bias,
// + the addend's rows (an) if given, then max(0, .) when relu.
template <class T>
void conv_rows(T* yn, const T* col, const T* weight, const T* bias, const Conv2dGeometry& g, bool relu, Index o0,
               Index o1, const T* an = nullptr) {
  const Index K = g.col_rows(), P = g.col_cols(), rows = o1 - o0;
  if (rows <= 0) return;
  MatrixMap<T> y(yn + o0 * P, rows, P);
  y.noalias() = ConstMatrixMap<T>(weight + o0 * K, rows, K) * ConstMatrixMap<T>(col, K, P);
  if (bias) y.colwise() += Eigen::Map<const Eigen::Vector<T, Eigen::Dynamic>>(bias + o0, rows);
  if (an)
    add_then_relu(yn + o0 * P, an + o0 * P, rows * P, relu);
  else if (relu)
    for (Index i = 0; i < rows * P; ++i) yn[o0 * P + i] = relu_value(yn[o0 * P + i]);
}

// The team's share of output channels: whole blocks of 8 rows (Eigen's products treat rows in
// blocks of whole vectors, so each output is computed the same way whichever thread has it).
inline void team_rows(Index& o0, Index& o1, Index O, int t, int team) {
  const Index blocks = (O + 7) / 8;
  o0 = std::min(O, blocks * t / team * 8);
  o1 = std::min(O, blocks * (t + 1) / team * 8);
}

// Whether a max pool after the convolution runs inside Winograd's output transform: windows
// of 2x2 at stride 2 without padding are the transform's own 2x2 tiles.
inline bool pool_in_winograd_tiles(const Pool2dGeometry* pool, bool winograd) {
  return pool && winograd && pool->KH == 2 && pool->KW == 2 && detail::tiling_pool(*pool);
}
// Elements of the one image's output a pool reads from, per thread (or per team), outside
// Winograd's tiles.
inline Index pooled_image_scratch(const Conv2dGeometry& g, const Pool2dGeometry* pool, bool winograd) {
  return pool && !pool_in_winograd_tiles(pool, winograd) ? g.O * g.HO * g.WO : 0;
}

// y[n] = weight * im2col(x[n]) + bias (+ addend[n]), then max(0, .) when relu, while the image
// is in cache. x: [N, C, H, W]; weight: [O, C*KH*KW]; bias: [O] or null; y: [N, O, HO, WO];
// addend: [N, O, HO, WO] or null (a residual block's shortcut, added to the rounded convolution
// as a separate add would add it). workspace: conv2d_forward_workspace<T>(g, algorithm, pool)
// elements. filters: weight's Winograd transform (winograd_filter_transform, [16, O, C]) when
// the caller keeps one, else null.
//
// pool (without an addend): the max pool that follows, as one plane's geometry (H, W = HO, WO);
// y is then [N, O, pool->HO, pool->WO], and the convolution's own output is not written to y:
// Winograd's 2x2 tiles are the windows of an unpadded 2x2, stride-2 pool, taken inside the
// output transform; otherwise each image's output goes to one image of scratch (per thread, or
// one for a team sharing an image) and maxpool_plane reads it from there. The same values as
// the convolution then maxpool2d_forward.
template <class T>
void conv2d_forward(T* y, T* workspace, const T* x, const T* weight, const T* bias,
                    const Conv2dGeometry& g, bool relu = false,
                    ConvAlgorithm algorithm = ConvAlgorithm::automatic, const T* filters = nullptr,
                    const T* addend = nullptr, const Pool2dGeometry* pool = nullptr) {
  assert(!(pool && addend));
  const Index K = g.col_rows(), P = g.col_cols();
  auto add_of = [&](Index n) { return addend ? addend + n * g.O * P : nullptr; };
  const int threads = conv_image_threads(g.N);
  const bool winograd = use_winograd(g, algorithm), tile_pool = pool_in_winograd_tiles(pool, winograd);
  const Index scratch_image = pooled_image_scratch(g, pool, winograd);
  const Index y_image = pool ? g.O * pool->HO * pool->WO : g.O * P;
  // the convolution's output of image n: y's own, or the thread's (team's) scratch to pool from
  T* const pooled_scratch = workspace + conv2d_forward_workspace<T>(g, algorithm);
  auto out_of = [&](Index n, int slot) { return scratch_image ? pooled_scratch + slot * scratch_image : y + n * y_image; };
  // channels [o0, o1) of image n pooled from the scratch into y
  auto pool_channels = [&](Index n, int slot, Index o0, Index o1) {
    if (!scratch_image) return;
    for (Index o = o0; o < o1; ++o)
      maxpool_plane(y + n * y_image + o * pool->HO * pool->WO, static_cast<std::int32_t*>(nullptr),
                    out_of(n, slot) + o * P, *pool);
  };
  if (winograd) {
    const auto wg = winograd_forward_geometry(g);
    if (!filters) {
      winograd_filter_transform(workspace, weight, g.O, g.C);
      filters = workspace;
    }
    T* scratch = workspace + winograd_filters_workspace<T>(g.O, g.C);
    if (conv_team_forward(g, true)) {
#pragma omp parallel num_threads(num_threads())
      {
        const int t = bnrelu::detail::thread_index(), team = bnrelu::detail::team_size();
        for (Index n = 0; n < g.N; ++n) {
          winograd_conv_image_team(out_of(n, 0), x + n * g.C * g.H * g.W, filters, bias, wg, scratch, relu, add_of(n),
                                   tile_pool);
          pool_channels(n, 0, g.O * t / team, g.O * (t + 1) / team);  // the channels this thread wrote
        }
      }
      return;
    }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (Index n = 0; n < g.N; ++n) {
      const int slot = bnrelu::detail::thread_index();
      winograd_conv_image(out_of(n, slot), x + n * g.C * g.H * g.W, filters, bias, wg,
                          scratch + slot * winograd_image_workspace<T>(wg), relu, add_of(n), tile_pool);
      pool_channels(n, slot, 0, g.O);
    }
    return;
  }
  if (conv_team_forward(g, false)) {  // one image at a time: channels' columns, then output channels
#pragma omp parallel num_threads(num_threads())
    {
      const int t = bnrelu::detail::thread_index(), team = bnrelu::detail::team_size();
      Index o0, o1;
      team_rows(o0, o1, g.O, t, team);
      for (Index n = 0; n < g.N; ++n) {
#pragma omp barrier
        im2col(workspace, x + n * g.C * g.H * g.W, g, g.C * t / team, g.C * (t + 1) / team);
#pragma omp barrier
        conv_rows(out_of(n, 0), workspace, weight, bias, g, relu, o0, o1, add_of(n));
        pool_channels(n, 0, o0, o1);
      }
    }
    return;
  }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (Index n = 0; n < g.N; ++n) {
    const int slot = bnrelu::detail::thread_index();
    T* col = workspace + static_cast<Index>(slot) * K * P;
    im2col(col, x + n * g.C * g.H * g.W, g);
    conv_rows(out_of(n, slot), col, weight, bias, g, relu, 0, g.O, add_of(n));
    pool_channels(n, slot, 0, g.O);
  }
}

// Both gradients by Winograd (winograd.hpp): per image, dx as the Winograd convolution of dy
// with the flipped filters, and the weight gradient accumulated per thread in the transformed
// domain, summed over threads in a fixed order and transformed back once.
template <class T>
void conv2d_backward_winograd(T* dx, T* dweight, T* dbias, T* workspace, const T* dy, const T* x,
                              const T* weight, const Conv2dGeometry& g) {
  const Index O = g.O, C = g.C, P = g.col_cols();
  const int threads = conv_image_threads(g.N);
  const auto fwd = winograd_forward_geometry(g), bwd = winograd_backward_geometry(g);
  const Index dw_scratch = winograd_weight_gradient_workspace<T>(fwd);
  const Index per_thread = dw_scratch + (dx ? winograd_image_workspace<T>(bwd) : 0);
  T* u = workspace + threads * per_thread;  // the flipped filters' transform: [16, C, O]
  T* dbias_partials = u + 16 * C * O;       // [threads - 1, O]
  if (dx) winograd_filter_transform(u, weight, O, C, /*flipped=*/true);
  // every slot zeroed up front: OpenMP may run a smaller team than asked for (nested in another
  // parallel region, OMP_THREAD_LIMIT), and the sums below read all of them
  for (int t = 0; t < threads; ++t) {
    T* m = workspace + t * per_thread;
    std::fill(m, m + 16 * O * C, T(0));
  }
  std::fill(dbias_partials, dbias_partials + (threads - 1) * O, T(0));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const Index t = bnrelu::detail::thread_index();
    T* mine = workspace + t * per_thread;
    T* db = dbias ? (t == 0 ? dbias : dbias_partials + (t - 1) * O) : nullptr;
#pragma omp for schedule(static)
    for (Index n = 0; n < g.N; ++n) {
      const T* dyn = dy + n * O * P;
      winograd_weight_gradient_image(mine, x + n * C * g.H * g.W, dyn, fwd);
      if (db) Eigen::Map<Eigen::Vector<T, Eigen::Dynamic>>(db, O) += ConstMatrixMap<T>(dyn, O, P).rowwise().sum();
      if (dx) winograd_conv_image(dx + n * C * g.H * g.W, dyn, u, static_cast<const T*>(nullptr), bwd, mine + dw_scratch);
    }
  }
  for (int t = 1; t < threads; ++t) {  // fixed order: deterministic for a thread count
    const T* p = workspace + t * per_thread;
    for (Index i = 0; i < 16 * O * C; ++i) workspace[i] += p[i];
    if (dbias)
      for (Index o = 0; o < O; ++o) dbias[o] += dbias_partials[(t - 1) * O + o];
  }
  winograd_weight_gradient_add(dweight, workspace, O, C);
}

// dx = col2im(weight^T * dy[n]);  dweight += dy[n] * im2col(x[n])^T;  dbias += sum dy[n]
// (both by Winograd instead when use_winograd says so). dx may be null (not wanted).
// workspace: conv2d_backward_workspace<T>(g, algorithm) elements.
template <class T>
void conv2d_backward(T* dx, T* dweight, T* dbias, T* workspace, const T* dy, const T* x,
                     const T* weight, const Conv2dGeometry& g,
                     ConvAlgorithm algorithm = ConvAlgorithm::automatic) {
  if (use_winograd(g, algorithm)) return conv2d_backward_winograd(dx, dweight, dbias, workspace, dy, x, weight, g);
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

// Workspace sizes for the two passes; the forward's with the scratch a pool after it reads from.
template <class T>
Index conv2d_forward_workspace(const Conv2dGeometry& g, ConvAlgorithm a = ConvAlgorithm::automatic,
                               const Pool2dGeometry* pool = nullptr) {
  const Index t = conv_image_threads(g.N);
  const bool winograd = use_winograd(g, a), team = conv_team_forward(g, winograd);
  const Index pooled = (team ? 1 : t) * pooled_image_scratch(g, pool, winograd);
  if (winograd) {
    const auto wg = winograd_forward_geometry(g);
    return winograd_filters_workspace<T>(g.O, g.C) +
           (team ? winograd_team_workspace<T>(wg, num_threads()) : t * winograd_image_workspace<T>(wg)) + pooled;
  }
  return (team ? 1 : t) * g.col_rows() * g.col_cols() + pooled;
}
template <class T>
Index conv2d_backward_workspace(const Conv2dGeometry& g, ConvAlgorithm a = ConvAlgorithm::automatic) {
  const Index t = conv_image_threads(g.N);
  if (use_winograd(g, a))  // the dx part is used only when dx is wanted
    return t * (winograd_weight_gradient_workspace<T>(winograd_forward_geometry(g)) +
                winograd_image_workspace<T>(winograd_backward_geometry(g))) +
           16 * g.O * g.C + (t - 1) * g.O;
  return 2 * t * g.col_rows() * g.col_cols() + (t - 1) * g.O * (g.col_rows() + 1);
}

}  // namespace bnrelu::kernels
