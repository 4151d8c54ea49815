// What every optimizer shares: the parameters it updates, in order, and its learning rate.
#pragma once

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "../error.hpp"
#include "../tensor.hpp"
#include "../threads.hpp"

namespace bnrelu::optim {

// State is held per parameter, in the order of named_parameters() (never keyed by address).
template <class T>
class Optimizer {
 public:
  explicit Optimizer(std::vector<ParamRef<T>> params) : params_(std::move(params)) {}
  virtual ~Optimizer() = default;

  // Sets every parameter gradient to 0.
  void zero_grad() {
    for (auto& p : params_) std::fill(p.grad.begin(), p.grad.end(), T(0));
  }
  // One update of every parameter from its gradient (by default step_part over each whole
  // parameter, then one step counted).
  virtual void step() {
    for (std::size_t k = 0; k < params_.size(); ++k) step_part(k, 0, params_[k].value.size(), params_[k].grad.data());
    ++steps_;
  }
  // step()'s update of elements [begin, end) of parameter k, from the gradient values
  // grad[0, end - begin) instead of the parameter's own gradient, without counting a step: for
  // element-wise updates, as SGD's and Adam's. bnrelu::dist uses it to give each rank its own
  // shard of the parameters to update. An optimizer that needs whole tensors overrides step()
  // alone, and cannot take a shared step.
  virtual void step_part(std::size_t /*k*/, std::size_t /*begin*/, std::size_t /*end*/, const T* /*grad*/) {
    throw std::logic_error("optimizer: this optimizer updates whole tensors only (no step_part)");
  }
  // Whether step_part is implemented.
  virtual bool has_step_part() const { return false; }
  // The parameters, in order.
  const std::vector<ParamRef<T>>& parameters() const { return params_; }
  // Points the optimizer at its parameters after they moved (as DataParallel's shared weights
  // move them), keeping its state: the names and sizes must be the same.
  void rebind(std::vector<ParamRef<T>> params) {
    bool same = params.size() == params_.size();
    for (std::size_t k = 0; same && k < params.size(); ++k)
      same = params[k].name == params_[k].name && params[k].value.size() == params_[k].value.size() &&
             params[k].grad.size() == params_[k].grad.size();
    if (!same) throw shape_error("optimizer: rebind needs the same parameters (names and sizes), in the same order");
    params_ = std::move(params);
  }

  double lr() const { return lr_; }
  // shape_error unless lr is finite and >= 0.
  void set_lr(double lr) {
    check(finite_nonnegative(lr), "optimizer", "lr must be finite and >= 0, got " + std::to_string(lr));
    lr_ = lr;
  }
  // The number of step() calls so far.
  std::int64_t steps() const { return steps_; }

  // Named per-parameter state tensors ("<param>.<buffer>"), for checkpoints: a restore writes
  // through these pointers, after checking every name and size against what it loads.
  virtual std::vector<std::pair<std::string, std::vector<T>*>> state() = 0;
  void set_steps(std::int64_t s) { steps_ = s; }

 protected:
  // f(begin, n) over [0, n) in chunks, in parallel over the threads when n is large enough to
  // pay for a parallel region (step_part is also called on small blocks).
  template <class F>
  static void in_chunks(Index n, F&& f) {
    constexpr Index kChunk = 1 << 14;
    if (n <= (1 << 16)) return f(Index(0), n);
#pragma omp parallel for schedule(static) num_threads(bnrelu::num_threads())
    for (Index c = 0; c < n; c += kChunk) f(c, std::min(kChunk, n - c));
  }

  static bool finite_nonnegative(double v) { return std::isfinite(v) && v >= 0; }
  static void check(bool ok, const char* opt, const std::string& what) {
    if (!ok) throw shape_error(std::string(opt) + ": invalid option: " + what);
  }

  std::vector<ParamRef<T>> params_;
  double lr_ = 0;
  std::int64_t steps_ = 0;
};

}  // namespace bnrelu::optim
