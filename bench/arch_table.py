"""The same benchmarks from two builds of bnrelu, side by side: the default build for the host
(-march=native) against the portable one (-march=x86-64-v3, AVX2 + FMA). Rounds alternate
between the builds; each cell is the median of the rounds' real times.

    cmake --preset release && cmake --build --preset release
    cmake -S . -B build/portable -G Ninja -DCMAKE_BUILD_TYPE=Release -DBNRELU_ARCH=x86-64-v3 \\
        -DBNRELU_BUILD_TESTS=OFF -DBNRELU_BUILD_EXAMPLES=OFF
    cmake --build build/portable --target bench_batchnorm_relu bench_training bench_inference bench_residual
    python3 bench/arch_table.py build/release/bench build/portable/bench --rounds 3
"""
import argparse
import collections
import json
import os
import statistics
import subprocess

from machine import cpu

# (binary, Google Benchmark filter): the fused kernels, the training step, inference, and the
# residual block, with the STREAM triad each binary measures
RUNS = [
    ("bench_batchnorm_relu", r"stream_triad|^(un)?fused/fwd\+bwd/(64|256)x64x28x28|^fused/(forward|backward)/64x64x28x28"),
    ("bench_training", r"training_step/batch:64/|eval_forward_folded/batch:(1|64)/|conv_algorithm/C:64/O:128"),
    ("bench_inference", r"^infer/"),
    ("bench_residual", r"bn_add_relu_fwd\+bwd/128x16|resnet20/train_step"),
]
UNIT_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}


def run(directory, binary, pattern):
    """[(name, ms)] and the ISA the build reports (bench/common.hpp)."""
    out = json.loads(subprocess.run([os.path.join(directory, binary), f"--benchmark_filter={pattern}",
                                     "--benchmark_min_time=0.5", "--benchmark_format=json"],
                                    capture_output=True, text=True, check=True).stdout)
    times = [(b["name"], b["real_time"] * UNIT_MS[b["time_unit"]]) for b in out["benchmarks"]]
    return times, out["context"].get("bnrelu_isa", "?")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("native", help="bench directory of the -march=native build")
    p.add_argument("portable", help="bench directory of the -march=x86-64-v3 build")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    times = collections.defaultdict(list)
    order = []
    isa = {}
    for _ in range(a.rounds):
        for build, directory in (("portable", a.portable), ("native", a.native)):
            for binary, pattern in RUNS:
                results, isa[build] = run(directory, binary, pattern)
                for name, ms in results:
                    if name not in order:
                        order.append(name)
                    times[(name, build)].append(ms)
    print(f"Machine: {cpu()}; builds: native = {isa['native']}, portable = {isa['portable']}; "
          f"medians of {a.rounds} alternating rounds\n")
    print("| benchmark | x86-64-v3 ms | native ms | native speed-up |")
    print("|---|---|---|---|")
    for name in order:
        v3, nat = statistics.median(times[(name, "portable")]), statistics.median(times[(name, "native")])
        print(f"| {name.removesuffix('/real_time')} | {v3:.3f} | {nat:.3f} | {v3 / nat:.2f}x |")


if __name__ == "__main__":
    main()
