// The machine-dependent values the kernels tune themselves by, in one place: each derived from
// the caches the program finds (platform/cache.hpp: sysfs, else CPUID) at first use, with a
// fallback where neither reports them. Tests set them to cover every path with small tensors;
// they change which path runs, never a result.
#pragma once

#include <algorithm>

#include "../platform/cache.hpp"
#include "../tensor.hpp"

namespace bnrelu::kernels::detail {

// One core's L2 (1 MiB if unknown): BatchNorm's channel blocks keep their slice within half
// of it.
inline Index l2_bytes() {
  static const Index bytes = [] {
    const Index l2 = platform::cache_bytes(2);
    return l2 > 0 ? l2 : Index{1} << 20;
  }();
  return bytes;
}

// A BatchNorm pass writes its output with non-temporal stores when the tensors it reads and
// writes together exceed this many bytes: the output would not stay in the last-level cache
// until the next layer reads it, and writing around the cache saves reading every line before
// it is written. A smaller pass leaves its output cached for the layer that reads it next.
// Half the last-level cache, since the cache also holds other layers', threads' and programs'
// lines, and at most 64 MiB, since a virtual machine may report its host's whole cache, shared
// with cores it cannot see. Measured (bench_batchnorm_relu's fused and public-API rows at
// 64x64x28x28 and 256x64x28x28, whose passes count 26-39 MB and 103-154 MB):
//  - AMD Zen 5, 32 MiB of L3: half of it (16 MiB) beat streaming only outputs larger than the
//    whole L3, 2.1-2.2 against 2.8-3.0 ms at 64x64x28x28; a buffer read again and again (the
//    cache_reread rows) came at 64-98 GB/s up to 12 MiB, at 43 GB/s at 16 MiB and at memory's
//    23-28 GB/s from 24 MiB;
//  - Intel Xeon (family 6 model 207), 300 MiB of L3 reported to a 2-core virtual machine: 40
//    and 64 MiB beat 24 MiB (which streams all of 64x64x28x28's passes: up to 1.6x slower)
//    and 150 MiB (which caches 256x64x28x28's passes: 1.3-2.3x slower).
inline Index& stream_threshold() {
  static Index bytes = std::min(platform::last_level_cache_bytes() / 2, Index{64} << 20);
  return bytes;
}

// BatchNorm's channel blocks (kernels/batchnorm.hpp, channel_block): a channel whose slice
// exceeds this many bytes cannot stay in L2 between the passes, and the forward's blocks then
// take many channels for long runs. Half of L2 by default.
inline Index& long_run_bytes() {
  static Index bytes = l2_bytes() / 2;
  return bytes;
}

// The same for the backward, whose second pass walks back over what its first pass read and
// finds it in L2 and the last-level cache while a channel's x and dy (and shortcut) fit in one
// core's share of that cache, taken as an eighth of it (eight cores share an L3 on AMD's
// chiplets; Intel's per-core slices are smaller). Above that, the backward's blocks also take
// many channels. The larger of that share and half of L2 by default.
inline Index& backward_long_run_bytes() {
  static Index bytes = std::max(l2_bytes() / 2, platform::last_level_cache_bytes() / 8);
  return bytes;
}

// BatchNorm's backward walks a block whose x and dy exceed this many bytes as a block beyond
// L2 (kernels/batchnorm.hpp, BackwardWalk): one core's L2 by default.
inline Index& backward_spill_bytes() {
  static Index bytes = l2_bytes();
  return bytes;
}

// Sets one of the values above for a scope and puts the old value back when the scope ends,
// however it ends: for the tests and the fuzz target, which force each path with small tensors.
class ScopedTuning {
 public:
  ScopedTuning(Index& value, Index forced) : value_(value), saved_(value) { value_ = forced; }
  ~ScopedTuning() { value_ = saved_; }
  ScopedTuning(const ScopedTuning&) = delete;
  ScopedTuning& operator=(const ScopedTuning&) = delete;

 private:
  Index& value_;
  Index saved_;
};

}  // namespace bnrelu::kernels::detail
