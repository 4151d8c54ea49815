#!/usr/bin/env python3
"""PyTorch's BatchNorm2d/1d + ReLU, training forward+backward, forward and eval, at the shapes of
bench_batchnorm_relu, for 1 and 2 threads; prints the median of repeated timings in ms.

Run with Debian's PyTorch (python3-torch):  /usr/bin/python3 bench/torch_bn_relu.py
"""
import torch

from timing import median_seconds

SHAPES = [(64, 64, 28, 28), (64, 128, 14, 14), (256, 64, 28, 28), (64, 512), (1024, 512)]


def median_ms(fn):
    return median_seconds(fn, 0.5) * 1e3


def main():
    print(f"torch {torch.__version__}")
    print(f"{'shape':>14} {'threads':>7} {'fwd+bwd':>9} {'forward':>9} {'eval':>9}  (ms, median)")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for shape in SHAPES:
            C = shape[1]
            bn = (torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d)(C)
            model = torch.nn.Sequential(bn, torch.nn.ReLU())
            x = torch.randn(*shape, requires_grad=True)
            dy = torch.randn(*shape)

            def fwd_bwd():
                model.train()
                y = model(x)
                y.backward(dy)

            def fwd():
                model.train()
                with torch.no_grad():
                    model(x)

            def ev():
                model.eval()
                with torch.no_grad():
                    model(x)

            name = "x".join(map(str, shape))
            print(f"{name:>14} {threads:>7} {median_ms(fwd_bwd):9.3f} {median_ms(fwd):9.3f} {median_ms(ev):9.3f}", flush=True)


if __name__ == "__main__":
    main()
