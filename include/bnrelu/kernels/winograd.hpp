// Winograd F(2x2, 3x3) convolution (Lavin & Gray, "Fast Algorithms for Convolutional Neural
// Networks", 2016) for 3x3 kernels at stride 1: Conv2d's forward, input gradient and weight gradient.
//
// Each 2x2 output tile is Y = A^T [U ⊙ V] A, with U = G g G^T the 4x4 transform of a 3x3
// filter g and V = B^T d B that of the 4x4 input tile d around the output tile:
//
//   B^T = | 1  0 -1  0 |    G = | 1    0    0  |    A^T = | 1  1  1  0 |
//         | 0  1  1  0 |        | 1/2  1/2  1/2 |          | 0  1 -1 -1 |
//         | 0 -1  1  0 |        | 1/2 -1/2  1/2 |
//         | 0  1  0 -1 |        | 0    0    1  |
//
// Summed over input channels, the 16 elementwise products become 16 matrix products, one per
// transform coordinate xi: M[xi] (O x tiles) = U[xi] (O x C) * V[xi] (C x tiles). That is
// 16 * O * C multiply-adds per tile of 4 outputs against 9 * 4 * O * C for direct convolution:
// 2.25x fewer. The transforms themselves cost O(C + O) per tile and run as vector adds over a
// channel's tiles. The weight gradient uses the transposed algorithm, F(3x3, 2x2), below.
//
// The input gradient of a 3x3, stride-1 convolution with padding p is itself such a convolution
// of dy with padding 2 - p and the filters flipped and transposed (g'[c][o] = rot180(g[o][c])),
// so both passes share the code below. Images are spread over threads as in conv2d.hpp, each
// image computed alone: outputs and input gradients do not depend on the thread count (the
// weight gradient sums per-thread partials in a fixed order, as with im2col).
#pragma once

#include <algorithm>

#include "../detail/eigen.hpp"

#include "../tensor.hpp"
#include "../threads.hpp"
#include "activation.hpp"
#include "matrix.hpp"
#include "reduce.hpp"
#include "simd.hpp"

