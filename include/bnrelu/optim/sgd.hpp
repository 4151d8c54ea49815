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
  SGD(std::vector<ParamRef<T>> params, const SGDOptions& opt) : Optimizer<T>(std::move(params)), opt_(opt) {
    this->check(opt.lr >= 0, "SGD", "lr must be >= 0");
    this->check(opt.momentum >= 0, "SGD", "momentum must be >= 0");
    this->check(opt.weight_decay >= 0, "SGD", "weight_decay must be >= 0");
    this->check(!opt.nesterov || (opt.momentum > 0 && opt.dampening == 0), "SGD",
                "nesterov needs momentum > 0 and dampening 0");
    this->lr_ = opt.lr;
    for (auto& p : this->params_) buf_.emplace_back(opt.momentum != 0 ? p.value.size() : 0);
  }

  void step() override {
    const T lr = static_cast<T>(this->lr_), wd = static_cast<T>(opt_.weight_decay);
    const T mom = static_cast<T>(opt_.momentum), damp = static_cast<T>(1 - opt_.dampening);
    const bool first = this->steps_ == 0;
    for (std::size_t k = 0; k < this->params_.size(); ++k) {
      T* p = this->params_[k].value.data();
      const T* grad = this->params_[k].grad.data();
      T* buf = buf_[k].data();
      const Index n = static_cast<Index>(this->params_[k].value.size());
#pragma omp parallel for simd schedule(static) if (n > (1 << 16))
      for (Index i = 0; i < n; ++i) {
        T g = grad[i];
        if (wd != 0) g += wd * p[i];
        if (mom != 0) {
          buf[i] = first ? g : mom * buf[i] + damp * g;
          g = opt_.nesterov ? g + mom * buf[i] : buf[i];
        }
        p[i] -= lr * g;
      }
    }
    ++this->steps_;
  }

  std::vector<std::pair<std::string, std::vector<T>*>> state() override {
    std::vector<std::pair<std::string, std::vector<T>*>> s;
    if (opt_.momentum != 0)
      for (std::size_t k = 0; k < buf_.size(); ++k) s.emplace_back(this->params_[k].name + ".momentum_buffer", &buf_[k]);
    return s;
  }

 private:
  SGDOptions opt_;
  std::vector<std::vector<T>> buf_;
};

}  // namespace bnrelu::optim
