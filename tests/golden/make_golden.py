#!/usr/bin/env python3
"""Writes the PyTorch golden fixtures that the C++ tests compare against.

Run with Debian's PyTorch (python3-torch, 1.13) from the repository root:
    /usr/bin/python3 tests/golden/make_golden.py
Every fixture is a small .safetensors file in float64: inputs, parameters, upstream gradients,
and PyTorch's outputs, input gradients, parameter gradients and running statistics. Layer
options travel in the file's metadata as JSON, so the C++ tests rebuild the same layer.
"""
import json
import math
import os
import struct

import numpy as np
import torch
import torch.nn as nn

OUT = os.path.dirname(os.path.abspath(__file__))
torch.manual_seed(1234)


def save(name, tensors, options):
    """safetensors by hand: u64 header length, JSON header, raw little-endian data."""
    header, blobs, offset = {}, [], 0
    for key, t in tensors.items():
        a = t.detach().cpu().contiguous().numpy()
        if a.dtype == np.float64:
            dtype = "F64"
        elif a.dtype == np.int64:
            dtype = "I64"
        else:
            raise TypeError(f"{key}: {a.dtype}")
        raw = a.astype(a.dtype.newbyteorder("<")).tobytes()
        header[key] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    header["__metadata__"] = {"options": json.dumps(options, sort_keys=True)}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(os.path.join(OUT, name + ".safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def f32(t):
    """Rounds to float precision, so float and double runs see the same inputs."""
    return t.float().double()


def rnd(*shape):
    return f32(torch.randn(*shape, dtype=torch.float64))


def rounded(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(f32(p))
    return module


def run(module, x, dy):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(dy)
    return y.detach(), x.grad.detach()


def conv_case(name, N, C, O, H, W, k, s, p, d, bias):
    m = rounded(nn.Conv2d(C, O, k, stride=s, padding=p, dilation=d, bias=bias).double())
    x = rnd(N, C, H, W)
    with torch.no_grad():
        yshape = m(x).shape
    dy = rnd(*yshape)
    y, dx = run(m, x, dy)
    t = {"x": x, "dy": dy, "y": y, "dx": dx, "weight": m.weight.detach(), "dweight": m.weight.grad}
    if bias:
        t.update(bias=m.bias.detach(), dbias=m.bias.grad)
    save(name, t, dict(in_channels=C, out_channels=O, kernel_size=k, stride=s, padding=p, dilation=d, bias=bias))


def linear_case(name, N, I, O, bias):
    m = rounded(nn.Linear(I, O, bias=bias).double())
    x, dy = rnd(N, I), rnd(N, O)
    y, dx = run(m, x, dy)
    t = {"x": x, "dy": dy, "y": y, "dx": dx, "weight": m.weight.detach(), "dweight": m.weight.grad}
    if bias:
        t.update(bias=m.bias.detach(), dbias=m.bias.grad)
    save(name, t, dict(in_features=I, out_features=O, bias=bias))


def batchnorm_case(name, shape, eps=1e-5, momentum=0.1, affine=True, track=True, steps=3, offset=0.0):
    """Three training steps (grads accumulate across them), then an eval forward."""
    C = shape[1]
    cls = nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d
    m = cls(C, eps=eps, momentum=momentum, affine=affine, track_running_stats=track).double()
    if affine:
        with torch.no_grad():
            m.weight.copy_(torch.linspace(-1.5, 2.0, C, dtype=torch.float64))  # negative and zero-crossing gammas
            m.bias.copy_(torch.linspace(-0.5, 0.7, C, dtype=torch.float64))
        rounded(m)
    t = {}
    if affine:
        t.update(weight=m.weight.detach().clone(), bias=m.bias.detach().clone())
    for step in range(steps):
        x = f32(rnd(*shape) * (1 + step) + offset)
        dy = rnd(*shape)
        y, dx = run(m, x, dy)
        t.update({f"x{step}": x, f"dy{step}": dy, f"y{step}": y, f"dx{step}": dx})
        yr, dxr = run(nn.Sequential(m, nn.ReLU()), x, dy)  # the pair, for the fused layers
        t.update({f"y_relu{step}": yr, f"dx_relu{step}": dxr})
    if affine:  # grads accumulated over the 2 * steps backward passes above
        t.update(dweight=m.weight.grad, dbias=m.bias.grad)
    if track:
        t.update(running_mean=m.running_mean.clone(), running_var=m.running_var.clone(),
                 num_batches_tracked=m.num_batches_tracked.clone().reshape(1))
    m.eval()
    xe = f32(rnd(*shape) + offset)
    with torch.no_grad():
        t.update(x_eval=xe, y_eval=m(xe), y_eval_relu=torch.relu(m(xe)))
    save(name, t, dict(num_features=C, eps=eps, momentum=momentum, affine=affine,
                       track_running_stats=track, steps=steps))


def maxpool_case(name, shape, k, s, p, ties):
    m = nn.MaxPool2d(k, stride=s, padding=p)
    x = rnd(*shape)
    if ties:
        x = torch.round(x * 1.5)  # many equal values: the first maximum must win
    with torch.no_grad():
        yshape = m(x).shape
    dy = rnd(*yshape)
    y, dx = run(m, x, dy)
    save(name, {"x": x, "dy": dy, "y": y, "dx": dx}, dict(kernel_size=k, stride=s, padding=p))


def relu_case(name, shape):
    x = rnd(*shape)
    x.view(-1)[::7] = 0.0  # the kink: derivative 0 at 0, as PyTorch
    dy = rnd(*shape)
    y, dx = run(nn.ReLU(), x, dy)
    save(name, {"x": x, "dy": dy, "y": y, "dx": dx}, {})


def cross_entropy_case(name, N, K):
    logits = f32(rnd(N, K) * 3)
    labels = torch.randint(0, K, (N,))
    z = logits.clone().requires_grad_(True)
    loss = nn.CrossEntropyLoss()(z, labels)
    loss.backward()
    save(name, {"logits": logits, "labels": labels, "loss": loss.detach().reshape(1), "dlogits": z.grad}, {})


def formula_fill(model):
    """Deterministic parameters that the C++ test recomputes bit for bit (see test_models.cpp)."""
    with torch.no_grad():
        for salt, (name, p) in enumerate(model.named_parameters()):
            i = np.arange(p.numel(), dtype=np.int64)
            u = ((i * 7919 + salt * 104729) % 2003) / 2003.0 - 0.5
            if p.dim() > 1:
                v = u * (2.0 / math.sqrt(p[0].numel()))
            elif name.split(".")[0] in ("1", "5", "10"):  # batch-norm weights
                v = 1.0 + 0.4 * u
            else:
                v = 0.4 * u
            p.copy_(torch.from_numpy(v).reshape(p.shape))


def seed_cnn(in_channels, classes):
    return nn.Sequential(
        nn.Conv2d(in_channels, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128 * 7 * 7, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, classes))


def seed_cnn_case(name, N, in_channels, classes, fc_row_stride=64):
    model = seed_cnn(in_channels, classes).double()
    formula_fill(model)
    x = f32(torch.rand(N, in_channels, 28, 28, dtype=torch.float64))
    labels = torch.randint(0, classes, (N,))
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    loss = nn.CrossEntropyLoss()(logits, labels)
    loss.backward()
    t = {"x": x, "labels": labels, "logits": logits.detach(), "loss": loss.detach().reshape(1), "dx": xg.grad}
    for pname, p in model.named_parameters():
        g = p.grad
        if pname == "9.weight":  # 512 x 6272: keep every fc_row_stride-th row
            g = g[::fc_row_stride]
        t["grad." + pname] = g
    for bname, b in model.named_buffers():
        t["buffer." + bname] = b.clone().reshape(-1) if b.dim() == 0 else b.clone()
    model.eval()
    x_eval = f32(torch.rand(N, in_channels, 28, 28, dtype=torch.float64))
    with torch.no_grad():
        t.update(x_eval=x_eval, logits_eval=model(x_eval))
    save(name, t, dict(in_channels=in_channels, num_classes=classes, fc_row_stride=fc_row_stride))


def optimizer_case(name, make, options, steps=5):
    """Parameters after each of several steps with given gradients."""
    p = torch.nn.Parameter(rnd(3, 4))
    t = {"p0": p.detach().clone()}
    opt = make([p])
    for k in range(steps):
        g = rnd(3, 4)
        p.grad = g.clone()
        opt.step()
        t[f"grad{k}"] = g
        t[f"p{k + 1}"] = p.detach().clone()
    save(name, t, dict(options, steps=steps))


def scheduler_case(name):
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    t = {}
    for kind, make in (("step", lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)),
                       ("cosine", lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=7, eta_min=0.01))):
        o = torch.optim.SGD([p], lr=0.2)
        sched = make(o)
        lrs = []
        for _ in range(10):
            lrs.append(o.param_groups[0]["lr"])
            o.step()
            sched.step()
        t[kind] = torch.tensor(lrs, dtype=torch.float64)
    save(name, t, {})


def avgpool_case(name, shape, k, s, p, count_include_pad):
    m = nn.AvgPool2d(k, stride=s, padding=p, count_include_pad=count_include_pad)
    x = rnd(*shape)
    with torch.no_grad():
        yshape = m(x).shape
    dy = rnd(*yshape)
    y, dx = run(m, x, dy)
    save(name, {"x": x, "dy": dy, "y": y, "dx": dx},
         dict(kernel_size=k, stride=s, padding=p, count_include_pad=count_include_pad))


def adaptive_avgpool_case(name, shape, out):
    m = nn.AdaptiveAvgPool2d(out)
    x = rnd(*shape)
    with torch.no_grad():
        yshape = m(x).shape
    dy = rnd(*yshape)
    y, dx = run(m, x, dy)
    save(name, {"x": x, "dy": dy, "y": y, "dx": dx}, dict(output_height=out[0], output_width=out[1]))


class Residual(nn.Module):
    """y = relu(main(x) + shortcut(x)): the module bnrelu's nn::Residual mirrors, state names included."""

    def __init__(self, main, shortcut=None):
        super().__init__()
        self.main = main
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x):
        return torch.relu(self.main(x) + self.shortcut(x))


