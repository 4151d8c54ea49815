#!/usr/bin/env python3
"""ResNet-20 in PyTorch (the module of tests/golden/make_golden.py, the same as bnrelu's
models::resnet20): training step (zero_grad, forward, cross-entropy, backward; no optimizer, as
bench_residual's resnet20/train_step) and eval forward on N x 3 x 32 x 32; prints images/s
(median of repeated timings) as JSON lines.

Run with Debian's PyTorch (python3-torch):
    GLIBC_TUNABLES=glibc.malloc.mmap_max=0 /usr/bin/python3 bench/torch_resnet.py
"""
import argparse
import json
import os
import sys

import torch
from torch import nn

from timing import median_seconds

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden"))
from make_golden import resnet20  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds per measurement")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    torch.manual_seed(0)
    for threads in args.threads:
        torch.set_num_threads(threads)
        model = resnet20(3, 10)
        loss_fn = nn.CrossEntropyLoss()
        x = torch.rand(args.batch, 3, 32, 32) * 4 - 2
        labels = torch.arange(args.batch) % 10

        def step():
            model.zero_grad()
            loss_fn(model(x), labels).backward()

        def evaluate():
            with torch.no_grad():
                model(x)

        model.train()
        train = median_seconds(step, args.min_time)
        model.eval()
        ev = median_seconds(evaluate, args.min_time)
        print(json.dumps({"batch": args.batch, "threads": threads, "train_images_per_s": args.batch / train,
                          "eval_images_per_s": args.batch / ev}), flush=True)


if __name__ == "__main__":
    main()
