#!/usr/bin/env python3
"""ResNet-20 at batch 128 (N x 3 x 32 x 32): bnrelu's training step, eval forward and folded
inference (bench_residual's resnet20 rows: fuse_for_inference, then infer) next to PyTorch
1.13's training step and eval forward (bench/torch_resnet.py), run in alternating rounds so
that both see the same machine load; prints the medians over the rounds as a Markdown table,
with the CPU.

    /usr/bin/python3 bench/resnet_table.py build/release/bench/bench_residual [--rounds 5]

PyTorch runs with GLIBC_TUNABLES=glibc.malloc.mmap_max=0 (its faster malloc setting).
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile

from machine import cpu

HERE = os.path.dirname(os.path.abspath(__file__))
TORCH_ENV = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.mmap_max=0")
PYTHON = "/usr/bin/python3"  # Debian's, which has python3-torch


def bnrelu_round(binary):
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([binary, "--benchmark_filter=resnet20", "--benchmark_min_time=1",
                        f"--benchmark_out={out.name}", "--benchmark_out_format=json"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows = json.load(open(out.name))["benchmarks"]
    res = {}
    for r in rows:
        kind = "train" if "train_step" in r["name"] else "infer" if "/infer/" in r["name"] else "eval"
        res[(kind, int(r["threads"]))] = r["images_per_second"]
    return res


def torch_round():
    out = subprocess.run([PYTHON, os.path.join(HERE, "torch_resnet.py"), "--min-time", "2"], check=True,
                         capture_output=True, text=True, env=TORCH_ENV).stdout
    res = {}
    for line in out.splitlines():
        r = json.loads(line)
        res[("train", r["threads"])] = r["train_images_per_s"]
        res[("eval", r["threads"])] = r["eval_images_per_s"]
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    ours, theirs = {}, {}
    for _ in range(args.rounds):
        for k, v in bnrelu_round(args.binary).items():
            ours.setdefault(k, []).append(v)
        for k, v in torch_round().items():
            theirs.setdefault(k, []).append(v)
    print(f"CPU: {cpu()}; medians of {args.rounds} alternating rounds\n")
    print("| images/s, batch 128 | threads | bnrelu | PyTorch 1.13 | bnrelu / PyTorch |")
    print("|---|---|---|---|---|")
    for kind, label in (("train", "training step"), ("eval", "eval forward"),
                        ("infer", "inference (bnrelu folded, `infer`; PyTorch eval)")):
        for t in (1, 2):
            a = statistics.median(ours[(kind, t)])
            b = statistics.median(theirs[("eval" if kind == "infer" else kind, t)])
            print(f"| {label} | {t} | {a:.0f} | {b:.0f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
