// Batch-normalisation arithmetic, optionally fused with ReLU, as free functions.
//
// Every kernel sees its activation as x: [N, C, S] (S = H*W for 4-D input, S = 1 for N x C),
// so channel c is N chunks of S contiguous values. Statistics are kept in double.
//
// The fused training kernels work one channel at a time: its N*S values (200 KiB for
// 64x64x28x28) are read from memory once and stay in cache for the following passes, and
// a pass whose tensors together are too big to leave its output cached for the next layer
// writes that output around the caches (tuning.hpp, stream_threshold). The backward recomputes
// the ReLU mask from x with the forward's own arithmetic (one rounding, fused multiply-add,
// in vector and scalar paths alike), so nothing but x is kept between the two (and, after a
// shortcut's add, the mask; see below).
//
// The training kernels also serve a residual block's last batch norm, add and ReLU as one
// pass (Addend): forward y = relu(f(x) + s) reads x and the shortcut s and writes y and the
// ReLU's mask, one bit per value (1/32 of x in float); backward's first pass reads the mask
// with x and dy and writes the masked gradient, which is the shortcut's gradient ds, while
// summing it; its second pass reads ds (from cache) and x and writes the batch norm's dx. Where
// ds is not wanted as a tensor (an identity shortcut's, only added to the block's input
// gradient), neither pass writes it: both read dy through the mask. Each
// value is rounded as the unfused chain rounds it (f(x) to T, then the add), so both give the
// same bits.
#pragma once

#include <algorithm>
#include <bit>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../tensor.hpp"
#include "../threads.hpp"
#include "activation.hpp"
#include "reduce.hpp"
#include "simd.hpp"
#include "tuning.hpp"

