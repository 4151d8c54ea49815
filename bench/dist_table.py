#!/usr/bin/env python3
"""Runs bench_dist in three layouts of this machine's two cores (1 rank x 1 thread, 1 rank x 2
threads, 2 ranks x 1 thread; global batch 64) and prints the README's table and a cost model of
the step time at 8, 64 and 256 ranks.

    python3 bench/dist_table.py build/release/bench/bench_dist

"reduce ms/step" is the time in the gradient reduction: with the shared step
(DataParallel::backward_and_step on one machine) it includes the optimizer step, which is then
split between the ranks; with MPI_Allreduce it does not (every rank then steps all parameters).

The cost model keeps 64 images per rank, one rank per node (weak scaling) and adds a ring allreduce of the
gradient bytes, 2 (P-1)/P * bytes / bandwidth + 2 (P-1) * latency, for two networks, plus the
SyncBatchNorm collectives (6 small ones per step, by recursive doubling: log2 P latencies each;
the statistics allgather moves (P-1) * (1 + 2C) doubles to every rank).
"""
import json
import math
import os
import subprocess
import sys
import tempfile

NETWORKS = [("10 GbE", 1.25e9, 20e-6), ("100 Gb/s InfiniBand", 12.5e9, 2e-6)]
BN_CHANNELS = [64, 128, 512]  # the seed CNN's batch norms


def run(binary, ranks, threads):
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(ranks)]
        if threads > 1:
            cmd += ["--bind-to", "none"]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        subprocess.run(cmd + [binary, "--benchmark_report_aggregates_only=true", f"--benchmark_out={out.name}",
                              "--benchmark_out_format=json"], check=True, stdout=subprocess.DEVNULL, env=env)
        rows = json.load(open(out.name))["benchmarks"]
    return {"/".join(r["run_name"].split("/")[:2]): r for r in rows if r.get("aggregate_name") == "median"}


def main(binary):
    one = run(binary, 1, 1)
    two_threads = run(binary, 1, 2)
    two_ranks = run(binary, 2, 1)
    shared = "data_parallel_step/global_batch:64"
    copied, plain = "data_parallel_step_copied_weights/global_batch:64", "data_parallel_step_allreduce/global_batch:64"
    base = one[shared]["images/s"]
    print("| layout (global batch 64) | images/s | vs 1 x 1 | reduce ms/step | gradient MB/step (per rank) |")
    print("|---|---|---|---|---|")
    for name, r in (("1 rank x 1 thread", one[shared]), ("1 rank x 2 threads", two_threads[shared]),
                    ("2 ranks x 1 thread (batch 32 each): shared weights, shared step", two_ranks[shared]),
                    ("2 ranks x 1 thread: a copy of the weights each, shared step", two_ranks[copied]),
                    ("2 ranks x 1 thread: MPI_Allreduce, then a whole step each", two_ranks[plain])):
        print(f"| {name} | {r['images/s']:.0f} | {r['images/s'] / base:.2f}x | {r['reduce_ms']:.2f} | {r['gradient_MB']:.1f} |")
    half = one["data_parallel_step/global_batch:32"]["images/s"]
    print(f"\nOne rank alone at batch 32 (a rank's share of the work, no communication): {half:.0f} images/s, "
          f"so two ranks could reach at most {2 * half / base:.2f}x.")

    step_64 = 64 / base  # seconds per step of 64 images on one core
    grad_bytes = two_ranks[shared]["gradient_MB"] * 1e6
    print(f"\nCost model, 64 images per rank per step (one core each: {1e3 * step_64:.1f} ms of compute), "
          f"{grad_bytes / 1e6:.1f} MB of gradients allreduced per step:\n")
    print("| ranks | network | allreduce ms | SyncBN ms | step ms | images/s | efficiency |")
    print("|---|---|---|---|---|---|---|")
    for p in (8, 64, 256):
        for net, bw, lat in NETWORKS:
            ring = 2 * (p - 1) / p * grad_bytes / bw + 2 * (p - 1) * lat
            # per batch norm, small messages by recursive doubling (log2 P steps): an allgather of
            # (1 + 2C) doubles from every rank, and an allreduce of 2C doubles
            steps = math.log2(p)
            bn = sum(steps * lat + (p - 1) * (1 + 2 * c) * 8 / bw + steps * (lat + 16 * c / bw) for c in BN_CHANNELS)
            step = step_64 + ring + bn
            print(f"| {p} | {net} | {1e3 * ring:.1f} | {1e3 * bn:.2f} | {1e3 * step:.1f} | {64 * p / step:.0f} | "
                  f"{step_64 / step:.0%} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "build/release/bench/bench_dist")
