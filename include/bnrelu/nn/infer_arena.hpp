// Storage that infer reuses from one call to the next, per thread.
//
// A model's infer makes one tensor per layer and drops it once the next layer has read it. Left
// to the allocator, buffers of activation size go back to the system when freed (glibc returns
// chunks above its mmap threshold, and trims the heap's top) and are page-faulted in again on
// the next call. Instead, the layers take their infer outputs from the calling thread's spares
// and Sequential and Residual hand each intermediate back once it is read: a steady stream of
// calls of one shape allocates nothing. No locks: every thread has its own spares.
#pragma once

#include <cstddef>
#include <vector>

#include "../tensor.hpp"

namespace bnrelu::nn {

namespace detail {

// How many spare tensors of one element type and rank a thread keeps. A spare serves only a
// tensor of its own element count, and a call holds a few at once (an intermediate, the next
// layer's output, a residual block's input and shortcut) for each size a model's stages have:
// ResNet-20 needs 15 at most.
inline constexpr std::size_t kInferSpares = 24;

template <class T, int Rank>
std::vector<Tensor<T, Rank>>& infer_spares() {
  thread_local std::vector<Tensor<T, Rank>> spares;
  return spares;
}

// A tensor of dims d (already checked by the layer's output_dims): a spare of the same element
// count when the calling thread has one, else a new one.
template <class T, std::size_t Rank>
Tensor<T, static_cast<int>(Rank)> infer_output(const Dims<Rank>& d) {
  auto& spares = infer_spares<T, static_cast<int>(Rank)>();
  Index n = 1;
  for (Index v : d) n *= v;
  for (auto it = spares.begin(); it != spares.end(); ++it)
    if (it->size() == n) {
      Tensor<T, static_cast<int>(Rank)> t = std::move(*it);
      spares.erase(it);
      t.resize(d);  // Eigen keeps the storage when the element count is unchanged
      return t;
    }
  return Tensor<T, static_cast<int>(Rank)>(d);
}

// Hands back an intermediate that infer has finished with; the oldest spare goes when the
// thread already keeps kInferSpares of this type and rank.
template <class T, int Rank>
void infer_recycle(Tensor<T, Rank>&& t) {
  if (t.size() == 0) return;
  auto& spares = infer_spares<T, Rank>();
  if (spares.size() == kInferSpares) spares.erase(spares.begin());
  spares.push_back(std::move(t));
}

}  // namespace detail

// Frees the spare buffers the calling thread's infer calls keep (of every element type and rank
// bnrelu's layers produce), as when a serving thread goes idle.
inline void release_infer_buffers() {
  detail::infer_spares<float, 2>().clear();
  detail::infer_spares<float, 4>().clear();
  detail::infer_spares<double, 2>().clear();
  detail::infer_spares<double, 4>().clear();
}

}  // namespace bnrelu::nn