namespace bnrelu::kernels {

// The affine map of the normalisation: y = x * scale + shift, rounded exactly as the packet
// path's pmadd rounds it (fused where the target has FMA), so every element gets the same
// value however a loop splits into packets and tail: backward recomputes the ReLU mask
// from x and must see exactly what forward saw.
template <class T>
inline T bn_affine(T x, T scale, T shift) {
#if defined(__FMA__) || defined(__AVX512F__)
  return std::fma(x, scale, shift);
#else
  return x * scale + shift;
#endif
}

// The views the kernels take.

// An activation x: [N, C, S] (S = H*W for 4-D input, 1 for N x C): channel c of image n is the
// S contiguous values at at(n, c), and one image's channel is image() values from the next's.
struct BatchShape {
  Index N = 0, C = 0, S = 0;
  Index at(Index n, Index c) const { return (n * C + c) * S; }
  Index image() const { return C * S; }
  Index size() const { return N * C * S; }
  // values per channel: the count the statistics are over
  double count() const { return static_cast<double>(N * S); }
};

// Channels [first, last) of C; last < 0 stands for C.
struct ChannelRange {
  Index first = 0, last = -1;
  ChannelRange resolved(Index C) const { return {first, last < 0 ? C : last}; }
};

// gamma and beta, [C] each, or null (a layer with affine = false).
template <class T>
struct AffineParams {
  const T* weight = nullptr;
  const T* bias = nullptr;
};

// Their gradients, [C] each, added to, or null.
template <class T>
struct AffineGrads {
  T* weight = nullptr;
  T* bias = nullptr;
};

// A training forward's per-channel results, [C] each in double: the batch mean, the biased
// variance and invstd = 1 / sqrt(var + eps).
struct BatchStats {
  double* mean = nullptr;
  double* var = nullptr;
  double* invstd = nullptr;
};

// What the backward needs to recompute a forward's normalisation: that forward's mean and
// invstd ([C], double) and the affine parameters.
template <class T>
struct Normalisation {
  const double* mean = nullptr;
  const double* invstd = nullptr;
  AffineParams<T> params{};
};

// A residual block's shortcut, added before the ReLU: s is read by forward, ds (backward)
// receives the ReLU-masked gradient, which is the shortcut's; ds may be s or dy itself (each
// element is read before it is written). Both [N, C, S] like x; null s means no add. mask, if given
// (S > 1; mask_words), receives the ReLU's mask from a training forward, one bit per value,
// and the backward reads it instead of recomputing the mask from x and s (which it does
// without one, and always for S = 1). With a mask, ds may be null: the backward then writes no
// shortcut gradient, and the caller adds it where it is needed (add_shortcut_grad).
template <class T>
struct Addend {
  const T* s = nullptr;
  T* ds = nullptr;
  std::uint64_t* mask = nullptr;
};

// 64-bit words of an Addend's mask per chunk of S values: chunk (n, c) takes words
// [(n * C + c) * W, + W), W = mask_words(S), value i of the chunk bit i % 64 of word i / 64.
inline Index mask_words(Index S) { return (S + 63) / 64; }

namespace detail {

// The bits of values i .. i + width<T> - 1 of a chunk whose mask words are at mc (bit 0 of
// the result for value i), for i + width<T> <= the chunk's length: a packet starting at any i,
// including one that straddles two words.
template <class T>
inline std::uint32_t chunk_bits(const std::uint64_t* mc, Index i) {
  const Index w = i / 64, b = i % 64;
  std::uint64_t v = mc[w] >> b;
  if (b + simd::width<T> > 64) v |= mc[w + 1] << (64 - b);  // b > 0 here, and word w + 1 exists
  return static_cast<std::uint32_t>(v);
}

// The masked gradient of value i of such a chunk: dy where its bit is set, else +0.
template <class T>
inline T chunk_grad(const std::uint64_t* mc, Index i, T dy) {
  return relu_grad(static_cast<T>((mc[i / 64] >> (i % 64)) & 1), dy);
}

// The same for the packet of values i .. i + width<T> - 1, dy's at dyc + i.
template <class T>
inline simd::Packet<T> chunk_grad_packet(const std::uint64_t* mc, Index i, const T* dyc) {
  return simd::select_bits(chunk_bits<T>(mc, i), simd::load(dyc + i));
}

}  // namespace detail

// What follows the normalisation: a ReLU, and an addend before it (which needs the ReLU).
template <class T>
struct Epilogue {
  bool relu = false;
  Addend<T> add{};
};

// The backward's per-channel sums over count values: sum(g) and sum(g * (x - mean)), g the
// gradient after the epilogue's mask.
struct GradSums {
  const double* sum = nullptr;
  const double* dot = nullptr;
  double count = 0;
};

// The normalisation of one channel as y = (x - centre) * scale + shift, with
//   centre = mean rounded to T,  scale = weight * invstd,  shift = bias - (mean - centre) * scale.
// Centring first keeps the output accurate when |mean| >> std (data like 1e6 + noise in
// float): x - centre is exact for x near the mean, and shift stays of the order of bias,
// whereas the uncentred x * scale + (bias - mean * scale) rounds a shift of size mean/std.
// Forward, eval and backward (which recomputes the ReLU mask from x) all evaluate it through
// apply(), one subtraction and one multiply-add in the packet and the scalar path alike.
template <class T>
struct ChannelAffine {
  T centre{}, scale{}, shift{};
  ChannelAffine() = default;
  ChannelAffine(double mean, double invstd, AffineParams<T> p, Index c) : centre(static_cast<T>(mean)) {
    const double s = (p.weight ? static_cast<double>(p.weight[c]) : 1.0) * invstd;
    scale = static_cast<T>(s);
    shift = static_cast<T>((p.bias ? static_cast<double>(p.bias[c]) : 0.0) - (mean - static_cast<double>(centre)) * s);
  }
  ChannelAffine(const Normalisation<T>& norm, Index c) : ChannelAffine(norm.mean[c], norm.invstd[c], norm.params, c) {}
  T operator()(T x) const { return bn_affine(x - centre, scale, shift); }
  simd::Packet<T> operator()(const simd::Packet<T>& x) const {
    return simd::pmadd(simd::psub(x, simd::set1(centre)), simd::set1(scale), simd::set1(shift));
  }
};

// The per-channel maps of a layer, C of each, as separate arrays so that loops over channels
// (the S = 1 kernels) vectorise.
template <class T>
struct ChannelAffines {
  std::vector<T> centre, scale, shift;
  void resize(Index C) {
    centre.resize(static_cast<std::size_t>(C));
    scale.resize(static_cast<std::size_t>(C));
    shift.resize(static_cast<std::size_t>(C));
  }
  void set(Index c, const ChannelAffine<T>& f) {
    const auto i = static_cast<std::size_t>(c);
    centre[i] = f.centre;
    scale[i] = f.scale;
    shift[i] = f.shift;
  }
  ChannelAffine<T> operator[](Index c) const {
    const auto i = static_cast<std::size_t>(c);
    ChannelAffine<T> f;
    f.centre = centre[i];
    f.scale = scale[i];
    f.shift = shift[i];
    return f;
  }
};

// The mean split as hi + lo in T: (x - hi) - lo is x - mean to nearly double accuracy even
// when |mean| >> std (data like 1e4 + noise in float): x - hi is exact for x near hi.
template <class T>
struct SplitMean {
  T hi{}, lo{};
  SplitMean() = default;
  explicit SplitMean(double m) : hi(static_cast<T>(m)), lo(static_cast<T>(m - static_cast<double>(hi))) {}
};

// What backward needs of one channel to turn dy into the ReLU-masked gradient g and x into
// x - mean, in both the packet and the scalar (tail) path: x - mean = (x - f.centre) - lo, the
// mean split as in SplitMean with the affine map's centre for its high part.
template <class T>
struct ChannelGrad {
  ChannelAffine<T> f;
  T lo{};
  bool relu = false;
  ChannelGrad() = default;
  ChannelGrad(const Normalisation<T>& norm, Index c, bool relu_)
      : f(norm, c), lo(static_cast<T>(norm.mean[c] - static_cast<double>(f.centre))), relu(relu_) {}
  simd::Packet<T> grad(const simd::Packet<T>& x, const simd::Packet<T>& dy) const {
    return relu ? simd::relu_grad(f(x), dy) : dy;
  }
  T grad(T x, T dy) const { return relu ? relu_grad(f(x), dy) : dy; }
  // g of a forward that added s before its ReLU: y = relu(f(x) + s).
  simd::Packet<T> grad(const simd::Packet<T>& x, const simd::Packet<T>& dy, const simd::Packet<T>& s) const {
    return simd::relu_grad(simd::padd(f(x), s), dy);
  }
  T grad(T x, T dy, T s) const { return relu_grad(f(x) + s, dy); }
};

namespace detail {

// How many images ahead the statistics pass (one stream) asks for (bench_batchnorm_relu
// measures the choice; docs/performance.md). The backward's first pass: see backward_walk.
inline constexpr Index kAheadStatistics = 2;

// Whether a pass that reads and writes `tensors` tensors of `elements` values each (its inputs
// and outputs together) writes its outputs around the caches (stream_threshold()).
template <class T>
bool stream_output(Index elements, Index tensors) {
  return tensors * elements * static_cast<Index>(sizeof(T)) > stream_threshold();
}

// Channels per task in the S > 1 kernels. Adjacent channels of one image are contiguous, so
// a block of G channels is read as N runs of G*S values. The block's slice (G*N*S values) is
// kept within half of a core's L2, so that the passes after the first find it cached; for small
// maps a few channels per block lengthen the runs to about 4 KiB for the prefetchers. When one
// channel's slice alone exceeds long_runs_above (the forward: long_run_bytes(), half of L2; the
// backward, whose reverse second pass also finds data in L3: backward_long_run_bytes()), the
// blocks take as many channels as the spread over the threads allows, since memory delivers
// long runs faster than short ones: at 256x64x56x56, float, one thread, caches flushed, the
// statistics pass reads x in runs of 12.5 KiB at 13 GB/s with one channel per block and at
// 22-25 GB/s with 16-64 (docs/performance.md). Every channel is summed in the same order
// whatever G is, so results depend neither on the block size nor on the thread count.
inline constexpr Index kMaxBlock = 64;

inline Index channel_block(Index N, Index C, Index S, Index elem_size, int threads, Index long_runs_above) {
  const Index spread = std::max<Index>(1, C / (2 * threads));  // two blocks per thread at least
  const Index slice = N * S * elem_size;                       // one channel's (N may be 0)
  if (slice > long_runs_above) return std::min(spread, kMaxBlock);
  const Index run = std::max<Index>(1, (4 << 10) / std::max<Index>(1, S * elem_size));
  const Index fit = std::max<Index>(1, l2_bytes() / 2 / std::max<Index>(1, slice));
  return std::clamp<Index>(std::min({run, fit, spread}), 1, kMaxBlock);
}

// How the backward walks a block of G channels. Its pass 1 reads the block's x and dy (and, with
// a shortcut, s or writes ds apart from dy: `streams` tensors, streams * G * N * S values) from
// memory and pass 2 reads them again. When they fit in L2, pass 1
// asks two images ahead, and pass 2 walks forward. When they do not (more than
// backward_spill_bytes(), a core's L2), pass 1 asks one image ahead and pass 2 walks the
// images in reverse: the last ones pass 1 read are still in L2 and the rest come from L3,
// where walking forward under LRU would find every line evicted just before it is wanted.
// The order changes neither sums nor results. Pass 2 writes dx around the caches (stream) when
// the `tensors` the backward reads and writes are too big for them: x, dy and dx, with a
// shortcut also ds if written, and s unless a mask replaces it.
struct BackwardWalk {
  Index ahead = 2;
  bool reverse = false;
  bool stream = false;
};

template <class T>
BackwardWalk backward_walk(const BatchShape& sh, Index G, Index streams, Index tensors) {
  BackwardWalk walk;
  if (streams * G * sh.N * sh.S * static_cast<Index>(sizeof(T)) > backward_spill_bytes()) walk = {1, true};
  walk.stream = stream_output<T>(sh.size(), tensors);
  return walk;
}

// Mean and M2 (sum of squared deviations) of one channel, fed one chunk of S values at a time,
// each read from memory once; chunks combine in double with Chan et al.'s pairwise update.
//
// A chunk takes one pass: the sums of d and d^2 in T for d = x - shift, shift = the first
// chunk's mean rounded to T (x - shift is exact near it), giving the chunk's
// M2 = sum(d^2) - sum(d)^2 / S. That difference loses about eps * S * dm^2 of M2, dm = the
// chunk's mean - shift: nothing while the chunk's mean lies within a few of its standard
// deviations of the first chunk's. A chunk further off (data that drifts from image to image,
// or is constant within one), and the first chunk itself, takes two passes from L1 instead:
// its own mean (summing x - x0, x0 its first value, so partial sums stay small even for data
// like 1e4 + noise), then its squared deviations from that mean (no cancellation). One pass is
// half the arithmetic and keeps no chunk waiting on the one before.
template <class T>
struct ChunkMoments {
  double mean = 0, m2 = 0, count = 0;
  T shift{};

