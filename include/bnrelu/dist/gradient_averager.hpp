// Gradient averaging over ranks, and an optimizer step shared among the ranks of a machine.
#pragma once

#include "../nn/layer.hpp"
#include "../optim/optimizer.hpp"
#include "node_shared.hpp"

namespace bnrelu::dist {

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

}  // namespace bnrelu::dist
