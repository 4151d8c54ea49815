// Data-parallel training over MPI: one process (rank) per replica, each on its own shard of
// every batch. Optional: link bnrelu::dist (CMake -DBNRELU_WITH_MPI=ON); the core library
// includes no MPI.
//
//   bnrelu::dist::Environment mpi(&argc, &argv);
//   auto model = bnrelu::models::seed_cnn<float>(1, 10);
//   bnrelu::dist::DataParallel ddp(model);     // broadcasts rank 0's state; SyncBatchNorm
//   opt.zero_grad(); loss.forward(model.forward(x), y);
//   ddp.backward_params(loss.backward());      // backward + bucketed allreduce; then opt.step()
#pragma once

#include <mpi.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <limits>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "../nn/batchnorm.hpp"
#include "../nn/layer.hpp"
#include "../optim/optimizer.hpp"
#include "../tensor.hpp"

namespace bnrelu::dist {

namespace detail {
inline void check(int code, const char* what) {
  if (code != MPI_SUCCESS) {
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(code, text, &len);
    throw std::runtime_error(std::string("bnrelu::dist: ") + what + " failed: " + std::string(text, static_cast<std::size_t>(len)));
  }
}

// Sums data over all ranks in place, in pieces that fit MPI's int counts.
template <class T>
void allreduce_sum(T* data, std::size_t n, MPI_Datatype type, const char* what) {
  constexpr std::size_t kMax = 1u << 30;
  for (std::size_t done = 0; done < n; done += kMax)
    check(MPI_Allreduce(MPI_IN_PLACE, data + done, static_cast<int>(std::min(kMax, n - done)), type, MPI_SUM,
                        MPI_COMM_WORLD),
          what);
}

// Whether any parameter is marked.
inline bool any_marked(const std::vector<bool>& marks) { return std::find(marks.begin(), marks.end(), true) != marks.end(); }

template <class T>
MPI_Datatype mpi_type() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "float or double");
  return std::is_same_v<T, float> ? MPI_FLOAT : MPI_DOUBLE;
}
}  // namespace detail

// Whether MPI is running (initialised and not finalised).
inline bool running() {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  return init && !fin;
}