  // the single pass's M2 is kept while S * dm^2 <= kDrift * M2, i.e. to about (1 + kDrift) eps
  static constexpr double kDrift = 16;

  void add(const T* xc, Index S, const Ahead<T>& ahead = {}) {
    const double s_count = static_cast<double>(S);
    double chunk_mean = 0, chunk_m2 = 0;
    bool exact = count == 0;
    if (!exact) {
      const T hi = shift;
      const auto phi = simd::set1(hi);
      const auto [sd, sd2] = reduce2<T>(
          S, [=](Index i, simd::Packet<T>& d, simd::Packet<T>& d_too) { d = d_too = simd::psub(simd::load(xc + i), phi); },
          [=](Index i, T& d, T& d_too) { d = d_too = xc[i] - hi; }, ahead);
      const double dm = sd / s_count;
      chunk_mean = static_cast<double>(hi) + dm;
      chunk_m2 = sd2 - sd * dm;
      exact = !(s_count * dm * dm <= kDrift * chunk_m2);  // also when the difference came out <= 0
    }
    if (exact) two_pass(xc, S, count == 0 ? ahead : Ahead<T>{}, chunk_mean, chunk_m2);
    const double total = count + s_count, delta = chunk_mean - mean;
    mean += delta * s_count / total;
    m2 += chunk_m2 + delta * delta * count * s_count / total;
    count = total;
    if (count == s_count) shift = static_cast<T>(mean);
  }