def basic_main(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))


def down_block(cin, cout):
    return Residual(basic_main(cin, cout, 2),
                    nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout)))


def resnet20(in_channels, classes):
    """He et al. 2016, section 4.2, with projection shortcuts where the shape changes."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        Residual(basic_main(16, 16, 1)), Residual(basic_main(16, 16, 1)), Residual(basic_main(16, 16, 1)),
        down_block(16, 32), Residual(basic_main(32, 32, 1)), Residual(basic_main(32, 32, 1)),
        down_block(32, 64), Residual(basic_main(64, 64, 1)), Residual(basic_main(64, 64, 1)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))


def formula_fill_by_name(model):
    """Deterministic parameters that the C++ tests recompute bit for bit (formula_fill_by_name in
    tests/golden.hpp): weights of rank > 1 scaled by their fan-in, 1-D weights (batch norm) near 1,
    biases near 0; salt is the parameter's position in named_parameters()."""
    with torch.no_grad():
        for salt, (name, p) in enumerate(model.named_parameters()):
            i = np.arange(p.numel(), dtype=np.int64)
            u = ((i * 7919 + salt * 104729) % 2003) / 2003.0 - 0.5
            if p.dim() > 1:
                v = u * (2.0 / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                v = 1.0 + 0.4 * u
            else:
                v = 0.4 * u
            p.copy_(torch.from_numpy(v).reshape(p.shape))
    return model


def model_case(name, model, x, labels=None, dy=None, keep=None):
    """A training step's output, input gradient, parameter gradients and running statistics,
    then the eval output. Parameters come from formula_fill_by_name; every gradient is stored
    under its state_dict name, so the C++ test checks the names too. keep limits each stored
    gradient to its first values (ResNet-20's would otherwise be megabytes)."""
    model = formula_fill_by_name(model.double())
    t = {"x": x}
    xg = x.clone().requires_grad_(True)
    out = model(xg)
    if labels is not None:
        loss = nn.CrossEntropyLoss()(out, labels)
        loss.backward()
        t.update(labels=labels, loss=loss.detach().reshape(1))
    else:
        out.backward(dy)
        t["dy"] = dy
    t.update(y=out.detach(), dx=xg.grad)
    for pname, p in model.named_parameters():
        g = p.grad.reshape(-1)
        t["grad." + pname] = g[:keep] if keep else g
    for bname, b in model.named_buffers():
        t["buffer." + bname] = b.clone().reshape(-1) if b.dim() == 0 else b.clone()
    model.eval()
    with torch.no_grad():
        t["y_eval"] = model(x)
    save(name, t, dict(keep=keep or 0))


if __name__ == "__main__":
    conv_case("conv_basic", 2, 3, 4, 7, 5, 3, 1, 1, 1, True)
    conv_case("conv_stride2_c1", 1, 1, 2, 6, 9, 2, 2, 0, 1, True)
    conv_case("conv_stride3_pad2_dil2", 2, 2, 3, 9, 8, 3, 3, 2, 2, False)
    conv_case("conv_1x1", 3, 4, 5, 5, 4, 1, 1, 0, 1, True)
    linear_case("linear_basic", 5, 7, 3, True)
    linear_case("linear_nobias_n1", 1, 4, 6, False)
    batchnorm_case("bn2d_basic", (4, 3, 5, 6))
    batchnorm_case("bn2d_options", (2, 5, 3, 4), eps=1e-3, momentum=0.3)
    batchnorm_case("bn2d_noaffine", (3, 2, 4, 4), affine=False)
    batchnorm_case("bn2d_notrack", (3, 2, 4, 4), track=False)
    batchnorm_case("bn2d_offset", (4, 2, 3, 3), offset=1e4)
    # two values per channel: with a tiny eps the input gradient is pure cancellation (it is 0
    # for eps = 0), so a larger eps keeps it well conditioned
    batchnorm_case("bn2d_two_values", (2, 3, 1, 1), eps=0.1)
    batchnorm_case("bn1d_basic", (6, 5))
    batchnorm_case("bn1d_wide", (9, 70), momentum=0.5)
    relu_case("relu_4d", (2, 3, 4, 5))
    relu_case("relu_2d", (5, 6))
    maxpool_case("maxpool_2x2", (2, 3, 6, 8), 2, 2, 0, False)
    maxpool_case("maxpool_3s2p1_ties", (2, 2, 7, 5), 3, 2, 1, True)
    maxpool_case("maxpool_3s1p1_ties", (1, 3, 5, 6), 3, 1, 1, True)
    maxpool_case("maxpool_odd_floor", (2, 1, 7, 9), 2, 2, 0, True)
    cross_entropy_case("cross_entropy", 6, 5)
    seed_cnn_case("seed_cnn", 4, 1, 10)
    optim = torch.optim
    optimizer_case("sgd_plain", lambda ps: optim.SGD(ps, lr=0.1), dict(kind="sgd", lr=0.1))
    optimizer_case("sgd_momentum", lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
                   dict(kind="sgd", lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01))
    optimizer_case("sgd_nesterov", lambda ps: optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.001),
                   dict(kind="sgd", lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.001))
    optimizer_case("adam", lambda ps: optim.Adam(ps, lr=0.01), dict(kind="adam", lr=0.01))
    optimizer_case("adam_wd", lambda ps: optim.Adam(ps, lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
                   dict(kind="adam", lr=0.02, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1))
    optimizer_case("adamw", lambda ps: optim.AdamW(ps, lr=0.01, weight_decay=0.05),
                   dict(kind="adamw", lr=0.01, weight_decay=0.05))
    scheduler_case("schedulers")
    # added later, at the end so that earlier fixtures keep their random draws
    maxpool_case("maxpool_3s3_tiles_ties", (2, 2, 8, 10), 3, 3, 0, True)
    avgpool_case("avgpool_2x2", (2, 3, 6, 8), 2, 2, 0, True)
    avgpool_case("avgpool_3s2p1_include", (2, 2, 7, 5), 3, 2, 1, True)
    avgpool_case("avgpool_3s2p1_exclude", (2, 2, 7, 5), 3, 2, 1, False)
    avgpool_case("avgpool_3s1p1_exclude", (1, 3, 5, 6), 3, 1, 1, False)
    adaptive_avgpool_case("adaptive_avgpool_1x1", (3, 4, 5, 7), (1, 1))
    adaptive_avgpool_case("adaptive_avgpool_3x2", (2, 3, 7, 5), (3, 2))
    model_case("residual_identity", Residual(basic_main(4, 4, 1)), rnd(3, 4, 6, 5), dy=rnd(3, 4, 6, 5))
    model_case("residual_projection", down_block(3, 6), rnd(3, 3, 7, 6), dy=rnd(3, 6, 4, 3))
    model_case("resnet20", resnet20(1, 10), f32(torch.rand(4, 1, 12, 10, dtype=torch.float64)),
               labels=torch.randint(0, 10, (4,)), keep=64)
