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
    this->check(this->finite_nonnegative(opt.lr), name, "lr must be finite and >= 0");
    this->check(opt.beta1 >= 0 && opt.beta1 < 1, name, "beta1 must be in [0, 1)");
    this->check(opt.beta2 >= 0 && opt.beta2 < 1, name, "beta2 must be in [0, 1)");
    this->check(this->finite_nonnegative(opt.eps), name, "eps must be finite and >= 0");
    this->check(this->finite_nonnegative(opt.weight_decay), name, "weight_decay must be finite and >= 0");
    this->lr_ = opt.lr;
    for (auto& p : this->params_) {
      m_.emplace_back(p.value.size());
      v_.emplace_back(p.value.size());
    }
  }

  bool has_step_part() const override { return true; }
  void step_part(std::size_t k, std::size_t begin, std::size_t end, const T* grad) override {
    const double t = static_cast<double>(this->steps_ + 1);
    const Rule rule{static_cast<T>(opt_.beta1),
                    static_cast<T>(opt_.beta2),
                    static_cast<T>(opt_.weight_decay),
                    static_cast<T>(opt_.eps),
                    static_cast<T>(this->lr_ / (1 - std::pow(opt_.beta1, t))),
                    static_cast<T>(std::sqrt(1 - std::pow(opt_.beta2, t))),
                    static_cast<T>(1 - this->lr_ * opt_.weight_decay),
                    decoupled_};
    T* p = this->params_[k].value.data() + begin;
    T* m = m_[k].data() + begin;
    T* v = v_[k].data() + begin;
    this->in_chunks(static_cast<Index>(end - begin),
                    [&](Index c, Index n) { update(rule, p + c, m + c, v + c, grad + c, n); });
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
  struct Rule {
    T b1, b2, weight_decay, eps, step_size, bias2_sqrt, decay;
    bool decoupled;
  };
  // p[i], m[i] and v[i] after one step from grad[i], for i < n.
  static void update(const Rule r, T* __restrict p, T* __restrict m, T* __restrict v, const T* __restrict grad, Index n) {
#pragma omp simd
    for (Index i = 0; i < n; ++i) {
      T g = grad[i];
      if (r.decoupled) p[i] *= r.decay;
      else if (r.weight_decay != 0) g += r.weight_decay * p[i];
      m[i] = m[i] * r.b1 + (1 - r.b1) * g;
      v[i] = v[i] * r.b2 + (1 - r.b2) * g * g;
      const T denom = std::sqrt(v[i]) / r.bias2_sqrt + r.eps;
      p[i] -= r.step_size * (m[i] / denom);
    }
  }

  AdamOptions opt_;
  bool decoupled_;
  std::vector<std::vector<T>> m_, v_;
};

}  // namespace detail

template <class T>
class Adam : public detail::AdamBase<T> {
 public:
  using options_type = AdamOptions;

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
  using options_type = AdamWOptions;

  AdamW(std::vector<ParamRef<T>> params, const AdamWOptions& o)
      : detail::AdamBase<T>(std::move(params),
                            {.lr = o.lr, .beta1 = o.beta1, .beta2 = o.beta2, .eps = o.eps, .weight_decay = o.weight_decay},
                            true, "AdamW") {}
};

}  // namespace bnrelu::optim