  static void two_pass(const T* xc, Index S, const Ahead<T>& ahead, double& chunk_mean, double& chunk_m2) {
    const double s_count = static_cast<double>(S);
    const T o = xc[0];
    const auto po = simd::set1(o);
    chunk_mean = static_cast<double>(o) + reduce<T>(
                                              S, [=](Index i) { return simd::psub(simd::load(xc + i), po); },
                                              [=](Index i) { return xc[i] - o; }, ahead) /
                                              s_count;
    // sum((x - hi)^2) = m2 + S * (mean - hi)^2 exactly, hi = the chunk mean rounded to T and
    // lo = mean - hi: S * lo^2 is far below m2's rounding.
    const SplitMean<T> cm(chunk_mean);
    const auto phi = simd::set1(cm.hi);
    chunk_m2 = reduce_squares<T>(S, [=](Index i) { return simd::psub(simd::load(xc + i), phi); },
                                 [=](Index i) { return xc[i] - cm.hi; }) -
               s_count * static_cast<double>(cm.lo) * static_cast<double>(cm.lo);
  }
};

// Mean and biased variance of channels r of x, channel c's at mean[c - r.first] and
// var[c - r.first], reading x once. If x_copy is given, each chunk is copied there as it is read.
template <class T>
void block_mean_var(double* mean, double* var, const T* x, T* x_copy, const BatchShape& sh, ChannelRange r) {
  const Index N = sh.N, S = sh.S, c0 = r.first, c1 = r.last;
  ChunkMoments<T> m[kMaxBlock];
  for (Index n = 0; n < N; ++n)
    for (Index c = c0; c < c1; ++c) {
      const Index at = sh.at(n, c);
      const Ahead<T> ahead{n + kAheadStatistics < N ? x + at + kAheadStatistics * sh.image() : nullptr};
      if (x_copy) std::memcpy(x_copy + at, x + at, S * sizeof(T));
      m[c - c0].add(x + at, S, ahead);
    }
  for (Index c = c0; c < c1; ++c) {
    mean[c - c0] = m[c - c0].mean;
    var[c - c0] = m[c - c0].m2 / m[c - c0].count;
    // An infinite value turns the shifted sums into inf - inf = NaN; the plain sum gives the
    // mean PyTorch gives (+-inf, or NaN for both signs), and the variance is then NaN.
    if (!std::isfinite(mean[c - c0])) {
      double total = 0;
      for (Index n = 0; n < N; ++n)
        for (Index i = 0; i < S; ++i) total += static_cast<double>(x[sh.at(n, c) + i]);
      mean[c - c0] = total / m[c - c0].count;
      var[c - c0] = std::numeric_limits<double>::quiet_NaN();
    }
  }
}

// y = [relu](f(x)) over n contiguous values; y = relu(f(x) + s) when s is given.
template <class T>
void affine(T* y, const T* x, Index n, const ChannelAffine<T>& f, bool relu, bool stream = false,
            const Ahead<T>& ahead = {}, const T* s = nullptr) {
  if (s)
    write_each(
        y, n, stream, [&](Index i) { return simd::relu(simd::padd(f(simd::load(x + i)), simd::load(s + i))); },
        [&](Index i) { return relu_value(f(x[i]) + s[i]); }, ahead);
  else if (relu)
    write_each(
        y, n, stream, [&](Index i) { return simd::relu(f(simd::load(x + i))); },
        [&](Index i) { return relu_value(f(x[i])); }, ahead);
  else
    write_each(
        y, n, stream, [&](Index i) { return f(simd::load(x + i)); }, [&](Index i) { return f(x[i]); }, ahead);
}

// y = relu(f(x) + s) over a chunk of n values, as affine() writes it, and the chunk's ReLU mask
// (mask_words(n) words at m): bit i % 64 of word i / 64 set where !(f(x[i]) + s[i] <= 0), taken
// from the sums the ReLU was applied to, in the same loop (affine()'s write_each). After a
// streaming store's scalar head the packets start at any offset, so a packet's bits may
// straddle two words.
template <class T>
void affine_add_mask(T* y, std::uint64_t* m, const T* x, const T* s, Index n, const ChannelAffine<T>& f,
                     bool stream, const Ahead<T>& ahead) {
  std::uint64_t word = 0;  // word w's bits gathered so far
  Index w = 0;
  // the bits of values i .. i + count - 1; write_each gives the values in order of i
  auto gather = [&](std::uint64_t bits, Index i, Index count) {
    const Index at = i % 64;
    word |= bits << at;
    if (at + count < 64) return;
    m[w++] = word;
    word = at + count > 64 ? bits >> (64 - at) : 0;  // at > 0 here
  };
  write_each(
      y, n, stream,
      [&](Index i) {
        const auto v = simd::padd(f(simd::load(x + i)), simd::load(s + i));
        gather(simd::positive_bits(v), i, simd::width<T>);
        return simd::relu(v);
      },
      [&](Index i) {
        const T v = f(x[i]) + s[i];
        gather(std::uint64_t{!(v <= T(0))}, i, 1);
        return relu_value(v);
      },
      ahead);
  if (w < mask_words(n)) m[w] = word;
}

// Pass 1 of the backward for channels r: sum[c - r.first] += sum(g), dot[c - r.first] +=
// sum(g * (x - mean)), reading x and dy once. sum(g * (x - mean)) is computed as
// sum(g * (x - hi)) - lo * sum(g): x - hi is exact near hi.
template <class T>
void backward_sums(double* sum, double* dot, const T* dy, const T* x, const BatchShape& sh,
                   const Normalisation<T>& norm, ChannelRange r, const Epilogue<T>& e, BackwardWalk walk) {
  const Index N = sh.N, S = sh.S, c0 = r.first, c1 = r.last;
  const Addend<T> add = e.add;
  const T* s = add.s;
  const Index far = walk.ahead * sh.image();
  for (Index n = 0; n < N; ++n)
    for (Index c = c0; c < c1; ++c) {
      const Index at = sh.at(n, c);
      const T* xc = x + at;
      const T* dyc = dy + at;
      const T* sa = s && !add.mask ? s + at + far : nullptr;
      const Ahead<T> ahead = n + walk.ahead < N ? Ahead<T>{xc + far, dyc + far, nullptr, sa} : Ahead<T>{};
      const ChannelGrad<T> ch(norm, c, e.relu);
      const auto phi = simd::set1(ch.f.centre);
      // the sums of g = pg(i, x) (packets) or sg(i) (the tail); with a shortcut (Store), g is
      // also stored as its gradient, which pass 2 reads back from cache
      auto accumulate = [&]<bool Store>(std::bool_constant<Store>, auto pg, auto sg) {
        T* dsc = Store ? add.ds + at : nullptr;
        const auto part = reduce2<T>(
            S,
            [&](Index i, simd::Packet<T>& g, simd::Packet<T>& d) {
              const auto xv = simd::load(xc + i);
              g = pg(i, xv);
              if constexpr (Store) simd::store(dsc + i, g);
              d = simd::psub(xv, phi);
            },
            [&](Index i, T& g, T& d) {
              g = sg(i);
              if constexpr (Store) dsc[i] = g;
              d = xc[i] - ch.f.centre;
            },
            ahead);
        sum[c - c0] += part.first;
        dot[c - c0] += part.second - static_cast<double>(ch.lo) * part.first;
      };
      if (add.mask) {  // the forward's mask; ds may be left unwritten
        const std::uint64_t* mc = add.mask + (n * sh.C + c) * mask_words(S);
        auto pg = [&](Index i, const simd::Packet<T>&) { return chunk_grad_packet(mc, i, dyc); };
        auto sg = [&](Index i) { return chunk_grad(mc, i, dyc[i]); };
        if (add.ds)
          accumulate(std::true_type{}, pg, sg);
        else
          accumulate(std::false_type{}, pg, sg);
      } else if (s) {  // the mask recomputed from x and s
        const T* sc = s + at;
        accumulate(
            std::true_type{},
            [&](Index i, const simd::Packet<T>& xv) { return ch.grad(xv, simd::load(dyc + i), simd::load(sc + i)); },
            [&](Index i) { return ch.grad(xc[i], dyc[i], sc[i]); });
      } else {
        accumulate(
            std::false_type{}, [&](Index i, const simd::Packet<T>& xv) { return ch.grad(xv, simd::load(dyc + i)); },
            [&](Index i) { return ch.grad(xc[i], dyc[i]); });
      }
    }
}

// Pass 2 of the backward for one channel, from its sums over M values:
// dx = weight * invstd * (g - sum/M - (x - mean) * invstd^2 * dot/M), computed as
// g * gs + ((x - hi) * a + b) with gs = weight * invstd, a = -k * gs and
// b = (lo * k - sum/M) * gs (x - mean = (x - hi) - lo, k = invstd^2 * dot/M).
template <class T>
struct ChannelDx {
  ChannelGrad<T> ch;
  T gs{}, a{}, b{};
  ChannelDx() = default;
  ChannelDx(double sum, double dot, double M, const Normalisation<T>& norm, Index c, bool relu)
      : ch(norm, c, relu) {
    const double is = norm.invstd[c];
    const double k = dot * is * is / M;
    const double gs_d = is * (norm.params.weight ? static_cast<double>(norm.params.weight[c]) : 1.0);
    gs = static_cast<T>(gs_d);
    a = static_cast<T>(-k * gs_d);
    b = static_cast<T>((static_cast<double>(ch.lo) * k - sum / M) * gs_d);
  }
  // dx of one chunk of S values, g = grad(i, x) (a packet from value i) or grad(i) (value i).
  template <class PG, class SG>
  void apply(T* dxc, const T* xc, Index S, bool stream, const Ahead<T>& ahead, PG grad, SG scalar_grad) const {
    const auto pg = simd::set1(gs), pa = simd::set1(a), pb = simd::set1(b), phi = simd::set1(ch.f.centre);
    write_each(
        dxc, S, stream,
        [&](Index i) {
          const auto xv = simd::load(xc + i);
          return simd::pmadd(grad(i, xv), pg, simd::pmadd(simd::psub(xv, phi), pa, pb));
        },
        // the packet path's two multiply-adds, rounded alike (the head before an aligned
        // streaming store takes this path for elements the ordinary loop does in packets)
        [&](Index i) { return bn_affine(scalar_grad(i), gs, bn_affine(xc[i] - ch.f.centre, a, b)); }, ahead);
  }
};

// Pass 2 for channels r, from their sums (channel c's at index c - r.first), walking the images
// as walk says. Each chunk asks for the same channel's chunk of the image worked on next. g is
// dy through mask (an Addend's) if given, else dy through the ReLU's mask recomputed from x if
// relu, else dy.
template <class T>
void backward_dx(T* dx, const GradSums& sums, const T* dy, const T* x, const BatchShape& sh,
                 const Normalisation<T>& norm, ChannelRange r, bool relu, BackwardWalk walk,
                 const std::uint64_t* mask = nullptr) {
  const Index N = sh.N, S = sh.S, c0 = r.first, c1 = r.last;
  ChannelDx<T> cd[kMaxBlock];
  for (Index c = c0; c < c1; ++c)
    cd[c - c0] = ChannelDx<T>(sums.sum[c - c0], sums.dot[c - c0], sums.count, norm, c, relu);
  const Index step = (walk.reverse ? -1 : 1) * sh.image();
  for (Index j = 0; j < N; ++j) {
    const Index n = walk.reverse ? N - 1 - j : j;
    for (Index c = c0; c < c1; ++c) {
      const Index at = sh.at(n, c), next = at + step;
      Ahead<T> ahead;
      if (j + 1 < N) ahead = {x + next, dy + next, walk.stream ? nullptr : dx + next};
      const ChannelDx<T>& d = cd[c - c0];
      const T* dyc = dy + at;
      if (mask) {
        const std::uint64_t* mc = mask + (n * sh.C + c) * mask_words(S);
        d.apply(
            dx + at, x + at, S, walk.stream, ahead,
            [&](Index i, const simd::Packet<T>&) { return chunk_grad_packet(mc, i, dyc); },
            [&](Index i) { return chunk_grad(mc, i, dyc[i]); });
      } else {
        d.apply(
            dx + at, x + at, S, walk.stream, ahead,
            [&](Index i, const simd::Packet<T>& xv) { return d.ch.grad(xv, simd::load(dyc + i)); },
            [&](Index i) { return d.ch.grad(x[at + i], dyc[i]); });
      }
    }
  }
}

}  // namespace detail

// Training forward: batch statistics, then y = [relu](gamma * (x - mean) * invstd + beta),
// computed per channel while the channel's slice is in cache (x read from memory once).
// stats receives mean, var (biased) and invstd per channel. If x_copy is given, x is copied
// there first and every pass reads the copy (the layer keeps it for backward). With an addend
// (e.add.s, [N, C, S]; e.relu set), y = relu(gamma * (x - mean) * invstd + beta + s), and the
// ReLU's mask goes to e.add.mask if given (S > 1 only).
template <class T>
void batchnorm_forward_train(T* y, T* x_copy, const BatchStats& stats, const T* x, const BatchShape& sh,
                             AffineParams<T> p, double eps, const Epilogue<T>& e = {}) {
  const T* addend = e.add.s;
  const bool relu = e.relu;
  assert(!addend || relu);
  assert(!e.add.mask || addend);
  assert(sh.N * sh.S > 0);
  const Index N = sh.N, C = sh.C;
  const double M = sh.count();
  if (sh.S == 1) {
    // N x C: vectorise across channels, walk rows; each thread owns a block of channels.
    constexpr Index kBlock = 64;
    const Index nblocks = (C + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) num_threads(bnrelu::num_threads())
    for (Index b = 0; b < nblocks; ++b) {
      const Index c0 = b * kBlock, c1 = std::min(C, c0 + kBlock), w = c1 - c0;
      double acc[kBlock] = {}, m2[kBlock] = {};
      T centre[kBlock], scale[kBlock], shift[kBlock];
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
        stats.mean[c] = acc[j];
        stats.var[c] = m2[j] / M;
        stats.invstd[c] = 1.0 / std::sqrt(stats.var[c] + eps);
        const ChannelAffine<T> f(stats.mean[c], stats.invstd[c], p, c);
        centre[j] = f.centre;
        scale[j] = f.scale;
        shift[j] = f.shift;
      }
      for (Index n = 0; n < N; ++n) {
        const T* xr = src + n * C + c0;
        T* yr = y + n * C + c0;
        if (addend) {
          const T* sr = addend + n * C + c0;
#pragma omp simd
          for (Index j = 0; j < w; ++j) yr[j] = relu_value(bn_affine(xr[j] - centre[j], scale[j], shift[j]) + sr[j]);
        } else if (relu) {
#pragma omp simd
          for (Index j = 0; j < w; ++j) yr[j] = relu_value(bn_affine(xr[j] - centre[j], scale[j], shift[j]));
        } else {
#pragma omp simd
          for (Index j = 0; j < w; ++j) yr[j] = bn_affine(xr[j] - centre[j], scale[j], shift[j]);
        }
      }
    }
    return;
  }
  const Index G = detail::channel_block(N, C, sh.S, sizeof(T), num_threads(), detail::long_run_bytes());
  const Index nblocks = (C + G - 1) / G;
  // x (and s) in, y (and x's copy) out
  const bool stream = detail::stream_output<T>(sh.size(), (addend ? 3 : 2) + (x_copy ? 1 : 0));
#pragma omp parallel num_threads(bnrelu::num_threads())
  {
#pragma omp for schedule(static)
    for (Index blk = 0; blk < nblocks; ++blk) {
      const Index c0 = blk * G, c1 = std::min(C, c0 + G);
      detail::block_mean_var(stats.mean + c0, stats.var + c0, x, x_copy, sh, {c0, c1});
      const T* src = x_copy ? x_copy : x;
      ChannelAffine<T> f[detail::kMaxBlock];
      for (Index c = c0; c < c1; ++c) {
        stats.invstd[c] = 1.0 / std::sqrt(stats.var[c] + eps);
        f[c - c0] = ChannelAffine<T>(stats.mean[c], stats.invstd[c], p, c);
      }
      for (Index n = 0; n < N; ++n)
        for (Index c = c0; c < c1; ++c) {
          const Index at = sh.at(n, c), next = at + sh.image();
          detail::Ahead<T> ahead;
          if (n + 1 < N) ahead = {src + next, addend ? addend + next : nullptr, stream ? nullptr : y + next};
          if (e.add.mask)
            detail::affine_add_mask(y + at, e.add.mask + (n * C + c) * mask_words(sh.S), src + at, addend + at, sh.S,
                                    f[c - c0], stream, ahead);
          else
            detail::affine(y + at, src + at, sh.S, f[c - c0], relu, stream, ahead, addend ? addend + at : nullptr);
        }
    }
    if (stream) simd::stream_fence();
  }
}

