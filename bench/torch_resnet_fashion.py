#!/usr/bin/env python3
"""PyTorch 1.13 trains the same ResNet-20 (tests/golden/make_golden.py's module) on Fashion-MNIST
with train_mnist --model resnet20's defaults: SGD lr 0.1, Nesterov momentum 0.9, weight decay
5e-4, cosine schedule stepped per batch over 10 epochs, batch 128, pixels normalised by the
training set's mean and std, and per image a random crop after zero padding by 4 and a
horizontal flip. Prints one line per epoch (test accuracy, training images/s).

    /usr/bin/python3 bench/torch_resnet_fashion.py [--epochs 10] [--threads 2] [--stop-after N]

--stop-after N trains the first N epochs of the --epochs schedule (the learning rate as in the
full run) and stops.
"""
import argparse
import gzip
import os
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden"))
from make_golden import resnet20  # noqa: E402


def idx(path):
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(folder, prefix):
    x = torch.from_numpy(idx(os.path.join(folder, prefix + "-images-idx3-ubyte.gz")).astype(np.float32) / 255)
    y = torch.from_numpy(idx(os.path.join(folder, prefix + "-labels-idx1-ubyte.gz")).astype(np.int64))
    return x.unsqueeze(1), y


def augment(batch, generator):
    """Per image: a 28x28 crop of the image zero-padded by 4, at a random offset; a random flip."""
    n, _, h, w = batch.shape
    padded = nn.functional.pad(batch, (4, 4, 4, 4))
    out = torch.empty_like(batch)
    offsets = torch.randint(0, 9, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    for i in range(n):
        dy, dx = offsets[i].tolist()
        img = padded[i, :, dy:dy + h, dx:dx + w]
        out[i] = img.flip(-1) if flips[i] else img
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stop-after", type=int, default=0, help="stop after this many epochs (0: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(1)
    xtr, ytr = load(args.data, "train")
    xte, yte = load(args.data, "t10k")
    mean, std = xtr.mean().item(), xtr.std(unbiased=False).item()
    model = resnet20(1, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = args.epochs * ((len(xtr) + 127) // 128)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(args.stop_after or args.epochs):
        model.train()
        order = torch.randperm(len(xtr), generator=gen)
        start = time.perf_counter()
        for b in range(0, len(xtr), 128):
            idx_b = order[b:b + 128]
            x = (augment(xtr[idx_b], gen) - mean) / std
            opt.zero_grad()
            loss_fn(model(x), ytr[idx_b]).backward()
            opt.step()
            sched.step()
        seconds = time.perf_counter() - start
        model.eval()
        correct = 0
        with torch.no_grad():
            for b in range(0, len(xte), 500):
                correct += (model((xte[b:b + 500] - mean) / std).argmax(1) == yte[b:b + 500]).sum().item()
        print(f"epoch {epoch + 1}/{args.epochs}: test acc {100 * correct / len(xte):.2f}% | "
              f"{seconds:.1f} s, {len(xtr) / seconds:.0f} img/s", flush=True)


if __name__ == "__main__":
    main()