namespace bnrelu::kernels {

// A 3x3, stride-1 convolution of C input planes of H x W, zero padding pad, into O output
// planes of HO x WO (HO = H + 2 pad - 2), in TH x TW tiles of 2x2 outputs.
struct WinogradGeometry {
  Index N, C, H, W, O, pad;
  Index HO, WO, TH, TW;
  WinogradGeometry(Index n, Index c, Index h, Index w, Index o, Index p)
      : N(n), C(c), H(h), W(w), O(o), pad(p), HO(h + 2 * p - 2), WO(w + 2 * p - 2), TH((HO + 1) / 2),
        TW((WO + 1) / 2) {}
  Index tiles() const { return TH * TW; }
};

namespace detail {

// u (4x4) = G g G^T for a 3x3 filter g (row-major).
template <class T>
inline void winograd_filter_tile(T* u, const T* g) {
  T t[4][3];  // G g
  for (int j = 0; j < 3; ++j) {
    const T a = g[j], b = g[3 + j], c = g[6 + j];
    t[0][j] = a;
    t[1][j] = T(0.5) * (a + b + c);
    t[2][j] = T(0.5) * (a - b + c);
    t[3][j] = c;
  }
  for (int i = 0; i < 4; ++i) {  // (G g) G^T
    const T a = t[i][0], b = t[i][1], c = t[i][2];
    u[i * 4 + 0] = a;
    u[i * 4 + 1] = T(0.5) * (a + b + c);
    u[i * 4 + 2] = T(0.5) * (a - b + c);
    u[i * 4 + 3] = c;
  }
}

// The padded plane D of a transform (D[r][c] = plane[r - pad][c - pad], 0 outside the plane)
// as 8 arrays F[p][q][s] of (TH + 1) x TW values, F[p][q][s][h TW + k] = D[2 h + p][2 (k + s) + q].
// Tile t = th TW + tw reads D[2 th + i][2 tw + j] = F[i % 2][j % 2][j / 2][t + (i / 2) TW]: the
// same index in each array for consecutive tiles, rows of tiles one after another, so each step
// of a transform is a vector operation over a channel's tiles whatever the plane's width (a
// packet per row of tiles left most lanes idle on planes narrower than two packets).
// scratch: WinogradScratch::planes elements, the arrays plane_stride apart, each followed by a
// packet of slack, so that a packet loaded at the last tile stays in the scratch. A shifted
// array's first position (k = -1, never stored) lies in the array before it.
template <class T>
struct TilePlanes {
  T* f[2][2][2];
  TilePlanes(T* scratch, Index stride) {
    for (int k = 0; k < 8; ++k) f[k / 4][k / 2 % 2][k % 2] = scratch + k * stride;
  }
};

// Rows [first, last) of D, plane rows first - pad, ... of W values each, written to the arrays
// F[r % 2][.][0] and, when shifted, F[r % 2][.][1] (the gradient transform reads s = 0 only).
// Only positions of plane values are written: the padding keeps the zeros the caller filled the
// arrays with. Vectors of 2 * width plane columns are split into even and odd columns in
// registers, a block of columns at a time down all the rows (what is stored where depends on
// the block only). readable: the values from plane on that may be read (to the end of the
// image); each row prefetches the same columns about 1 KiB (whole rows, at least one) further
// on, into the next plane at the bottom.
template <class T>
void split_rows(const TilePlanes<T>& planes, Index TW, const T* plane, Index W, Index pad, Index first, Index last,
                bool shifted, Index readable) {
  constexpr Index L = simd::width<T>;
  const Index ahead = std::max<Index>(1, 1024 / (W * static_cast<Index>(sizeof(T)))) * W;  // whole rows
  for (Index j = 0; j < W; j += 2 * L) {
    const Index n = std::min(2 * L, W - j), na = std::min(L, n), nb = std::max<Index>(0, n - L);
    // lane l of the even (odd) packet holds plane column j + 2 l (+ 1): D's column c = that + pad,
    // stored at k = c / 2 in the arrays of parity c % 2, k - 1 in the shifted ones
    struct Target {
      Index q, k0, hi0, lo1, hi1;  // parity, first k, lanes to store unshifted [0, hi0), shifted [lo1, hi1)
    };
    auto target = [&](Index j0, Index lanes) {
      const Index q = (j0 + pad) % 2, k0 = (j0 + pad) / 2;  // k0 <= TW: D has 2 TW + 2 columns
      return Target{q, k0, std::max<Index>(0, std::min(lanes, TW - k0)), std::max<Index>(0, 1 - k0),
                    shifted ? std::min(lanes, TW + 1 - k0) : 0};
    };
    const Target te = target(j, (n + 1) / 2), to = target(j + 1, n / 2);
    auto put = [&](const Target& t, const simd::Packet<T>& v, Index p, Index at) {
      if (t.hi0 > 0) simd::store_lanes(planes.f[p][t.q][0] + at + t.k0, v, 0, t.hi0);
      if (t.hi1 > t.lo1) simd::store_lanes(planes.f[p][t.q][1] + at + t.k0 - 1, v, t.lo1, t.hi1);
    };
    for (Index r = first; r < last; ++r) {
      const Index at = (r - pad) * W + j;
      const T* row = plane + at;
      if (at + ahead + n <= readable) Ahead<T>{row + ahead}.lines(0, n);
      simd::Packet<T> a, b, even, odd;
      if (n == 2 * L) {
        a = simd::load(row);
        b = simd::load(row + L);
      } else {
        a = simd::load_first(row, na);
        b = simd::load_first(nb ? row + L : row, nb);  // no pointer past the plane
      }
      simd::deinterleave(a, b, even, odd);
      put(te, even, r % 2, r / 2 * TW);
      put(to, odd, r % 2, r / 2 * TW);
    }
  }
}

}  // namespace detail

// Filter transform of a weight [O, C, 3, 3] into U: [16, O, C]; or, flipped, the input
// gradient's filters g'[c][o] = rot180(weight[o][c]) into U: [16, C, O].
template <class T>
void winograd_filter_transform(T* u, const T* weight, Index O, Index C, bool flipped = false) {
  const Index plane = O * C;
  for (Index o = 0; o < O; ++o)
    for (Index c = 0; c < C; ++c) {
      const T* w = weight + (o * C + c) * 9;
      T g[9], tile[16];
      for (int k = 0; k < 9; ++k) g[k] = w[flipped ? 8 - k : k];  // rot180 reverses the 9 taps
      detail::winograd_filter_tile(tile, g);
      const Index at = flipped ? c * O + o : o * C + c;
      for (int xi = 0; xi < 16; ++xi) u[xi * plane + at] = tile[xi];
    }
}

// n elements rounded up to whole packets of L.
inline Index whole_packets(Index n, Index L) { return (n + L - 1) / L * L; }

// Elements a transformed filter bank [16, O, C] takes at the start of a workspace: whole
// packets, so that the scratch after it starts at a packet boundary (WinogradScratch).
template <class T>
Index winograd_filters_workspace(Index O, Index C) {
  return whole_packets(16 * O * C, simd::width<T>);
}

// Scratch sizes. Every array is a whole number of packets long, and so is each channel's row of
// V and M: its P tiles, then up to the next packet lanes that the transforms never store and the
// products never read. In a packet-aligned workspace each array and each row then starts at a
// packet boundary (an AVX-512 load or store at any other address touches two cache lines), and
// the output transform's packets of tiles, loaded from a row of M and stored to the stage, stay
// inside the row. The 16 matrices of V (of M) lie a packet more than their rows apart: the
// transforms touch the same position of all 16 together, and at the power-of-two sizes of
// common layers (16 channels of 16 x 16 tiles: 16 KiB) those 16 lines would fall in one set
// of the L1 cache, which holds 8 to 12. The arrays of TilePlanes have a packet of slack after
// them (TilePlanes).
struct WinogradScratch {
  Index L;             // packet width
  Index row_stride;    // a channel's row of P tiles in V and M, P rounded up to whole packets
  Index v_stride;      // V: [16][C, P], rows row_stride apart, C row_stride + L apart
  Index m_stride;      // M: [16][O, P], rows row_stride apart, O row_stride + L apart
  Index stage_stride;  // one of the 4 staged output values of every tile: a row's length
  Index plane_stride;  // one of the 8 arrays of TilePlanes
  WinogradScratch(const WinogradGeometry& g, Index packet)
      : L(packet), row_stride(whole_packets(g.tiles(), packet)), v_stride(g.C * row_stride + packet),
        m_stride(g.O * row_stride + packet), stage_stride(row_stride),
        plane_stride(whole_packets((g.TH + 1) * g.TW + packet, packet)) {}
  // a padded plane as TilePlanes: the transforms' own scratch
  Index planes(const WinogradGeometry&) const { return 8 * plane_stride; }
  // one image's V and M, and the transforms' scratch (the part each thread of a team has)
  Index transformed(const WinogradGeometry&) const { return 16 * (v_stride + m_stride); }
  Index transform_scratch(const WinogradGeometry& g) const { return planes(g) + 4 * stage_stride; }
  Index conv_image(const WinogradGeometry& g) const { return transformed(g) + transform_scratch(g); }
  // the weight gradient's per-thread V, D and accumulated M[16][O, C]
  Index weight_gradient(const WinogradGeometry& g) const {
    return whole_packets(16 * g.O * g.C, L) + 16 * (v_stride + m_stride) + planes(g);
  }
  // one of the 16 matrices of V, M or D at p: rows x P tiles, row_stride apart, for the products
  template <class T>
  StridedMatrixMap<T> matrix(T* p, Index rows, const WinogradGeometry& g) const {
    return {p, rows, g.tiles(), Eigen::OuterStride<>(row_stride)};
  }
  template <class T>
  ConstStridedMatrixMap<T> matrix(const T* p, Index rows, const WinogradGeometry& g) const {
    return {p, rows, g.tiles(), Eigen::OuterStride<>(row_stride)};
  }
};

// Input transform V = B^T d B of every tile of one image x: [C, H, W], into V[xi] rows
// (C x P, v_stride apart), each channel's padded plane laid out as TilePlanes first.
// scratch: WinogradScratch::planes elements. Channels [c0, c1) only when given (a team's share).
template <class T>
void winograd_input_transform(T* v, Index v_stride, const T* x, const WinogradGeometry& g, T* scratch,
                              Index c0 = 0, Index c1 = -1) {
  using P8 = simd::Packet<T>;
  const WinogradScratch s(g, simd::width<T>);
  const Index H = g.H, W = g.W, TW = g.TW, P = g.tiles(), L = s.L;
  if (c1 < 0) c1 = g.C;
  const detail::TilePlanes<T> planes(scratch, s.plane_stride);
  const auto& f = planes.f;
  std::fill(scratch, scratch + s.planes(g), T(0));  // padding rows and columns stay zero
  for (Index c = c0; c < c1; ++c) {
    detail::split_rows(planes, TW, x + c * H * W, W, g.pad, g.pad, H + g.pad, true, (g.C - c) * H * W);
    T* vc = v + c * s.row_stride;
    for (Index t = 0; t < P; t += L) {
      // B^T d on the tiles' columns j = 0 (ea), 2 (eb), 1 (oa), 3 (ob): rows 0 and 2 of D
      // from F[0][q][s], rows 1 and 3 from F[1][q][s], TW further for rows 2 and 3
      P8 ea[4], eb[4], oa[4], ob[4];
      auto vertical = [&](P8* out, const T* even_rows, const T* odd_rows) {
        const P8 d0 = simd::load(even_rows + t), d1 = simd::load(odd_rows + t), d2 = simd::load(even_rows + t + TW),
                 d3 = simd::load(odd_rows + t + TW);
        out[0] = simd::psub(d0, d2);
        out[1] = simd::padd(d1, d2);
        out[2] = simd::psub(d2, d1);
        out[3] = simd::psub(d1, d3);
      };
      vertical(ea, f[0][0][0], f[1][0][0]);
      vertical(eb, f[0][0][1], f[1][0][1]);
      vertical(oa, f[0][1][0], f[1][1][0]);
      vertical(ob, f[0][1][1], f[1][1][1]);
      // a packet past the channel's last tile stores its lanes up to it only: past it lies the
      // next channel, which another thread of a team may have written already
      const Index keep = std::min(L, P - t);
      auto put = [&](T* at, P8 value) { simd::store_lanes(at, value, 0, keep); };
      T* out = vc + t;
      for (int i = 0; i < 4; ++i) {  // then (B^T d) B along the row
        put(out + (i * 4 + 0) * v_stride, simd::psub(ea[i], eb[i]));
        put(out + (i * 4 + 1) * v_stride, simd::padd(oa[i], eb[i]));
        put(out + (i * 4 + 2) * v_stride, simd::psub(eb[i], oa[i]));
        put(out + (i * 4 + 3) * v_stride, simd::psub(oa[i], ob[i]));
      }
    }
  }
}

// Output transform y[O, HO, WO] = A^T M A (+ bias, + addend, then ReLU when relu) of M[xi] rows
// (O x P, m_stride apart), one output channel at a time as vectors over its tiles, staged and
// then interleaved into the output rows. The addend, when given, is [O, HO, WO] like y and is
// added to the rounded A^T M A + bias, as an add after the convolution would add it. stage:
// 4 * WinogradScratch::stage_stride elements. Output channels [o0, o1) only when given (a team's
// share).
//
// pool2x2 (an addend is then ignored): y is instead the 2x2, stride-2 max pool of that output,
// [O, HO / 2, WO / 2]. Each pooling window is one tile, so the pool takes the maximum of the
// tile's four outputs in row-major order (maxpool_plane's order) before anything is stored.
template <class T>
void winograd_output_transform(T* y, const T* m, Index m_stride, const T* bias, bool relu,
                               const WinogradGeometry& g, T* stage, Index o0 = 0, Index o1 = -1,
                               const T* addend = nullptr, bool pool2x2 = false) {
  using P8 = simd::Packet<T>;
  const WinogradScratch s(g, simd::width<T>);
  const Index HO = g.HO, WO = g.WO, TW = g.TW, P = g.tiles();
  if (o1 < 0) o1 = g.O;
  for (Index o = o0; o < o1; ++o) {
    const P8 b = simd::set1<T>(bias ? bias[o] : T(0));
    for (Index t = 0; t < P; t += s.L) {
      const T* mt = m + o * s.row_stride + t;
      P8 s0[4], s1[4];  // A^T M: rows 0 + 1 + 2 and 1 - 2 - 3
      for (int j = 0; j < 4; ++j) {
        const P8 m0 = simd::load(mt + j * m_stride), m1 = simd::load(mt + (4 + j) * m_stride);
        const P8 m2 = simd::load(mt + (8 + j) * m_stride), m3 = simd::load(mt + (12 + j) * m_stride);
        s0[j] = simd::padd(simd::padd(m0, m1), m2);
        s1[j] = simd::psub(simd::psub(m1, m2), m3);
      }
      const P8 out[4] = {simd::padd(simd::padd(simd::padd(s0[0], s0[1]), s0[2]), b),
                         simd::padd(simd::psub(simd::psub(s0[1], s0[2]), s0[3]), b),
                         simd::padd(simd::padd(simd::padd(s1[0], s1[1]), s1[2]), b),
                         simd::padd(simd::psub(simd::psub(s1[1], s1[2]), s1[3]), b)};
      const bool relu_now = relu && !addend;  // with an addend, the ReLU follows the add below
      if (pool2x2) {  // outputs (0, 0), (0, 1), (1, 0), (1, 1) of the tile: its window's order
        P8 best = relu_now ? simd::relu(out[0]) : out[0];
        for (int k = 1; k < 4; ++k) best = simd::pool_max(best, relu_now ? simd::relu(out[k]) : out[k]);
        simd::store(stage + t, best);
        continue;
      }
      for (int k = 0; k < 4; ++k)
        simd::store(stage + k * s.stage_stride + t, relu_now ? simd::relu(out[k]) : out[k]);
    }
    if (pool2x2) {  // the windows of whole tiles: a last odd row or column of outputs has none
      const Index PH = HO / 2, PW = WO / 2;
      for (Index ph = 0; ph < PH; ++ph)
        std::copy(stage + ph * TW, stage + ph * TW + PW, y + (o * PH + ph) * PW);
      continue;
    }
    T* yo = y + o * HO * WO;
    for (Index oh = 0; oh < HO; ++oh) {
      const T* left = stage + (oh % 2) * 2 * s.stage_stride + (oh / 2) * TW;
      const T* right = left + s.stage_stride;
      T* row = yo + oh * WO;
      for (Index tw = 0; tw < WO / 2; ++tw) {
        row[2 * tw] = left[tw];
        row[2 * tw + 1] = right[tw];
      }
      if (WO % 2) row[WO - 1] = left[WO / 2];
      if (addend) add_then_relu(row, addend + o * HO * WO + oh * WO, WO, relu);
    }
  }
}

// Per-thread scratch of winograd_conv_image, in elements of T.
template <class T>
Index winograd_image_workspace(const WinogradGeometry& g) {
  return WinogradScratch(g, simd::width<T>).conv_image(g);
}

// One image: y[O, HO, WO] = conv3x3(x[C, H, W]) + bias (+ addend, [O, HO, WO], if given), then
// ReLU when relu; with pool2x2, y is its 2x2, stride-2 max pool [O, HO / 2, WO / 2].
// u: [16, O, C] from one of the filter transforms; bias may be null;
// workspace: winograd_image_workspace<T>(g) elements.
template <class T>
void winograd_conv_image(T* y, const T* x, const T* u, const T* bias, const WinogradGeometry& g, T* workspace,
                         bool relu = false, const T* addend = nullptr, bool pool2x2 = false) {
  const WinogradScratch s(g, simd::width<T>);
  const Index C = g.C, O = g.O;
  T* v = workspace;
  T* m = v + 16 * s.v_stride;
  T* planes = m + 16 * s.m_stride;
  T* stage = planes + s.planes(g);
  winograd_input_transform(v, s.v_stride, x, g, planes);
  for (int xi = 0; xi < 16; ++xi) {  // M[xi] = U[xi] V[xi]
    ConstMatrixMap<T> uxi(u + xi * O * C, O, C);
    s.matrix(m + xi * s.m_stride, O, g).noalias() = uxi * s.matrix(v + xi * s.v_stride, C, g);
  }
  winograd_output_transform(y, m, s.m_stride, bias, relu, g, stage, 0, -1, addend, pool2x2);
}

// Scratch of winograd_conv_image_team for a team of `threads`, in elements of T.
template <class T>
Index winograd_team_workspace(const WinogradGeometry& g, Index threads) {
  const WinogradScratch s(g, simd::width<T>);
  return s.transformed(g) + threads * s.transform_scratch(g);
}

// winograd_conv_image computed by the calling team of threads together, for batches smaller
// than the team: input channels shared out for the input transform, the 16 products, then output
// channels for the output transform. Every thread of the team calls it (inside a parallel
// region); each output is computed as winograd_conv_image computes it, whatever the team's size.
// workspace: winograd_team_workspace<T>(g, team) elements.
template <class T>
void winograd_conv_image_team(T* y, const T* x, const T* u, const T* bias, const WinogradGeometry& g, T* workspace,
                              bool relu = false, const T* addend = nullptr, bool pool2x2 = false) {
  const WinogradScratch s(g, simd::width<T>);
  const Index C = g.C, O = g.O;
  const int t = bnrelu::detail::thread_index(), team = bnrelu::detail::team_size();
  T* v = workspace;
  T* m = v + 16 * s.v_stride;
  T* planes = v + s.transformed(g) + t * s.transform_scratch(g);
  T* stage = planes + s.planes(g);
  winograd_input_transform(v, s.v_stride, x, g, planes, C * t / team, C * (t + 1) / team);
#pragma omp barrier
#pragma omp for schedule(static)
  for (int xi = 0; xi < 16; ++xi) {
    ConstMatrixMap<T> uxi(u + xi * O * C, O, C);
    s.matrix(m + xi * s.m_stride, O, g).noalias() = uxi * s.matrix(v + xi * s.v_stride, C, g);
  }
  winograd_output_transform(y, m, s.m_stride, bias, relu, g, stage, O * t / team, O * (t + 1) / team, addend,
                            pool2x2);
  // the next image's input transform writes V only, which the products above have read: the
  // barrier after it keeps its products from writing M before this output transform has read it
}

// The weight gradient by Winograd F(3x3, 2x2), the transpose of F(2x2, 3x3): for a tile of
// dy, h (2x2), and the 4x4 input tile d under it, the tile's share of the 3x3 weight gradient
// is G^T [(A h A^T) ⊙ (B^T d B)] G, with the same B, G, A as above (the trilinear form
// sum y' . conv(g, d) is symmetric in y' and g). Summed over tiles and images per xi, that is
// M[xi] (O x C) += D[xi] (O x P) * V[xi]^T (P x C), with the forward's input transform V.

// Gradient transform D = A h A^T of every 2x2 tile of one image's dy: [O, HO, WO] into D[xi]
// rows (O x P, d_stride apart); outputs past HO or WO count as 0. scratch: planes elements.
//   A h (rows):  h0, h0 + h1, h0 - h1, -h1
template <class T>
void winograd_gradient_transform(T* d, Index d_stride, const T* dy, const WinogradGeometry& g, T* scratch) {
  using P8 = simd::Packet<T>;
  const WinogradScratch s(g, simd::width<T>);
  const Index O = g.O, HO = g.HO, WO = g.WO, TW = g.TW, P = g.tiles(), L = s.L;
  const detail::TilePlanes<T> planes(scratch, s.plane_stride);  // D = dy, padding 0
  const auto& f = planes.f;
  std::fill(scratch, scratch + s.planes(g), T(0));  // rows past HO, columns past WO stay zero
  const P8 zero = simd::set1<T>(T(0));
  for (Index o = 0; o < O; ++o) {
    detail::split_rows(planes, TW, dy + o * HO * WO, WO, 0, 0, HO, false, (O - o) * HO * WO);
    T* out = d + o * s.row_stride;
    for (Index t = 0; t < P; t += L) {
      // A h over the tiles' two rows (F[0] and F[1]), for their left (q = 0) and right columns
      const P8 el0 = simd::load(f[0][0][0] + t), el1 = simd::load(f[1][0][0] + t);
      const P8 or0 = simd::load(f[0][1][0] + t), or1 = simd::load(f[1][1][0] + t);
      const P8 left[4] = {el0, simd::padd(el0, el1), simd::psub(el0, el1), simd::psub(zero, el1)};
      const P8 right[4] = {or0, simd::padd(or0, or1), simd::psub(or0, or1), simd::psub(zero, or1)};
      const Index keep = std::min(L, P - t);  // lanes of this channel's tiles
      auto put = [&](T* at, P8 value) { simd::store_lanes(at, value, 0, keep); };
      for (int i = 0; i < 4; ++i) {  // then (A h) A^T along the row
        put(out + t + (i * 4 + 0) * d_stride, left[i]);
        put(out + t + (i * 4 + 1) * d_stride, simd::padd(left[i], right[i]));
        put(out + t + (i * 4 + 2) * d_stride, simd::psub(left[i], right[i]));
        put(out + t + (i * 4 + 3) * d_stride, simd::psub(zero, right[i]));
      }
    }
  }
}

// dweight[O, C, 3, 3] += G^T M[xi] G for M: [16, O, C] summed over tiles and images.
//   G^T = | 1  1/2  1/2  0 |
//         | 0  1/2 -1/2  0 |
//         | 0  1/2  1/2  1 |
template <class T>
void winograd_weight_gradient_add(T* dweight, const T* m, Index O, Index C) {
  const Index plane = O * C;
  for (Index oc = 0; oc < plane; ++oc) {
    T q[3][4];  // G^T M
    for (int j = 0; j < 4; ++j) {
      const T m0 = m[(0 * 4 + j) * plane + oc], m1 = m[(1 * 4 + j) * plane + oc];
      const T m2 = m[(2 * 4 + j) * plane + oc], m3 = m[(3 * 4 + j) * plane + oc];
      q[0][j] = m0 + T(0.5) * (m1 + m2);
      q[1][j] = T(0.5) * (m1 - m2);
      q[2][j] = T(0.5) * (m1 + m2) + m3;
    }
    T* dw = dweight + oc * 9;
    for (int i = 0; i < 3; ++i) {  // (G^T M) G
      dw[i * 3 + 0] += q[i][0] + T(0.5) * (q[i][1] + q[i][2]);
      dw[i * 3 + 1] += T(0.5) * (q[i][1] - q[i][2]);
      dw[i * 3 + 2] += T(0.5) * (q[i][1] + q[i][2]) + q[i][3];
    }
  }
}

// Per-thread scratch of winograd_weight_gradient_image, in elements of T.
template <class T>
Index winograd_weight_gradient_workspace(const WinogradGeometry& g) {
  return WinogradScratch(g, simd::width<T>).weight_gradient(g);
}

// One image's share of the weight gradient in the transformed domain: M[xi] (the first
// 16 * O * C elements of workspace, zeroed by the caller before the first image) += D[xi] V[xi]^T
// for x: [C, H, W] and dy: [O, HO, WO]. g is the forward's geometry.
template <class T>
void winograd_weight_gradient_image(T* workspace, const T* x, const T* dy, const WinogradGeometry& g) {
  const WinogradScratch s(g, simd::width<T>);
  const Index C = g.C, O = g.O;
  T* m = workspace;
  T* v = m + whole_packets(16 * O * C, s.L);
  T* d = v + 16 * s.v_stride;
  T* planes = d + 16 * s.m_stride;
  winograd_input_transform(v, s.v_stride, x, g, planes);
  winograd_gradient_transform(d, s.m_stride, dy, g, planes);
  for (int xi = 0; xi < 16; ++xi) {
    const T* dxi = d + xi * s.m_stride;
    const T* vxi = v + xi * s.v_stride;
    MatrixMap<T>(m + xi * O * C, O, C).noalias() += s.matrix(dxi, O, g) * s.matrix(vxi, C, g).transpose();
  }
}

}  // namespace bnrelu::kernels