inline int rank() {
  int r = 0;
  if (running()) MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

inline int size() {
  int s = 1;
  if (running()) MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

// The sum of v over all ranks (such as a count or a loss sum), the same on every rank.
inline double sum_over_ranks(double v) {
  detail::allreduce_sum(&v, 1, MPI_DOUBLE, "MPI_Allreduce of a scalar");
  return v;
}

// Initialises MPI (unless something else did) and finalises it on destruction. Threads inside
// a rank (OpenMP) never call MPI, so MPI_THREAD_FUNNELED is enough.
//
// Unless the environment already sets it, Open MPI's shared-memory transport is told to copy
// through its shared buffers instead of its single-copy (CMA) path: measured here on the seed
// CNN's 13 MB gradient allreduce between two ranks, 2.1-2.2 ms against 3.4-3.8 ms. Other MPI
// libraries ignore the variable.
class Environment {
 public:
  Environment(int* argc, char*** argv) {
    if (running()) return;
    ::setenv("OMPI_MCA_btl_vader_single_copy_mechanism", "none", 0);
    int provided = 0;
    detail::check(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
    owns_ = true;
    if (provided < MPI_THREAD_FUNNELED) {
      MPI_Finalize();
      owns_ = false;
      throw std::runtime_error("bnrelu::dist: the MPI library does not provide MPI_THREAD_FUNNELED");
    }
  }
  ~Environment() {
    if (owns_ && running()) MPI_Finalize();
  }
  Environment(const Environment&) = delete;
  Environment& operator=(const Environment&) = delete;

  int rank() const { return dist::rank(); }
  int size() const { return dist::size(); }

 private:
  bool owns_ = false;
};

// SyncBatchNorm over MPI_COMM_WORLD. Statistics: every rank's (count, mean, M2) is gathered and
// merged in rank order with Chan et al.'s pairwise update, in double, so every rank computes
// bit-identical statistics without the cancellation of summing x and x^2. Gradient sums: one
// allreduce of 2C doubles.
class MpiBatchNormReducer : public nn::BatchNormReducer {
 public:
  void combine_statistics(double& count, std::span<double> mean, std::span<double> m2) override {
    const std::size_t C = mean.size(), per_rank = 1 + 2 * C;
    const int ranks = dist::size();
    send_.resize(per_rank);
    send_[0] = count;
    std::copy(mean.begin(), mean.end(), send_.begin() + 1);
    std::copy(m2.begin(), m2.end(), send_.begin() + 1 + static_cast<std::ptrdiff_t>(C));
    all_.resize(per_rank * static_cast<std::size_t>(ranks));
    detail::check(MPI_Allgather(send_.data(), static_cast<int>(per_rank), MPI_DOUBLE, all_.data(),
                                static_cast<int>(per_rank), MPI_DOUBLE, MPI_COMM_WORLD),
                  "MPI_Allgather of batch-norm statistics");
    count = 0;
    std::fill(mean.begin(), mean.end(), 0.0);
    std::fill(m2.begin(), m2.end(), 0.0);
    for (int r = 0; r < ranks; ++r) {
      const double* part = all_.data() + static_cast<std::size_t>(r) * per_rank;
      const double nb = part[0], total = count + nb;
      if (nb == 0) continue;
      for (std::size_t c = 0; c < C; ++c) {
        const double delta = part[1 + c] - mean[c];
        mean[c] += delta * nb / total;
        m2[c] += part[1 + C + c] + delta * delta * count * nb / total;
      }
      count = total;
    }
  }

  void sum(std::span<double> values) override {
    detail::allreduce_sum(values.data(), values.size(), MPI_DOUBLE, "MPI_Allreduce of batch-norm gradient sums");
  }
  int replicas() const override { return dist::size(); }

 private:
  std::vector<double> send_, all_;
};

// Copies rank root's parameters, buffers and batch counters to every rank.
template <class Model>
void broadcast_state(Model& model, int root = 0) {
  using T = typename Model::value_type;
  auto bcast = [&](std::span<T> v) {
    detail::check(MPI_Bcast(v.data(), static_cast<int>(v.size()), detail::mpi_type<T>(), root, MPI_COMM_WORLD),
                  "MPI_Bcast of the model state");
  };
  for (auto& p : model.named_parameters()) bcast(p.value);
  for (auto& b : model.named_buffers()) bcast(b.value);
  nn::for_each_batch_counter(model, "", [&](const std::string&, std::int64_t& n) {
    detail::check(MPI_Bcast(&n, 1, MPI_INT64_T, root, MPI_COMM_WORLD), "MPI_Bcast of a batch counter");
  });
}

// How GradientAverager sums gradients over ranks.
enum class Reduction {
  // average() through MPI_Allreduce, step() through node-shared memory where it can.
  automatic,
  // MPI_Allreduce over buckets of about bucket_bytes, for average() and step() alike (step()
  // is then average() and the optimizer's own step).
  mpi_allreduce,
  // The ranks of a node sum through one MPI-3 shared-memory window, each rank summing its own
  // 1/L of the gradients (L ranks per node); across nodes, each such part takes one allreduce
  // among the ranks that own it. Needs the same number of ranks on every node.
  node_shared_memory,
};

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

// Averages gradients over all ranks (see Reduction), and steps an optimizer on the averages
// with its work shared among ranks. With MPI_Allreduce the gradients are packed, in parameter
// order, into buckets of about bucket_bytes, and each bucket takes one allreduce (small tensors
// share one; a tensor larger than a bucket gets its own and is reduced in place, without
// packing). Reports the time spent reducing and stepping.
//
// node, when given, is the communicator of the ranks that share memory with this one (the
// default is MPI_Comm_split_type's MPI_COMM_TYPE_SHARED); tests pass one to play several nodes
// on one machine. Every rank must construct its averager with the same arguments.
template <class T>
class GradientAverager {
 public:
  // shared (optional) marks parameters to keep in node-shared memory when the window is made:
  // see shared_value.
  explicit GradientAverager(std::vector<ParamRef<T>> params, std::size_t bucket_bytes = 4u << 20,
                            Reduction reduction = Reduction::automatic, MPI_Comm node = MPI_COMM_NULL,
                            std::vector<bool> shared = {})
      : params_(std::move(params)), reduction_(reduction) {
    if (reduction != Reduction::mpi_allreduce && running() && dist::size() > 1) find_node(reduction, node);
    // the window now when it is needed from the start, else at the first step()
    if (can_share_ && (reduction == Reduction::node_shared_memory || detail::any_marked(shared))) make_window(std::move(shared));
    std::size_t start = 0, elems = 0;
    auto close = [&](std::size_t end) {
      if (end > start) buckets_.push_back({start, end, elems});
      start = end;
      elems = 0;
    };
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const std::size_t n = params_[i].grad.size();
      if (n * sizeof(T) >= bucket_bytes) {  // a bucket of its own
        close(i);
        elems = n;
        close(i + 1);
        continue;
      }
      elems += n;
      if (elems * sizeof(T) >= bucket_bytes) close(i + 1);
    }
    close(params_.size());
  }

  ~GradientAverager() {
    if (std::uncaught_exceptions() > exceptions_at_start_) return;  // see ~NodeSharedReduction
    if (node_ != MPI_COMM_NULL) MPI_Comm_free(&node_);
    if (across_ != MPI_COMM_NULL) MPI_Comm_free(&across_);
  }
  GradientAverager(const GradientAverager&) = delete;
  GradientAverager& operator=(const GradientAverager&) = delete;

  // grad = (sum over ranks of grad) / ranks, for every parameter; without the division when
  // divide is false (the gradients were scaled by 1 / ranks already).
  void average(bool divide = true) {
    const double t0 = MPI_Wtime();
    const T scale = static_cast<T>(divide ? 1.0 / dist::size() : 1.0);
    if (reduction() == Reduction::node_shared_memory)
      shared_->average(scale);
    else
      allreduce_buckets(divide, scale);
    seconds_ += MPI_Wtime() - t0;
  }

  // One step of opt (over the same parameters, in the same order) from the averaged gradients;
  // see divide in average(). With node-shared memory each rank of a node updates its own 1/L
  // of the parameters and copies the other parts from the ranks that updated them: the
  // optimizer's work is shared, and the gradients and the updated parameters cross between
  // processes once each. The parameters end the same on every rank; the gradients are then
  // left as they were outside this rank's part, and the optimizer's state is current only
  // inside it: gather_state(opt) makes the state whole (for a checkpoint). Otherwise: average()
  // then opt.step().
  void step(optim::Optimizer<T>& opt, bool divide = true) {
    check_parameters(opt);
    if (!opt.has_step_part() && shared_ && shared_->holds_parameters())
      throw std::logic_error("bnrelu::dist: shared weights need an optimizer with step_part (SGD, Adam, AdamW)");
    if (can_share_ && !shared_ && opt.has_step_part()) make_window({});
    if (!shared_ || !opt.has_step_part()) {
      average(divide);
      opt.step();
      return;
    }
    const double t0 = MPI_Wtime();
    shared_->step(static_cast<T>(divide ? 1.0 / dist::size() : 1.0), opt);
    seconds_ += MPI_Wtime() - t0;
  }

  // After step(): every rank gets the optimizer's whole state (momentum, Adam's moments).
  void gather_state(optim::Optimizer<T>& opt) {
    check_parameters(opt);
    if (!shared_) return;
    for (auto& [name, values] : opt.state()) {
      // the parameter whose state this is: "<parameter name>.<state>", the longest such name
      std::size_t k = params_.size();
      for (std::size_t i = 0; i < params_.size(); ++i)
        if (name.rfind(params_[i].name + ".", 0) == 0 && (k == params_.size() || params_[i].name.size() > params_[k].name.size()))
          k = i;
      if (k == params_.size() || values->size() != params_[k].value.size())
        throw std::invalid_argument("bnrelu::dist::GradientAverager: optimizer state " + name + " matches no parameter");
      shared_->gather_state(k, *values);
    }
  }

  // Throws std::invalid_argument unless opt holds these parameters, in this order.
  void check_parameters(const optim::Optimizer<T>& opt) const {
    const auto& theirs = opt.parameters();
    bool same = theirs.size() == params_.size();
    for (std::size_t k = 0; same && k < params_.size(); ++k)
      same = theirs[k].value.data() == params_[k].value.data() && theirs[k].value.size() == params_[k].value.size();
    if (!same)
      throw std::invalid_argument(
          "bnrelu::dist::GradientAverager: the optimizer must hold the same parameters, in the same order (built after "
          "a DataParallel that shares weights, or rebind()-ed to model.named_parameters())");
  }
  // The reduction that average() uses: mpi_allreduce or node_shared_memory.
  Reduction reduction() const {
    return shared_ && reduction_ == Reduction::node_shared_memory ? Reduction::node_shared_memory : Reduction::mpi_allreduce;
  }
  // Whether step() shares the optimizer's work through node-shared memory.
  bool shares_step() const { return can_share_; }
  // With shares_step(): where parameter k, when marked shared at construction, is to live
  // (one copy of its values for the node, this rank's gradient of it), for its owner to place
  // it there before rebind(); and this rank's rank on its node (0 puts the values there).
  T* shared_value(std::size_t k) const { return window("shared_value").shared_value(k); }
  T* shared_grad(std::size_t k) const { return window("shared_grad").shared_grad(k); }
  int local_rank() const { return local_rank_; }
  // The parameters again after the shared ones were placed (the same names and sizes), once
  // every rank of the node has placed them.
  void rebind(std::vector<ParamRef<T>> params) {
    if (shared_) {
      shared_->synchronise();
      shared_->rebind(params);
    }
    params_ = std::move(params);
  }
  // The number of MPI_Allreduce buckets of average().
  std::size_t num_buckets() const { return buckets_.size(); }
  // Bytes of gradients each rank contributes to one average().
  std::size_t bytes() const {
    std::size_t n = 0;
    for (const auto& p : params_) n += p.grad.size();
    return n * sizeof(T);
  }
  // Seconds spent in average() and step() so far (step() without node-shared memory: only
  // its average()).
  double seconds() const { return seconds_; }

 private:
  struct Bucket {
    std::size_t first, last, elems;
  };

  void allreduce_buckets(bool divide, T scale) {
    for (const auto& b : buckets_) {
      if (b.last - b.first == 1) {  // one tensor: in place
        auto grad = params_[b.first].grad;
        detail::allreduce_sum(grad.data(), grad.size(), detail::mpi_type<T>(), "MPI_Allreduce of gradients");
        if (divide)
          for (auto& g : grad) g *= scale;
        continue;
      }
      buffer_.resize(std::max(buffer_.size(), b.elems));
      T* out = buffer_.data();
      for (std::size_t i = b.first; i < b.last; ++i) out = std::copy(params_[i].grad.begin(), params_[i].grad.end(), out);
      detail::allreduce_sum(buffer_.data(), b.elems, detail::mpi_type<T>(), "MPI_Allreduce of gradients");
      const T* in = buffer_.data();
      for (std::size_t i = b.first; i < b.last; ++i)
        for (auto& g : params_[i].grad) g = *in++ * scale;
    }
  }

  detail::NodeSharedReduction<T>& window(const char* what) const {
    if (!shared_) throw std::logic_error(std::string("bnrelu::dist::GradientAverager::") + what + ": no shared parameters");
    return *shared_;
  }

  // Finds this rank's node (the ranks that share memory with it) and the ranks that own the
  // same part on the other nodes. Node-shared memory is possible (can_share_) when every node
  // runs the same number of ranks: two or more, unless node_shared_memory is asked for.
  void find_node(Reduction reduction, MPI_Comm node) {
    MPI_Comm local = MPI_COMM_NULL;
    if (node == MPI_COMM_NULL)
      detail::check(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &local),
                    "MPI_Comm_split_type");
    else
      detail::check(MPI_Comm_dup(node, &local), "MPI_Comm_dup");
    int local_rank = 0, local_size = 1;
    MPI_Comm_rank(local, &local_rank);
    MPI_Comm_size(local, &local_size);
    int sizes[2] = {local_size, -local_size};  // the largest and the smallest node
    detail::check(MPI_Allreduce(MPI_IN_PLACE, sizes, 2, MPI_INT, MPI_MAX, MPI_COMM_WORLD), "MPI_Allreduce of node sizes");
    const bool even = sizes[0] == -sizes[1];
    if (!even || (reduction == Reduction::automatic && local_size < 2)) {
      MPI_Comm_free(&local);
      if (reduction == Reduction::node_shared_memory && !even)
        throw std::invalid_argument("bnrelu::dist::GradientAverager: node_shared_memory needs the same number of ranks on every node");
      return;
    }
    MPI_Comm across = MPI_COMM_NULL;  // the ranks that own the same part on every node
    detail::check(MPI_Comm_split(MPI_COMM_WORLD, local_rank, dist::rank(), &across), "MPI_Comm_split");
    node_ = local;
    across_ = across;
    local_rank_ = local_rank;
    can_share_ = true;
  }

  // The window (collective over the node), which takes over the two communicators.
  void make_window(std::vector<bool> shared) {
    shared_ = std::make_unique<detail::NodeSharedReduction<T>>(params_, node_, across_, std::move(shared));
    node_ = across_ = MPI_COMM_NULL;
  }

  std::vector<ParamRef<T>> params_;
  Reduction reduction_;
  std::vector<Bucket> buckets_;
  std::vector<T> buffer_;
  std::unique_ptr<detail::NodeSharedReduction<T>> shared_;
  MPI_Comm node_ = MPI_COMM_NULL, across_ = MPI_COMM_NULL;  // until the window takes them
  bool can_share_ = false;
  int local_rank_ = 0;
  int exceptions_at_start_ = std::uncaught_exceptions();
  double seconds_ = 0;
};

struct DataParallelOptions {
  // MPI_Allreduce buckets (see GradientAverager).
  std::size_t bucket_bytes = 4u << 20;
  Reduction reduction = Reduction::automatic;
  // Keep one copy of each large weight (of a Linear or Conv2d at the model's top level, from
  // shared_weight_bytes up) for all ranks of a machine, in node-shared memory: the ranks read
  // the same weight, and backward_and_step updates each part of it in place, once, instead of
  // copying it between processes. Each rank's gradient of it lives there too. Training must
  // then step through backward_and_step (backward_params and average_gradients throw), with an
  // optimizer built on model.named_parameters() after the DataParallel (or rebind()-ed to
  // them); the layers' weight() and weight_grad() throw while shared (named_parameters() views
  // them). Without node-shared memory (one rank per machine, Reduction::mpi_allreduce) the
  // weights stay where they are.
  bool share_weights = false;
  std::size_t shared_weight_bytes = 1u << 20;
};

// Wraps a model (a Sequential) for data parallelism over MPI_COMM_WORLD: copies rank 0's state
// to every rank, makes every batch norm a SyncBatchNorm (fused with its ReLU as before), and
// averages gradients after backward. The model stays a plain model: checkpoints saved from any
// rank load into a single process (shared weights go back into their layers when the
// DataParallel is destroyed).
template <class Model>
class DataParallel {
 public:
  using T = typename Model::value_type;

  explicit DataParallel(Model& model, std::size_t bucket_bytes = 4u << 20, Reduction reduction = Reduction::automatic)
      : DataParallel(model, DataParallelOptions{.bucket_bytes = bucket_bytes, .reduction = reduction}) {}
  DataParallel(Model& model, const DataParallelOptions& options)
      : model_(checked(model)),
        sharable_(sharable(model, options)),
        averager_(model.named_parameters(), options.bucket_bytes, options.reduction, MPI_COMM_NULL, sharable_) {
    broadcast_state(model_);
    if (size() > 1) model_.set_batchnorm_reducer(std::make_shared<MpiBatchNormReducer>());
    if (detail::any_marked(sharable_) && averager_.shares_step()) place_weights(true);
  }
  ~DataParallel() {
    if (shares_weights_) place_weights(false);
    model_.set_batchnorm_reducer(nullptr);
  }
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  // Whether weights live in node-shared memory (DataParallelOptions::share_weights).
  bool shares_weights() const { return shares_weights_; }

  Model& model() { return model_; }
  // After the model's own backward: every gradient becomes the mean over ranks.
  void average_gradients() {
    refuse_with_shared_weights("average_gradients");
    if (size() > 1) averager_.average();
  }
  // The model's backward_params and average_gradients in one, cheaper: dy (the gradient of this
  // rank's mean loss) is divided by the rank count before the backward, which scales every
  // gradient alike (the backward is linear in dy, SyncBatchNorm included), so the allreduce
  // alone leaves the mean and no pass over the gradients is needed to divide them.
  template <class Dy>
  void backward_params(Dy&& dy) {
    refuse_with_shared_weights("backward_params");
    backward_of_mean(std::forward<Dy>(dy));
    if (size() > 1) averager_.average(false);
  }
  // The model's backward, then one step of opt (built on model.named_parameters()) from the
  // gradients' mean over ranks, its work shared among the ranks of each node: see
  // GradientAverager::step. Cheaper than backward_params then opt.step(); afterwards the
  // gradients are not averaged, and the optimizer's state is current only in this rank's part
  // until gather_optimizer_state(opt).
  template <class Dy>
  void backward_and_step(Dy&& dy, optim::Optimizer<T>& opt) {
    averager_.check_parameters(opt);  // before the backward's collectives
    if (shares_weights_ && !opt.has_step_part())
      throw std::logic_error("bnrelu::dist::DataParallel: shared weights need an optimizer with step_part (SGD, Adam, AdamW)");
    backward_of_mean(std::forward<Dy>(dy));
    if (size() > 1)
      averager_.step(opt, false);
    else
      opt.step();
  }
  // Makes the optimizer's state whole on every rank after backward_and_step, before it is
  // saved. Collective: every rank calls it.
  void gather_optimizer_state(optim::Optimizer<T>& opt) {
    if (size() > 1) averager_.gather_state(opt);
  }
  const GradientAverager<T>& averager() const { return averager_; }

  // The mean of a per-rank scalar (such as the local loss) over ranks.
  static double mean_over_ranks(double v) { return sum_over_ranks(v) / dist::size(); }

 private:
  // The model's backward from dy / ranks: the summed gradients are then the mean's.
  template <class Dy>
  void backward_of_mean(Dy&& dy) {
    if (size() == 1) return model_.backward_params(std::forward<Dy>(dy));
    auto scaled = std::remove_cvref_t<Dy>(std::forward<Dy>(dy));
    scaled = scaled * static_cast<T>(1.0 / size());
    model_.backward_params(std::move(scaled));
  }

  static Model& checked(Model& model) {
    if (!running()) throw std::logic_error("bnrelu::dist::DataParallel: MPI is not initialised (use dist::Environment)");
    return model;
  }

  // Calls f(k, layer) for each layer at the top of the model whose weight can be placed
  // elsewhere, k being the index of "<layer>.weight" in named_parameters().
  template <class F>
  static void for_each_placeable(Model& model, F&& f) {
    const auto params = model.named_parameters();
    model.for_each_indexed([&](std::size_t i, auto& layer) {
      if constexpr (requires { layer.place_weight(nullptr, nullptr, true); }) {
        const std::string name = std::to_string(i) + ".weight";
        for (std::size_t k = 0; k < params.size(); ++k)
          if (params[k].name == name) f(k, layer);
      }
    });
  }

  static std::vector<bool> sharable(Model& model, const DataParallelOptions& options) {
    const auto params = model.named_parameters();
    std::vector<bool> shared(params.size(), false);
    if (!options.share_weights) return shared;
    for_each_placeable(model, [&](std::size_t k, auto&) {
      shared[k] = params[k].value.size() * sizeof(T) >= options.shared_weight_bytes;
    });
    return shared;
  }

  // Moves the shared weights into node memory (local rank 0 copies the values: they are the
  // same on every rank after the broadcast), or back into their layers.
  void place_weights(bool shared) {
    for_each_placeable(model_, [&](std::size_t k, auto& layer) {
      if (!sharable_[k]) return;
      if (shared)
        layer.place_weight(averager_.shared_value(k), averager_.shared_grad(k), averager_.local_rank() == 0);
      else
        layer.place_weight(nullptr, nullptr);
    });
    shares_weights_ = shared;
    if (shared) averager_.rebind(model_.named_parameters());
  }

  void refuse_with_shared_weights(const char* what) const {
    if (shares_weights_)
      throw std::logic_error(std::string("bnrelu::dist::DataParallel::") + what +
                             ": the weights are shared between ranks; step with backward_and_step");
  }

  Model& model_;
  std::vector<bool> sharable_;
  GradientAverager<T> averager_;
  bool shares_weights_ = false;
};

}  // namespace bnrelu::dist
