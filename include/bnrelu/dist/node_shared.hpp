// Sums over the ranks of a machine through an MPI-3 shared-memory window, and the parameters
// of a model seen as one flat array: what GradientAverager builds on.
#pragma once

#include "../optim/optimizer.hpp"
#include "environment.hpp"

namespace bnrelu::dist {

namespace detail {

// The parameters seen as one flat array (of their values, or of their gradients): flat index j
// is element j of the parameters concatenated in order.
template <class T>
class FlatParameters {
 public:
  explicit FlatParameters(std::vector<ParamRef<T>> params) : params_(std::move(params)) {
    offsets_.push_back(0);
    for (const auto& p : params_) offsets_.push_back(offsets_.back() + p.value.size());
  }
  std::size_t size() const { return offsets_.back(); }
  const ParamRef<T>& operator[](std::size_t k) const { return params_[k]; }
  std::size_t count() const { return params_.size(); }
  // Flat elements [begin, end) of parameter k, as [first, last) of the parameter (first ==
  // last when they do not meet).
  std::pair<std::size_t, std::size_t> overlap(std::size_t k, std::size_t begin, std::size_t end) const {
    const std::size_t first = std::clamp(begin, offsets_[k], offsets_[k + 1]);
    const std::size_t last = std::clamp(end, first, offsets_[k + 1]);
    return {first - offsets_[k], last - offsets_[k]};
  }
  // Calls f(k, offset, flat, n) for every contiguous piece of [begin, end): elements
  // [offset, offset + n) of parameter k, which are flat elements [flat, flat + n).
  template <class F>
  void for_each_piece(std::size_t begin, std::size_t end, F&& f) const {
    for (std::size_t k = 0; k < params_.size(); ++k) {
      const auto [first, last] = overlap(k, begin, end);
      if (last > first) f(k, first, offsets_[k] + first, last - first);
    }
  }