// Eval forward, one pass: y = [relu](f[c](x)), or relu(f[c](x) + s) with an addend (e.add.s).
template <class T>
void batchnorm_forward_eval(T* y, const T* x, const BatchShape& sh, const ChannelAffines<T>& f,
                            const Epilogue<T>& e = {}) {
  const T* addend = e.add.s;
  const bool relu = e.relu;
  assert(!addend || relu);
  const Index N = sh.N, C = sh.C;
  if (sh.S == 1) {
    const T* centre = f.centre.data();
    const T* scale = f.scale.data();
    const T* shift = f.shift.data();
#pragma omp parallel for schedule(static) num_threads(bnrelu::num_threads())
    for (Index n = 0; n < N; ++n) {
      const T* xr = x + n * C;
      T* yr = y + n * C;
      if (addend) {
        const T* sr = addend + n * C;
#pragma omp simd
        for (Index c = 0; c < C; ++c) yr[c] = relu_value(bn_affine(xr[c] - centre[c], scale[c], shift[c]) + sr[c]);
      } else if (relu) {
#pragma omp simd
        for (Index c = 0; c < C; ++c) yr[c] = relu_value(bn_affine(xr[c] - centre[c], scale[c], shift[c]));
      } else {
#pragma omp simd
        for (Index c = 0; c < C; ++c) yr[c] = bn_affine(xr[c] - centre[c], scale[c], shift[c]);
      }
    }
    return;
  }
  const bool stream = detail::stream_output<T>(sh.size(), addend ? 3 : 2);  // x (and s) in, y out
#pragma omp parallel num_threads(bnrelu::num_threads())
  {
#pragma omp for collapse(2) schedule(static)
    for (Index n = 0; n < N; ++n)
      for (Index c = 0; c < C; ++c) {
        const Index at = sh.at(n, c);
        detail::affine(y + at, x + at, sh.S, f[c], relu, stream, {}, addend ? addend + at : nullptr);
      }
    if (stream) simd::stream_fence();
  }
}

