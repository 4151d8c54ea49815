// The caches of the machine the program runs on, as Linux reports them.
#pragma once

#include <algorithm>
#include <fstream>
#include <string>

#include "../tensor.hpp"

namespace bnrelu::platform {

// The size of cpu0's data or unified caches of the given level, from Linux's sysfs (sysconf and
// CPUID report a whole package's L3 on some machines); 0 if unknown (no sysfs, as in some
// containers).
inline Index cache_bytes(int level) {
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

// The last-level cache one core shares; fallback if unknown.
inline Index last_level_cache_bytes(Index fallback = Index{32} << 20) {
  const Index best = std::max({cache_bytes(2), cache_bytes(3), cache_bytes(4)});
  return best > 0 ? best : fallback;
}

}  // namespace bnrelu::platform
