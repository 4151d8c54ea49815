#!/usr/bin/env python3
"""Runs bench_training and bench/torch_training.py one after the other and prints the README's
tables: training and eval images/s side by side with PyTorch, the per-layer breakdown, Conv2d
against the in-binary GEMM, and the peak resident memory of a training process at batch 64.

    /usr/bin/python3 bench/training_table.py build/release/bench/bench_training

PyTorch runs with GLIBC_TUNABLES=glibc.malloc.mmap_max=0 (its faster malloc setting). Every
bnrelu cell is the median of 3 repetitions; every PyTorch cell the median of 5 timings.
"""
import json
import os
import resource
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TORCH_ENV = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.mmap_max=0")
PYTHON = "/usr/bin/python3"  # Debian's, which has python3-torch


def child_peak_rss_mib(cmd, env=None):
    """Peak RSS of one child process (ru_maxrss of RUSAGE_CHILDREN is a max over children, so
    each measurement runs in its own grandchild via a fresh python)."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL);"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    out = subprocess.run([PYTHON, "-c", code, *cmd], check=True, capture_output=True, text=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def main(binary):
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([binary, "--benchmark_repetitions=3", "--benchmark_report_aggregates_only=true",
                        "--benchmark_min_time=1", f"--benchmark_out={out.name}", "--benchmark_out_format=json"],
                       check=True, stdout=subprocess.DEVNULL)
        rows = json.load(open(out.name))["benchmarks"]
    med = {r["run_name"].replace("/real_time", ""): r for r in rows if r.get("aggregate_name") == "median"}
    torch_rows = [json.loads(line) for line in subprocess.run(
        [PYTHON, os.path.join(HERE, "torch_training.py")], check=True, capture_output=True, text=True,
        env=TORCH_ENV).stdout.splitlines()]
    torch = {(r["batch"], r["threads"]): r for r in torch_rows if "batch" in r}

    print("| batch | threads | bnrelu train img/s | PyTorch train img/s | ratio | bnrelu eval img/s | folded eval img/s | PyTorch eval img/s | ratio (folded) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch in (64, 256):
        for t in (1, 2):
            tr = med[f"training_step/batch:{batch}/threads:{t}"]["images/s"]
            ev = med[f"eval_forward/batch:{batch}/threads:{t}"]["images/s"]
            fo = med[f"eval_forward_folded/batch:{batch}/threads:{t}"]["images/s"]
            pt = torch[(batch, t)]
            print(f"| {batch} | {t} | {tr:.0f} | {pt['train_images_per_s']:.0f} | {tr / pt['train_images_per_s']:.2f}x | "
                  f"{ev:.0f} | {fo:.0f} | {pt['eval_images_per_s']:.0f} | {ev / pt['eval_images_per_s']:.2f}x "
                  f"({fo / pt['eval_images_per_s']:.2f}x) |")
    for batch in (64, 256):
        one = med[f"training_step/batch:{batch}/threads:1"]["images/s"]
        two = med[f"training_step/batch:{batch}/threads:2"]["images/s"]
        print(f"\nTraining step, 2 threads over 1 at batch {batch}: {two / one:.2f}x")

    parts = ["conv1", "bnrelu1", "pool1", "conv2", "bnrelu2", "pool2", "fc1", "bnrelu3", "fc2"]
    print("\nPer-layer time of one training step at batch 64, ms (forward / backward):\n")
    print("| layer | 1 thread | 2 threads |")
    print("|---|---|---|")
    b1, b2 = (med[f"step_breakdown/batch:64/threads:{t}"] for t in (1, 2))
    for p in parts:
        print(f"| {p} | {b1[p + '_fwd']:.2f} / {b1[p + '_bwd']:.2f} | {b2[p + '_fwd']:.2f} / {b2[p + '_bwd']:.2f} |")
    for p in ("loss", "sgd"):
        print(f"| {p} | {b1[p]:.2f} | {b2[p]:.2f} |")
    print(f"| step | {b1['real_time']:.1f} | {b2['real_time']:.1f} |")

    print("\nConv2d 64->128, 3x3, pad 1, 14x14, batch 64, against Eigen's GEMM of the same size "
          "(GFLOP/s; the convolution's count direct convolution's multiply-adds):\n")
    print("| threads | GEMM | conv forward | % of GEMM | conv backward | % of GEMM |")
    print("|---|---|---|---|---|---|")
    for t in (1, 2):
        g = med[f"gemm_128x576x12544/threads:{t}"]["GFLOP/s"]
        f = med[f"conv2_forward_64x64x14x14/threads:{t}"]["GFLOP/s"]
        b = med[f"conv2_backward_64x64x14x14/threads:{t}"]["GFLOP/s"]
        print(f"| {t} | {g:.1f} | {f:.1f} | {100 * f / g:.0f}% | {b:.1f} | {100 * b / g:.0f}% |")

    print("\nWinograd against im2col + GEMM, 3x3, pad 1, batch 64, one thread, ms (forward / backward):\n")
    print("| C -> O, H x W | im2col | Winograd | Winograd faster by |")
    print("|---|---|---|---|")
    shapes = sorted({tuple(int(part.split(":")[1]) for part in k.split("/")[1:4])
                     for k in med if k.startswith("conv_algorithm/")}, key=lambda s: (-min(s[0], s[1]), s[0] * s[1]))
    for c, o, hw in shapes:
        ms = {(w, b): med[f"conv_algorithm/C:{c}/O:{o}/HW:{hw}/winograd:{w}/backward:{b}"]["real_time"]
              for w in (0, 1) for b in (0, 1)}
        print(f"| {c} -> {o}, {hw} x {hw} | {ms[0, 0]:.2f} / {ms[0, 1]:.2f} | {ms[1, 0]:.2f} / {ms[1, 1]:.2f} | "
              f"{ms[0, 0] / ms[1, 0]:.2f}x / {ms[0, 1] / ms[1, 1]:.2f}x |")

    ours = child_peak_rss_mib([binary, "--benchmark_filter=training_step/batch:64/threads:1/"])
    theirs = child_peak_rss_mib([PYTHON, os.path.join(HERE, "torch_training.py"), "--batches", "64",
                                 "--threads", "1", "--min-time", "0.5"], env=TORCH_ENV)
    print(f"\nPeak resident memory of a training process at batch 64: bnrelu {ours:.0f} MiB, PyTorch {theirs:.0f} MiB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "build/release/bench/bench_training")
