// How the C library's malloc treats memory the program frees: bnrelu asks it to keep that
// memory for the next allocations.
#pragma once

#include <climits>
#include <cstdlib>
#include <cstring>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace bnrelu::platform {

// A training loop that drops a layer's outputs each step (y = model.forward(x), results not
// kept) frees and allocates activation-sized tensors every step. glibc's malloc serves blocks
// above its mmap threshold (128 KiB at first, rising as such blocks are freed, to at most
// 32 MiB) with fresh mappings, and hands heap memory above its trim threshold back to the
// system: either way every step page-faults its activations in again, which costs more than
// the layers' own work (Sequential(BatchNorm2d, ReLU) at 256x64x28x28 on one thread: 561 ms a
// step against 17.6 ms). Once per process, when the first bnrelu layer is built, this makes
// malloc serve every block from its heaps and keep what is freed (M_MMAP_MAX 0, M_TRIM_THRESHOLD
// INT_MAX): the process keeps its peak heap, and steps reuse it. It leaves malloc as it is when
// the environment variable BNRELU_KEEP_FREED_MEMORY is 0, when GLIBC_TUNABLES sets any of
// malloc's own tunables, and with other C libraries. Returns whether the settings were made.
inline bool keep_freed_memory() {
#if defined(__GLIBC__)
  static const bool made = [] {
    const char* own = std::getenv("BNRELU_KEEP_FREED_MEMORY");
    if (own && std::strcmp(own, "0") == 0) return false;
    const char* tunables = std::getenv("GLIBC_TUNABLES");
    if (tunables && std::strstr(tunables, "glibc.malloc.")) return false;
    return mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, INT_MAX) == 1;
  }();
  return made;
#else
  return false;
#endif
}

}  // namespace bnrelu::platform
