#!/usr/bin/env python3
"""The seed CNN in PyTorch: training step (forward, cross-entropy, backward, SGD with momentum)
and eval forward, at the batches and threads of bench_training; prints images/s (median of
repeated timings) as JSON lines, plus the peak resident memory of a training run.

Run with Debian's PyTorch (python3-torch), with the faster malloc setting the issue names:
    GLIBC_TUNABLES=glibc.malloc.mmap_max=0 /usr/bin/python3 bench/torch_training.py
bench/training_table.py runs it next to bench_training.
"""
import argparse
import json
import resource

import torch
from torch import nn

from timing import median_seconds


def seed_cnn(classes=10):
    return nn.Sequential(
        nn.Conv2d(1, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128 * 7 * 7, 512), nn.BatchNorm1d(512), nn.ReLU(),
        nn.Linear(512, classes))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds per measurement")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    torch.manual_seed(0)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batches:
            model = seed_cnn()
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            loss_fn = nn.CrossEntropyLoss()
            x = torch.rand(batch, 1, 28, 28) * 4 - 2
            labels = torch.arange(batch) % 10

            def step():
                opt.zero_grad()
                loss_fn(model(x), labels).backward()
                opt.step()

            def evaluate():
                with torch.no_grad():
                    model(x)

            model.train()
            train = median_seconds(step, args.min_time)
            model.eval()
            ev = median_seconds(evaluate, args.min_time)
            print(json.dumps({"batch": batch, "threads": threads, "train_images_per_s": batch / train,
                              "eval_images_per_s": batch / ev}), flush=True)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


if __name__ == "__main__":
    main()
