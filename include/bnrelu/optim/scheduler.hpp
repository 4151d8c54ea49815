// Learning-rate schedules, stepped once per epoch, with PyTorch's closed forms.
#pragma once

#include <cmath>
#include <numbers>

#include "optimizer.hpp"

namespace bnrelu::optim {

// lr = base_lr * gamma^(epoch / step_size)
template <class T>
class StepLR {
 public:
  StepLR(Optimizer<T>& opt, std::int64_t step_size, double gamma = 0.1)
      : opt_(&opt), base_(opt.lr()), step_size_(step_size), gamma_(gamma) {
    if (step_size < 1) throw shape_error("StepLR: step_size must be >= 1");
  }
  // Sets the rate for the given epoch (0-based) and returns it.
  double set_epoch(std::int64_t epoch) {
    opt_->set_lr(base_ * std::pow(gamma_, static_cast<double>(epoch / step_size_)));
    return opt_->lr();
  }

 private:
  Optimizer<T>* opt_;
  double base_;
  std::int64_t step_size_;
  double gamma_;
};

// lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / t_max)) / 2
template <class T>
class CosineAnnealingLR {
 public:
  CosineAnnealingLR(Optimizer<T>& opt, std::int64_t t_max, double eta_min = 0)
      : opt_(&opt), base_(opt.lr()), t_max_(t_max), eta_min_(eta_min) {
    if (t_max < 1) throw shape_error("CosineAnnealingLR: t_max must be >= 1");
  }
  double set_epoch(std::int64_t epoch) {
    const double c = std::cos(std::numbers::pi * static_cast<double>(epoch) / static_cast<double>(t_max_));
    opt_->set_lr(eta_min_ + (base_ - eta_min_) * (1 + c) / 2);
    return opt_->lr();
  }

 private:
  Optimizer<T>* opt_;
  double base_;
  std::int64_t t_max_;
  double eta_min_;
};

}  // namespace bnrelu::optim
