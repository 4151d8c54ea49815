// The caches of the machine the program runs on: as Linux reports them, else as the CPU does.
#pragma once

#include <algorithm>
#include <fstream>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "../tensor.hpp"

namespace bnrelu::platform {

// The size of cpu0's data or unified caches of the given level from Linux's sysfs; 0 if sysfs
// has none (some containers and virtual machines).
inline Index sysfs_cache_bytes(int level) {
  Index best = 0;
  for (int index = 0; index <= 4; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(dir + "level"), type_file(dir + "type"), size_file(dir + "size");
    int this_level = 0;
    std::string type;
    long long value = 0;
    char unit = 0;
    if (!(level_file >> this_level) || this_level != level || !(type_file >> type) || type == "Instruction" ||
        !(size_file >> value))
      continue;
    size_file >> unit;
    best = std::max<Index>(best, static_cast<Index>(unit == 'K' ? value << 10 : unit == 'M' ? value << 20 : value));
  }
  return best;
}

// The size of the data or unified cache of the given level as the x86 CPU describes it: its
// deterministic cache parameters (leaf 4; on AMD, leaf 0x8000001D), else for level 2 the
// extended leaf 0x80000006 (Intel and AMD alike). 0 if the CPU (or a hypervisor in front of it)
// reports none, and on other architectures. Level 3 is not read from leaf 0x80000006, whose
// L3 field virtual machines fill with values far from any real cache.
inline Index cpuid_cache_bytes(int level) {
#if defined(__x86_64__) || defined(__i386__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return 0;
  const bool amd = b == 0x68747541u;  // "Auth" of "AuthenticAMD"
  const unsigned max_basic = a;
  const unsigned max_ext = __get_cpuid_max(0x80000000u, nullptr);
  const unsigned leaf = amd ? 0x8000001Du : 4u;
  if (amd ? max_ext >= leaf : max_basic >= leaf) {
    Index best = 0;
    for (unsigned sub = 0; sub < 16; ++sub) {
      if (!__get_cpuid_count(leaf, sub, &a, &b, &c, &d)) break;
      const unsigned type = a & 31u;  // 0 none, 1 data, 2 instruction, 3 unified
      if (type == 0) break;
      if (type == 2 || static_cast<int>((a >> 5) & 7u) != level) continue;
      const Index ways = (b >> 22) + 1, partitions = ((b >> 12) & 1023u) + 1, line = (b & 4095u) + 1;
      best = std::max<Index>(best, ways * partitions * line * (Index{c} + 1));
    }
    if (best > 0) return best;
  }
  if (level == 2 && max_ext >= 0x80000006u && __get_cpuid(0x80000006u, &a, &b, &c, &d))
    return static_cast<Index>(c >> 16) << 10;  // ECX[31:16]: L2 size in KiB
#endif
  (void)level;
  return 0;
}

// The size of one core's data or unified caches of the given level (for level 3, the cache
// instance the core shares): sysfs, else CPUID; 0 if neither says.
inline Index cache_bytes(int level) {
  const Index sysfs = sysfs_cache_bytes(level);
  return sysfs > 0 ? sysfs : cpuid_cache_bytes(level);
}

// The last-level cache one core shares (level 3 or 4); fallback if neither sysfs nor CPUID
// reports one.
inline Index last_level_cache_bytes(Index fallback = Index{32} << 20) {
  const Index best = std::max(cache_bytes(3), cache_bytes(4));
  return best > 0 ? best : fallback;
}

}  // namespace bnrelu::platform