 private:
  std::vector<ParamRef<T>> params_;
  std::vector<std::size_t> offsets_;
};

// Sums over the ranks of a node through a shared-memory window; see
// Reduction::node_shared_memory. Every rank owns a slot of the whole parameter size in the
// window. The flat gradient is cut into L parts (L ranks on the node), part q summed by local
// rank q:
//   1. each rank copies every part of its gradient but its own into its slot;
//   2. (barrier) rank q adds part q of every slot and of its own gradient, in rank order (and
//      between nodes allreduces that sum among the ranks that own part q), and writes the sum,
//      scaled, into part q of its slot and of its gradient; or, in step(), updates part q of the
//      parameters from it and writes them into its slot;
//   3. (barrier) each rank copies the other parts from their owners' slots.
// Every rank gets the same bits. Two barriers a call suffice: a slot's part is written again
// only after the barrier that its readers reach when they are done with it.
template <class T>
class NodeSharedReduction {
 public:
  // Takes over the two communicators (it frees them): node, the ranks that share memory with
  // this one, and across, the ranks of the other nodes with the same rank on their node.
  // shared[k] (optional) marks parameters to be kept in the window, to be placed there by the
  // caller (see place_weight): their values once for the node, their gradients per rank.
  NodeSharedReduction(std::vector<ParamRef<T>> params, MPI_Comm node, MPI_Comm across, std::vector<bool> shared = {})
      : flat_(std::move(params)), node_(node), across_(across), shared_(std::move(shared)) {
    MPI_Comm_rank(node_, &local_rank_);
    MPI_Comm_size(node_, &local_size_);
    MPI_Comm_size(across_, &nodes_);
    const std::size_t n = flat_.size();
    for (int q = 0; q < local_size_; ++q)
      bounds_.push_back(std::min(n, lines(n * static_cast<std::size_t>(q) / static_cast<std::size_t>(local_size_))));
    bounds_.push_back(n);
    shared_.resize(flat_.count(), false);
    std::size_t kept = 0;  // elements of the shared parameters, each starting on a cache line
    for (std::size_t k = 0; k < flat_.count(); ++k) {
      placed_at_.push_back(kept);
      if (shared_[k]) kept += lines(flat_[k].value.size());
    }
    // Every rank's segment: its slot (n), the shared parameters' gradients (kept); local rank 0's
    // also the shared parameters' values (kept). Each piece on a cache line, wherever the
    // segment starts.
    const std::size_t segment = lines(n) + kept + (local_rank_ == 0 ? kept : 0) + kAlign;
    MPI_Info info;
    MPI_Info_create(&info);
    MPI_Info_set(info, "alloc_shared_noncontig", "true");  // each segment on its owner's pages
    T* mine = nullptr;
    const int code = MPI_Win_allocate_shared(static_cast<MPI_Aint>(segment * sizeof(T)), static_cast<int>(sizeof(T)), info,
                                             node_, &mine, &win_);
    MPI_Info_free(&info);
    check(code, "MPI_Win_allocate_shared of the gradient slots");
    for (int q = 0; q < local_size_; ++q) {
      MPI_Aint bytes = 0;
      int unit = 0;
      T* base = nullptr;
      check(MPI_Win_shared_query(win_, q, &bytes, &unit, &base), "MPI_Win_shared_query");
      // on a cache line: the same place in every process, as they map the window page-aligned
      const auto misaligned = reinterpret_cast<std::uintptr_t>(base) % 64;
      slots_.push_back(misaligned ? base + (64 - misaligned) / sizeof(T) : base);
      grads_.push_back(slots_.back() + lines(n));
    }
    values_ = grads_[0] + kept;
    check(MPI_Win_lock_all(MPI_MODE_NOCHECK, win_), "MPI_Win_lock_all");
  }
  // Where shared parameter k's values (one copy for the node) and this rank's gradient of it
  // are to be placed.
  T* shared_value(std::size_t k) const { return values_ + placed_at_[k]; }
  T* shared_grad(std::size_t k) const { return grads_[static_cast<std::size_t>(local_rank_)] + placed_at_[k]; }
  // The parameters again, once the shared ones have been placed: the same names and sizes.
  void rebind(std::vector<ParamRef<T>> params) {
    FlatParameters<T> moved(std::move(params));
    bool same = moved.count() == flat_.count();
    for (std::size_t k = 0; same && k < moved.count(); ++k)
      same = moved[k].name == flat_[k].name && moved[k].value.size() == flat_[k].value.size() &&
             (!shared_[k] || (moved[k].value.data() == shared_value(k) && moved[k].grad.data() == shared_grad(k)));
    if (!same) throw std::logic_error("bnrelu::dist: the parameters changed, or a shared one is not where it belongs");
    flat_ = std::move(moved);
  }
  // Makes every rank's window writes so far visible to the node's other ranks, and theirs to it.
  void synchronise() {
    check(MPI_Win_sync(win_), "MPI_Win_sync");
    check(MPI_Barrier(node_), "MPI_Barrier");
    check(MPI_Win_sync(win_), "MPI_Win_sync");
  }
  // Freeing the window is collective: it waits for the node's other ranks. While an exception
  // unwinds (one rank failed alone, say writing a checkpoint), it would wait forever for ranks
  // that are in another collective, and keep the program from its MPI_Abort; the window is
  // then left to MPI_Abort or MPI_Finalize.
  ~NodeSharedReduction() {
    if (std::uncaught_exceptions() > exceptions_at_start_) return;
    MPI_Win_unlock_all(win_);
    MPI_Win_free(&win_);
    MPI_Comm_free(&node_);
    MPI_Comm_free(&across_);
  }
  NodeSharedReduction(const NodeSharedReduction&) = delete;
  NodeSharedReduction& operator=(const NodeSharedReduction&) = delete;

  // Whether some parameters live in the window.
  bool holds_parameters() const { return any_marked(shared_); }

