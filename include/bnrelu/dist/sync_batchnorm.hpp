// SyncBatchNorm over MPI: the reducer that bnrelu::nn::BatchNorm calls to combine its
// statistics and backward sums across ranks.
#pragma once

#include <cstddef>
#include <vector>

#include "../nn/batchnorm.hpp"
#include "environment.hpp"

namespace bnrelu::dist {

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

}  // namespace bnrelu::dist
