// The machine-dependent values the kernels tune themselves by, in one place: each derived from
// the caches the program finds (platform/cache.hpp: sysfs, else CPUID) at first use, with a
// fallback where neither reports them. Tests set them to cover every path with small tensors; they change
// which path runs, never a result.
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

// Outputs bigger than this many bytes are written with non-temporal stores: they cannot stay in
// the last-level cache anyway, and writing around the cache saves reading every line before it
// is written. Smaller outputs stay cached for the layer that reads them next. The last-level
// cache's size by default.
inline Index& stream_threshold() {
  static Index bytes = platform::last_level_cache_bytes();
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

}  // namespace bnrelu::kernels::detail
