// Stochastic gradient descent with momentum, dampening, Nesterov and weight decay,
// with PyTorch's update:
//   g = grad + weight_decay * p
//   buf = g (first step), else momentum * buf + (1 - dampening) * g
//   g = g + momentum * buf (nesterov), else buf        (only when momentum != 0)
//   p -= lr * g
#pragma once

#include "optimizer.hpp"

namespace bnrelu::optim {

struct SGDOptions {
  double lr = 0.01;
  double momentum = 0;
  double dampening = 0;
  double weight_decay = 0;
  bool nesterov = false;
};

template <class T>
class SGD : public Optimizer<T> {
 public:
  using options_type = SGDOptions;

  SGD(std::vector<ParamRef<T>> params, const SGDOptions& opt) : Optimizer<T>(std::move(params)), opt_(opt) {
    this->check(this->finite_nonnegative(opt.lr), "SGD", "lr must be finite and >= 0");
    this->check(this->finite_nonnegative(opt.momentum), "SGD", "momentum must be finite and >= 0");
    this->check(std::isfinite(opt.dampening), "SGD", "dampening must be finite");
    this->check(this->finite_nonnegative(opt.weight_decay), "SGD", "weight_decay must be finite and >= 0");
    this->check(!opt.nesterov || (opt.momentum > 0 && opt.dampening == 0), "SGD",
                "nesterov needs momentum > 0 and dampening 0");
    this->lr_ = opt.lr;
    for (auto& p : this->params_) buf_.emplace_back(opt.momentum != 0 ? p.value.size() : 0);
  }

  bool has_step_part() const override { return true; }
  void step_part(std::size_t k, std::size_t begin, std::size_t end, const T* grad) override {
    const Rule rule{static_cast<T>(this->lr_), static_cast<T>(opt_.weight_decay), static_cast<T>(opt_.momentum),
                    static_cast<T>(1 - opt_.dampening), this->steps_ == 0, opt_.nesterov};
    T* p = this->params_[k].value.data() + begin;
    T* buf = rule.momentum != 0 ? buf_[k].data() + begin : nullptr;
    this->in_chunks(static_cast<Index>(end - begin),
                    [&](Index c, Index n) { update(rule, p + c, buf ? buf + c : nullptr, grad + c, n); });
  }

  std::vector<std::pair<std::string, std::vector<T>*>> state() override {
    std::vector<std::pair<std::string, std::vector<T>*>> s;
    if (opt_.momentum != 0)
      for (std::size_t k = 0; k < buf_.size(); ++k) s.emplace_back(this->params_[k].name + ".momentum_buffer", &buf_[k]);
    return s;
  }

 private:
  struct Rule {
    T lr, weight_decay, momentum, damp;
    bool first, nesterov;
  };
  // p[i] and buf[i] (null without momentum) after one step from grad[i], for i < n.
  static void update(const Rule r, T* __restrict p, T* __restrict buf, const T* __restrict grad, Index n) {
#pragma omp simd
    for (Index i = 0; i < n; ++i) {
      T g = grad[i];
      if (r.weight_decay != 0) g += r.weight_decay * p[i];
      if (r.momentum != 0) {
        buf[i] = r.first ? g : r.momentum * buf[i] + r.damp * g;
        g = r.nesterov ? g + r.momentum * buf[i] : buf[i];
      }
      p[i] -= r.lr * g;
    }
  }

  SGDOptions opt_;
  std::vector<std::vector<T>> buf_;
};

}  // namespace bnrelu::optim