// Training backward. With g = dy masked by the ReLU (pre > 0, recomputed from x exactly as
// forward computed it) or g = dy without ReLU, and xhat = (x - mean) * invstd, M = N*S:
//   dbias   += sum(g)
//   dweight += sum(g * xhat) = invstd * sum(g * (x - mean))
//   dx = weight * invstd * (g - sum(g)/M - (x - mean) * invstd^2 * sum(g * (x - mean))/M)
// x, dy, dx: [N, C, S]; norm: the forward's mean and invstd, and its parameters; grads: [C]
// each or null. With an addend (e.add.s, the forward's), the mask is relu(f(x) + s)'s, read
// from e.add.mask if given (the forward's) and recomputed from x and s if not, and g is
// written to e.add.ds as well if given (which it must be without a mask, and for S = 1).
template <class T>
void batchnorm_backward(T* dx, AffineGrads<T> grads, const T* dy, const T* x, const BatchShape& sh,
                        const Normalisation<T>& norm, const Epilogue<T>& e) {
  const Addend<T> add = e.add;
  const bool relu = e.relu;
  assert(!add.s || (relu && (add.ds || add.mask)));
  assert(!add.mask || add.s);
  const Index N = sh.N, C = sh.C;
  const double M = sh.count();
  const double* invstd = norm.invstd;
  if (sh.S == 1) {
    assert(!add.s || add.ds);  // no mask is kept for S = 1
    constexpr Index kBlock = 64;
    const Index nblocks = (C + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) num_threads(bnrelu::num_threads())
    for (Index b = 0; b < nblocks; ++b) {
      const Index c0 = b * kBlock, c1 = std::min(C, c0 + kBlock), w = c1 - c0;
      double sum[kBlock] = {}, dot[kBlock] = {};
      T scale[kBlock], shift[kBlock], mu_hi[kBlock], mu_lo[kBlock];  // mu_hi: the affine map's centre
      for (Index j = 0; j < w; ++j) {
        const ChannelGrad<T> ch(norm, c0 + j, relu);
        scale[j] = ch.f.scale;
        shift[j] = ch.f.shift;
        mu_hi[j] = ch.f.centre;
        mu_lo[j] = ch.lo;
      }
      for (Index n = 0; n < N; ++n) {
        const T* xr = x + n * C + c0;
        const T* dyr = dy + n * C + c0;
        const T* sr = add.s ? add.s + n * C + c0 : nullptr;
#pragma omp simd
        for (Index j = 0; j < w; ++j) {
          const T pre = bn_affine(xr[j] - mu_hi[j], scale[j], shift[j]);
          const T g = sr ? relu_grad(pre + sr[j], dyr[j]) : relu ? relu_grad(pre, dyr[j]) : dyr[j];
          sum[j] += static_cast<double>(g);
          dot[j] += static_cast<double>(g) * static_cast<double>((xr[j] - mu_hi[j]) - mu_lo[j]);
        }
      }
      // dx as the S > 1 path computes it (ChannelDx): g * gs + ((x - hi) * a + b)
      T gs[kBlock], coef_a[kBlock], coef_b[kBlock];
      for (Index j = 0; j < w; ++j) {
        const Index c = c0 + j;
        if (grads.bias) grads.bias[c] += static_cast<T>(sum[j]);
        if (grads.weight) grads.weight[c] += static_cast<T>(dot[j] * invstd[c]);
        const detail::ChannelDx<T> cd(sum[j], dot[j], M, norm, c, relu);
        gs[j] = cd.gs;
        coef_a[j] = cd.a;
        coef_b[j] = cd.b;
      }
      // one loop per epilogue: a conditional store of ds inside one loop kept it from vectorising
      for (Index n = 0; n < N; ++n) {
        const T* xr = x + n * C + c0;
        const T* dyr = dy + n * C + c0;
        T* dxr = dx + n * C + c0;
        if (add.s) {
          const T* sr = add.s + n * C + c0;
          T* dsr = add.ds + n * C + c0;
#pragma omp simd
          for (Index j = 0; j < w; ++j) {
            const T g = relu_grad(bn_affine(xr[j] - mu_hi[j], scale[j], shift[j]) + sr[j], dyr[j]);
            dsr[j] = g;
            dxr[j] = bn_affine(g, gs[j], bn_affine(xr[j] - mu_hi[j], coef_a[j], coef_b[j]));
          }
        } else if (relu) {
#pragma omp simd
          for (Index j = 0; j < w; ++j) {
            const T g = relu_grad(bn_affine(xr[j] - mu_hi[j], scale[j], shift[j]), dyr[j]);
            dxr[j] = bn_affine(g, gs[j], bn_affine(xr[j] - mu_hi[j], coef_a[j], coef_b[j]));
          }
        } else {
#pragma omp simd
          for (Index j = 0; j < w; ++j)
            dxr[j] = bn_affine(dyr[j], gs[j], bn_affine(xr[j] - mu_hi[j], coef_a[j], coef_b[j]));
        }
      }
    }
    return;
  }
  // what a block keeps in cache between the passes: x and dy, and with a shortcut s or the ds
  // pass 1 writes, unless ds goes over dy or is not written; touched in all, for the streaming
  // decision: x, dy and dx, and s (unless a mask replaces it) and ds (if written) with a shortcut
  const bool ds_written = add.s && add.ds;
  const Index streams = ds_written && !(add.mask && add.ds == dy) ? 3 : 2;
  const Index tensors = 3 + (add.s && !add.mask) + ds_written;
  const Index G =
      detail::channel_block(N, C, sh.S, streams * sizeof(T), num_threads(), detail::backward_long_run_bytes());
  const Index nblocks = (C + G - 1) / G;
  const detail::BackwardWalk walk = detail::backward_walk<T>(sh, G, streams, tensors);
#pragma omp parallel num_threads(bnrelu::num_threads())
  {
#pragma omp for schedule(static)
    for (Index blk = 0; blk < nblocks; ++blk) {
      const Index c0 = blk * G, c1 = std::min(C, c0 + G);
      double sum[detail::kMaxBlock] = {}, dot[detail::kMaxBlock] = {};
      // pass 1 (x and dy from memory), pass 2 (x and dy from cache)
      // with an addend, pass 1 also writes the masked gradient g to add.ds, and pass 2 reads g
      // from there (plain, mask applied) instead of recomputing it from dy and s; without ds,
      // pass 2 applies the mask to dy again
      detail::backward_sums(sum, dot, dy, x, sh, norm, {c0, c1}, e, walk);
      for (Index c = c0; c < c1; ++c) {
        if (grads.bias) grads.bias[c] += static_cast<T>(sum[c - c0]);
        if (grads.weight) grads.weight[c] += static_cast<T>(dot[c - c0] * invstd[c]);
      }
      const GradSums sums{sum, dot, M};
      if (ds_written)
        detail::backward_dx(dx, sums, add.ds, x, sh, norm, {c0, c1}, false, walk);
      else
        detail::backward_dx(dx, sums, dy, x, sh, norm, {c0, c1}, relu, walk, add.s ? add.mask : nullptr);
    }
    if (walk.stream) simd::stream_fence();
  }
}

