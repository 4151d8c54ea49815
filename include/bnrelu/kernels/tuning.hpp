// The machine-dependent values the kernels tune themselves by, in one place: each derived from
// the caches the program finds (platform/cache.hpp: sysfs, else CPUID) at first use, with a
// fallback where neither reports them. Tests set them to cover every path with small tensors; they change
// which path runs, never a result.
#pragma once

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

// BatchNorm's backward walks a block whose x and dy exceed this many bytes as a block beyond
// L2 (kernels/batchnorm.hpp, BackwardWalk): one core's L2 by default.
inline Index& backward_spill_bytes() {
  static Index bytes = l2_bytes();
  return bytes;
}

}  // namespace bnrelu::kernels::detail
