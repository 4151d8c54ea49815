#!/usr/bin/env python3
"""A checkpoint goes C++ -> PyTorch -> C++ and the eval logits stay the same.

1. train_mnist (C++) trains briefly and saves a safetensors checkpoint;
2. PyTorch loads it into the same nn.Sequential (strict), computes eval logits on the first
   test images and saves its state_dict back to safetensors;
3. predict (C++) loads PyTorch's file and computes the logits again.
Checks: C++ and PyTorch logits agree within 1e-5 (relative to the largest logit when it
exceeds 1), and the C++ logits before and after the
round trip are identical. Run from the build tree's parent with Debian's python3-torch:
    /usr/bin/python3 examples/checkpoint_roundtrip.py --bin build/release/examples [--model resnet20]
(resnet20: the module of tests/golden/make_golden.py, with attributes main and shortcut.)
"""
import argparse
import gzip
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn as nn

DTYPES = {"F32": (np.float32, torch.float32), "F64": (np.float64, torch.float64), "I64": (np.int64, torch.int64)}


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    data = raw[8 + n:]
    out = {}
    for name, e in header.items():
        b, end = e["data_offsets"]
        arr = np.frombuffer(data[b:end], dtype=DTYPES[e["dtype"]][0]).reshape(e["shape"])
        out[name] = torch.from_numpy(arr.copy())
    return out, meta


def write_safetensors(path, tensors, meta):
    header, blobs, offset = {"__metadata__": meta}, [], 0
    for name, t in tensors.items():
        a = t.detach().contiguous().numpy()
        dtype = {np.dtype("float32"): "F32", np.dtype("float64"): "F64", np.dtype("int64"): "I64"}[a.dtype]
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        blobs.append(a.tobytes())
        offset += a.nbytes
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def seed_cnn(classes):
    return nn.Sequential(
        nn.Conv2d(1, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128 * 7 * 7, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, classes))


def test_images(data, count):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte"):
        path = os.path.join(data, name)
        if os.path.exists(path):
            raw = (gzip.open if path.endswith(".gz") else open)(path, "rb").read()
            n, h, w = struct.unpack(">III", raw[4:16])
            pix = np.frombuffer(raw[16:16 + count * h * w], dtype=np.uint8).reshape(count, 1, h, w)
            return torch.from_numpy(pix.astype(np.float32) / 255.0)
    sys.exit(f"no t10k images in {data}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="build/release/examples")
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--model", default="seed", choices=["seed", "resnet20"])
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bnrelu_roundtrip_")
    cpp_ckpt, torch_ckpt = os.path.join(work, "cpp.safetensors"), os.path.join(work, "torch.safetensors")
    run = lambda *cmd: subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    run(os.path.join(args.bin, "train_mnist"), "--data", args.data, "--model", args.model, "--epochs", "1",
        "--max-steps", "40", "--save", cpp_ckpt, "--log", "")
    run(os.path.join(args.bin, "predict"), "--checkpoint", cpp_ckpt, "--data", args.data, "--count", str(args.count),
        "--out", os.path.join(work, "logits_cpp.safetensors"))

    state, meta = read_safetensors(cpp_ckpt)
    if args.model == "resnet20":
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden"))
        from make_golden import resnet20
        model = resnet20(1, int(meta["classes"]))
    else:
        model = seed_cnn(int(meta["classes"]))
    model.load_state_dict(state, strict=True)
    model.eval()
    x = (test_images(args.data, args.count) - float(meta["pixel_mean"])) / float(meta["pixel_std"])
    with torch.no_grad():
        logits_torch = model(x)
    write_safetensors(torch_ckpt, model.state_dict(), meta)

    run(os.path.join(args.bin, "predict"), "--checkpoint", torch_ckpt, "--data", args.data, "--count", str(args.count),
        "--out", os.path.join(work, "logits_cpp2.safetensors"))
    cpp1 = read_safetensors(os.path.join(work, "logits_cpp.safetensors"))[0]["logits"]
    cpp2 = read_safetensors(os.path.join(work, "logits_cpp2.safetensors"))[0]["logits"]
    diff = (cpp1 - logits_torch).abs().max().item() / max(1.0, logits_torch.abs().max().item())
    same = torch.equal(cpp1, cpp2)
    print(f"C++ vs PyTorch eval logits on {args.count} test images: max |difference| = {diff:.2e} "
          f"(relative to the largest logit, {logits_torch.abs().max().item():.2f}, when above 1)")
    print(f"C++ logits before and after the trip through PyTorch identical: {same}")
    ok = diff <= 1e-5 and same
    print("round trip OK" if ok else "round trip FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