// t += g, g = dy masked by a fused forward's ReLU (its Addend's mask, S > 1): the shortcut's
// gradient that a batchnorm_backward without ds left unwritten, added where it is needed (a
// block's input gradient, for an identity shortcut). t, dy: [N, C, S].
template <class T>
void add_shortcut_grad(T* t, const T* dy, const std::uint64_t* mask, const BatchShape& sh) {
  constexpr Index L = simd::width<T>;
  const Index chunks = sh.N * sh.C, S = sh.S, W = mask_words(S);
#pragma omp parallel for schedule(static) if (sh.size() > (1 << 16)) num_threads(bnrelu::num_threads())
  for (Index k = 0; k < chunks; ++k) {
    T* tc = t + k * S;
    const T* dyc = dy + k * S;
    const std::uint64_t* mc = mask + k * W;
    Index i = 0;
    for (; i + L <= S; i += L)
      simd::store(tc + i, simd::padd(simd::load(tc + i), detail::chunk_grad_packet(mc, i, dyc)));
    for (; i < S; ++i) tc[i] += detail::chunk_grad(mc, i, dyc[i]);
  }
}

// The two halves of batchnorm_forward_train and batchnorm_backward with a cross-replica
// reduction between them (SyncBatchNorm): every channel is read from memory in each half.