  // grad = scale * (sum over all ranks of grad). Not with shared parameters.
  void average(T scale) {
    if (holds_parameters())
      throw std::logic_error("bnrelu::dist: with shared weights, gradients are averaged only inside step()");
    publish_gradients();
    synchronise();
    for_each_sum(scale, [&](std::size_t k, std::size_t offset, T* slot, const T* sum, std::size_t n) {
      T* g = flat_[k].grad.data() + offset;
      for (std::size_t i = 0; i < n; ++i) g[i] = slot[i] = sum[i];
    });
    synchronise();
    copy_from_owners([](const ParamRef<T>& p) { return p.grad.data(); });
  }

  // One step of opt from scale * (sum over all ranks of grad): each rank updates its part of
  // the parameters (opt.step_part) and copies the others' parts from their owners. Gradients
  // are left as they were outside this rank's part, and the optimizer's state is current only
  // inside it (gather_state makes it whole).
  void step(T scale, optim::Optimizer<T>& opt) {
    publish_gradients();
    synchronise();
    for_each_sum(scale, [&](std::size_t k, std::size_t offset, T* slot, const T* sum, std::size_t n) {
      opt.step_part(k, offset, offset + n, sum);
      if (!shared_[k]) std::copy_n(flat_[k].value.data() + offset, n, slot);  // else updated in place for all
    });
    synchronise();
    copy_from_owners([](const ParamRef<T>& p) { return p.value.data(); });
    opt.set_steps(opt.steps() + 1);
  }

  // state (of parameter k's size: its optimizer state) becomes whole on every rank of the node,
  // each part copied from the rank that updates it.
  void gather_state(std::size_t k, std::span<T> state) {
    std::vector<int> counts, displs;
    if (state.size() > static_cast<std::size_t>(std::numeric_limits<int>::max()))
      throw std::length_error("bnrelu::dist: optimizer state of more than 2^31 - 1 elements");
    for (int q = 0; q < local_size_; ++q) {
      const auto [first, last] = flat_.overlap(k, part_begin(q), part_end(q));
      counts.push_back(static_cast<int>(last - first));
      displs.push_back(static_cast<int>(first));
    }
    check(MPI_Allgatherv(MPI_IN_PLACE, 0, mpi_type<T>(), state.data(), counts.data(), displs.data(), mpi_type<T>(), node_),
          "MPI_Allgatherv of optimizer state");
  }

 private:
  std::size_t part_begin(int q) const { return bounds_[static_cast<std::size_t>(q)]; }
  std::size_t part_end(int q) const { return bounds_[static_cast<std::size_t>(q) + 1]; }
  T* slot(int q) const { return slots_[static_cast<std::size_t>(q)]; }

  // 1.
  void publish_gradients() {
    for (int q = 0; q < local_size_; ++q)
      if (q != local_rank_)
        flat_.for_each_piece(part_begin(q), part_end(q), [&](std::size_t k, std::size_t offset, std::size_t at, std::size_t n) {
          if (!shared_[k]) copy(flat_[k].grad.data() + offset, n, slot(local_rank_) + at);
        });
  }

