// Adam and AdamW with PyTorch's update (torch.optim, single-tensor path):
//   (Adam)  g = grad + weight_decay * p          (AdamW) p *= 1 - lr * weight_decay; g = grad
//   m = beta1 * m + (1 - beta1) * g;  v = beta2 * v + (1 - beta2) * g^2
//   p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
#pragma once

#include <cmath>

#include "optimizer.hpp"

namespace bnrelu::optim {

struct AdamOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0;
};

namespace detail {

template <class T>
class AdamBase : public Optimizer<T> {
 public:
  AdamBase(std::vector<ParamRef<T>> params, const AdamOptions& opt, bool decoupled, const char* name)
      : Optimizer<T>(std::move(params)), opt_(opt), decoupled_(decoupled) {
    this->check(opt.lr >= 0, name, "lr must be >= 0");
    this->check(opt.beta1 >= 0 && opt.beta1 < 1, name, "beta1 must be in [0, 1)");
    this->check(opt.beta2 >= 0 && opt.beta2 < 1, name, "beta2 must be in [0, 1)");
    this->check(opt.eps >= 0, name, "eps must be >= 0");
    this->check(opt.weight_decay >= 0, name, "weight_decay must be >= 0");
    this->lr_ = opt.lr;
    for (auto& p : this->params_) {
      m_.emplace_back(p.value.size());
      v_.emplace_back(p.value.size());
    }
  }

  void step() override {
    const std::int64_t t = this->steps_ + 1;
    const T b1 = static_cast<T>(opt_.beta1), b2 = static_cast<T>(opt_.beta2);
    const T wd = static_cast<T>(opt_.weight_decay), eps = static_cast<T>(opt_.eps);
    const double bias1 = 1 - std::pow(opt_.beta1, static_cast<double>(t));
    const double bias2 = 1 - std::pow(opt_.beta2, static_cast<double>(t));
    const T step_size = static_cast<T>(this->lr_ / bias1);
    const T bias2_sqrt = static_cast<T>(std::sqrt(bias2));
    const T decay = static_cast<T>(1 - this->lr_ * opt_.weight_decay);
    for (std::size_t k = 0; k < this->params_.size(); ++k) {
      T* p = this->params_[k].value.data();
      const T* grad = this->params_[k].grad.data();
      T* m = m_[k].data();
      T* v = v_[k].data();
      const Index n = static_cast<Index>(this->params_[k].value.size());
#pragma omp parallel for simd schedule(static) if (n > (1 << 16))
      for (Index i = 0; i < n; ++i) {
        T g = grad[i];
        if (decoupled_) p[i] *= decay;
        else if (wd != 0) g += wd * p[i];
        m[i] = m[i] * b1 + (1 - b1) * g;
        v[i] = v[i] * b2 + (1 - b2) * g * g;
        const T denom = std::sqrt(v[i]) / bias2_sqrt + eps;
        p[i] -= step_size * (m[i] / denom);
      }
    }
    ++this->steps_;
  }

  std::vector<std::pair<std::string, std::vector<T>*>> state() override {
    std::vector<std::pair<std::string, std::vector<T>*>> s;
    for (std::size_t k = 0; k < m_.size(); ++k) {
      s.emplace_back(this->params_[k].name + ".exp_avg", &m_[k]);
      s.emplace_back(this->params_[k].name + ".exp_avg_sq", &v_[k]);
    }
    return s;
  }

 private:
  AdamOptions opt_;
  bool decoupled_;
  std::vector<std::vector<T>> m_, v_;
};

}  // namespace detail

template <class T>
class Adam : public detail::AdamBase<T> {
 public:
  Adam(std::vector<ParamRef<T>> params, const AdamOptions& opt) : detail::AdamBase<T>(std::move(params), opt, false, "Adam") {}
};

// Adam with decoupled weight decay (PyTorch's default weight_decay for AdamW is 1e-2).
struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
};

template <class T>
class AdamW : public detail::AdamBase<T> {
 public:
  AdamW(std::vector<ParamRef<T>> params, const AdamWOptions& o)
      : detail::AdamBase<T>(std::move(params),
                            {.lr = o.lr, .beta1 = o.beta1, .beta2 = o.beta2, .eps = o.eps, .weight_decay = o.weight_decay},
                            true, "AdamW") {}
};

}  // namespace bnrelu::optim