// Per-channel mean and biased variance of x: [N, C, S].
template <class T>
void batchnorm_statistics(double* mean, double* var, const T* x, const BatchShape& sh) {
  const Index G = detail::channel_block(sh.N, sh.C, sh.S, sizeof(T), num_threads(), detail::long_run_bytes());
  const Index nblocks = (sh.C + G - 1) / G;
#pragma omp parallel for schedule(static) num_threads(bnrelu::num_threads())
  for (Index blk = 0; blk < nblocks; ++blk) {
    const Index c0 = blk * G, c1 = std::min(sh.C, c0 + G);
    detail::block_mean_var(mean + c0, var + c0, x, static_cast<T*>(nullptr), sh, {c0, c1});
  }
}

// Per-channel sum(g) and sum(g * (x - mean)), g the ReLU-masked (or plain) dy, as in
// batchnorm_backward; for channels r, channel c's into sum[c - r.first] and dot[c - r.first].
template <class T>
void batchnorm_backward_sums(double* sum, double* dot, const T* dy, const T* x, const BatchShape& sh,
                             const Normalisation<T>& norm, bool relu, ChannelRange r = {}) {
  r = r.resolved(sh.C);
  const Index G = detail::channel_block(sh.N, r.last - r.first, sh.S, 2 * sizeof(T), num_threads(),
                                        detail::backward_long_run_bytes());
  const Index nblocks = (r.last - r.first + G - 1) / G;
  const detail::BackwardWalk walk = detail::backward_walk<T>(sh, G, 2, 3);
  const Epilogue<T> e{relu};
#pragma omp parallel for schedule(static) num_threads(bnrelu::num_threads())
  for (Index blk = 0; blk < nblocks; ++blk) {
    const Index c0 = r.first + blk * G, c1 = std::min(r.last, c0 + G);
    double* block_sum = sum + (c0 - r.first);
    double* block_dot = dot + (c0 - r.first);
    std::fill(block_sum, block_sum + (c1 - c0), 0.0);
    std::fill(block_dot, block_dot + (c1 - c0), 0.0);
    detail::backward_sums(block_sum, block_dot, dy, x, sh, norm, {c0, c1}, e, walk);
  }
}

// dx from given per-channel sums over sums.count values (all replicas' for SyncBatchNorm); for
// channels r, channel c's sums at index c - r.first.
template <class T>
void batchnorm_backward_dx(T* dx, const GradSums& sums, const T* dy, const T* x, const BatchShape& sh,
                           const Normalisation<T>& norm, bool relu, ChannelRange r = {}) {
  r = r.resolved(sh.C);
  const Index G = detail::channel_block(sh.N, r.last - r.first, sh.S, 2 * sizeof(T), num_threads(),
                                        detail::backward_long_run_bytes());
  const Index nblocks = (r.last - r.first + G - 1) / G;
  const detail::BackwardWalk walk = detail::backward_walk<T>(sh, G, 2, 3);
#pragma omp parallel num_threads(bnrelu::num_threads())
  {
#pragma omp for schedule(static)
    for (Index blk = 0; blk < nblocks; ++blk) {
      const Index c0 = r.first + blk * G, c1 = std::min(r.last, c0 + G);
      const Index k = c0 - r.first;
      detail::backward_dx(dx, GradSums{sums.sum + k, sums.dot + k, sums.count}, dy, x, sh, norm, {c0, c1}, relu,
                          walk);
    }
    if (walk.stream) simd::stream_fence();
  }
}

}  // namespace bnrelu::kernels