  // 2. Calls use(k, offset, slot, sum, n) for blocks of this rank's part: sum[0, n) is scale
  // times the sum over all ranks of elements [offset, offset + n) of parameter k's gradient,
  // and slot the same elements' place in this rank's slot. The blocks stay in L1.
  template <class Use>
  void for_each_sum(T scale, Use&& use) {
    const int me = local_rank_;
    const bool across = nodes_ > 1;
    flat_.for_each_piece(part_begin(me), part_end(me), [&](std::size_t k, std::size_t offset, std::size_t at, std::size_t n) {
      const T* g = flat_[k].grad.data() + offset;
      for_each_block(n, [&](std::size_t b, std::size_t m, T* sum) {
        auto from = [&](int q) -> const T* {
          if (shared_[k]) return grads_[static_cast<std::size_t>(q)] + placed_at_[k] + offset + b;
          return q == me ? g + b : slot(q) + at + b;
        };
        if (local_size_ == 1) {
          std::copy_n(g + b, m, sum);
        } else {
          const T *first = from(0), *second = from(1);
          for (std::size_t i = 0; i < m; ++i) sum[i] = first[i] + second[i];
          for (int q = 2; q < local_size_; ++q) {
            const T* next = from(q);
            for (std::size_t i = 0; i < m; ++i) sum[i] += next[i];
          }
        }
        if (across) {  // the node's sum, to be allreduced between nodes below
          std::copy_n(sum, m, slot(me) + at + b);
          return;
        }
        if (scale != T(1))
          for (std::size_t i = 0; i < m; ++i) sum[i] *= scale;
        use(k, offset + b, slot(me) + at + b, sum, m);
      });
    });
    if (!across) return;
    T* part = slot(me) + part_begin(me);
    const std::size_t n = part_end(me) - part_begin(me);
    constexpr std::size_t kMax = 1u << 30;
    for (std::size_t done = 0; done < n; done += kMax)
      check(MPI_Allreduce(MPI_IN_PLACE, part + done, static_cast<int>(std::min(kMax, n - done)), mpi_type<T>(), MPI_SUM,
                          across_),
            "MPI_Allreduce of gradients between nodes");
    flat_.for_each_piece(part_begin(me), part_end(me), [&](std::size_t k, std::size_t offset, std::size_t at, std::size_t n) {
      for_each_block(n, [&](std::size_t b, std::size_t m, T* sum) {
        for (std::size_t i = 0; i < m; ++i) sum[i] = slot(me)[at + b + i] * scale;
        use(k, offset + b, slot(me) + at + b, sum, m);
      });
    });
  }

  // f(b, m, sum) for the blocks [b, b + m) of [0, n), which stay in L1, with a buffer of m
  // values for each; in parallel over the rank's threads (the blocks are disjoint).
  template <class F>
  static void for_each_block(std::size_t n, F&& f) {
    constexpr std::size_t kBlock = 2048;
    const auto blocks = static_cast<std::ptrdiff_t>((n + kBlock - 1) / kBlock);
#pragma omp parallel for schedule(static) if (blocks > 64) num_threads(bnrelu::num_threads())
    for (std::ptrdiff_t i = 0; i < blocks; ++i) {
      T sum[kBlock];
      const std::size_t b = static_cast<std::size_t>(i) * kBlock;
      f(b, std::min(kBlock, n - b), sum);
    }
  }

  // A large copy in parallel over the rank's threads.
  static void copy(const T* from, std::size_t n, T* to) {
    constexpr std::size_t kChunk = 1 << 16;
    const auto chunks = static_cast<std::ptrdiff_t>((n + kChunk - 1) / kChunk);
#pragma omp parallel for schedule(static) if (chunks > 4) num_threads(bnrelu::num_threads())
    for (std::ptrdiff_t i = 0; i < chunks; ++i) {
      const std::size_t b = static_cast<std::size_t>(i) * kChunk;
      std::copy_n(from + b, std::min(kChunk, n - b), to + b);
    }
  }

  // 3. data(p) is where parameter p's flat elements go (its values or its gradient).
  template <class Data>
  void copy_from_owners(Data&& data) {
    for (int q = 0; q < local_size_; ++q)
      if (q != local_rank_)
        flat_.for_each_piece(part_begin(q), part_end(q), [&](std::size_t k, std::size_t offset, std::size_t at, std::size_t n) {
          if (!shared_[k]) copy(slot(q) + at, n, data(flat_[k]) + offset);
        });
  }

  static constexpr std::size_t kAlign = 64 / sizeof(T);
  // n rounded up to whole cache lines of T.
  static std::size_t lines(std::size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

  FlatParameters<T> flat_;
  MPI_Comm node_, across_;
  int local_rank_ = 0, local_size_ = 1, nodes_ = 1;
  std::vector<std::size_t> bounds_;  // part q is flat [bounds_[q], bounds_[q + 1])
  std::vector<bool> shared_;         // per parameter: kept in the window
  std::vector<std::size_t> placed_at_;
  MPI_Win win_ = MPI_WIN_NULL;
  std::vector<T*> slots_, grads_;  // per local rank
  T* values_ = nullptr;            // the shared parameters' values
  int exceptions_at_start_ = std::uncaught_exceptions();
};

}  // namespace detail

}  // namespace bnrelu::dist
