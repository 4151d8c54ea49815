#!/usr/bin/env python3
"""The seed CNN's inference after fuse_for_inference: bnrelu's const path (bench_inference's
infer rows) next to ONNX Runtime 1.30 running the same model exported by bnrelu
(tests/onnxruntime/run_ort.js on onnxruntime-node, CPU execution provider), at batch 64
(images/s) and batch 1 (latency), on 1 and 2 threads, in alternating rounds so that both see the
same machine load; prints the medians as a Markdown table, with the CPU.

    scripts/install-deps.sh   # once: ONNX Runtime into tests/onnxruntime
    python3 bench/inference_table.py build/release/bench/bench_inference [--rounds 3]
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile

from machine import cpu

HERE = os.path.dirname(os.path.abspath(__file__))
RUN_ORT = os.path.join(HERE, "..", "tests", "onnxruntime", "run_ort.js")
CONFIGS = [(64, 1), (64, 2), (1, 1), (1, 2)]  # (batch, threads)


def bnrelu_round(binary):
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([binary, "--benchmark_filter=^infer/", "--benchmark_min_time=2",
                        f"--benchmark_out={out.name}", "--benchmark_out_format=json"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows = json.load(open(out.name))["benchmarks"]
    res = {}
    for r in rows:
        _, threads, batch, _ = r["name"].split("/")
        res[(int(batch), int(threads))] = r["items_per_second"]
    return res


def ort_round(model):
    res = {}
    for batch, threads in CONFIGS:
        out = subprocess.run(["node", RUN_ORT, model, "--bench", f"{batch}x1x28x28", str(threads), "2"],
                             check=True, capture_output=True, text=True).stdout.split()
        res[(batch, threads)] = float(out[out.index("images_per_s") + 1])
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ours, theirs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "seed_cnn.onnx")
        subprocess.run([args.binary, "--export-onnx", model], check=True)
        for _ in range(args.rounds):
            for k, v in bnrelu_round(args.binary).items():
                ours.setdefault(k, []).append(v)
            for k, v in ort_round(model).items():
                theirs.setdefault(k, []).append(v)
    print(f"CPU: {cpu()}; medians of {args.rounds} alternating rounds\n")
    print("| batch | threads | bnrelu images/s | ONNX Runtime images/s | bnrelu / ORT | bnrelu ms | ORT ms |")
    print("|---|---|---|---|---|---|---|")
    for batch, threads in CONFIGS:
        a, b = statistics.median(ours[(batch, threads)]), statistics.median(theirs[(batch, threads)])
        print(f"| {batch} | {threads} | {a:.0f} | {b:.0f} | {a / b:.2f}x | {1000 * batch / a:.3f} | {1000 * batch / b:.3f} |")


if __name__ == "__main__":
    main()
