// Data-parallel training over MPI: one process (rank) per replica, each on its own shard of
// every batch. Optional: link bnrelu::dist (CMake -DBNRELU_WITH_MPI=ON); the core library
// includes no MPI.
//
//   bnrelu::dist::Environment mpi(&argc, &argv);
//   auto model = bnrelu::models::seed_cnn<float>(1, 10);
//   bnrelu::dist::DataParallel ddp(model);     // broadcasts rank 0's state; SyncBatchNorm
//   opt.zero_grad(); loss.forward(model.forward(x), y);
//   ddp.backward_params(loss.backward());      // backward + bucketed allreduce; then opt.step()
//
// One header per job: environment.hpp (MPI, rank, size), sync_batchnorm.hpp (the reducer of
// SyncBatchNorm), node_shared.hpp (sums through node-shared memory), gradient_averager.hpp
// (gradient averaging and the shared optimizer step), data_parallel.hpp (DataParallel).
#pragma once

#include "data_parallel.hpp"
#include "environment.hpp"
#include "gradient_averager.hpp"
#include "node_shared.hpp"
#include "sync_batchnorm.hpp"
