#!/usr/bin/env python3
"""Turns bench_batchnorm_relu's JSON output into the README's markdown table.

    build/release/bench/bench_batchnorm_relu --benchmark_repetitions=3 \
        --benchmark_report_aggregates_only=true --benchmark_out=bn.json --benchmark_out_format=json
    python3 bench/bn_relu_table.py bn.json
Every cell is a median over the repetitions; ratios come from the same run.
"""
import json
import sys


def main(path):
    rows = json.load(open(path))["benchmarks"]
    med = {}
    for r in rows:
        if r.get("aggregate_name") != "median":
            continue
        name = r["run_name"].replace("/real_time", "")
        med[name] = r
    triad = {t: med[f"stream_triad/{t}"]["bytes_per_second"] / 1e9 for t in (1, 2) if f"stream_triad/{t}" in med}
    print(f"STREAM triad in the same binary: {triad.get(1, 0):.1f} GB/s (1 thread), {triad.get(2, 0):.1f} GB/s (2 threads)\n")
    print("| shape | pass | threads | fused ms | unfused ms | fused / unfused | fused GB/s | % of triad | oneDNN nChw8c ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    shapes = ["64x64x28x28", "64x128x14x14", "256x64x28x28", "64x512", "1024x512"]
    for shape in shapes:
        for p in ("fwd+bwd", "forward", "backward", "eval"):
            for t in (1, 2):
                f = med.get(f"fused/{p}/{shape}/{t}")
                u = med.get(f"unfused/{p}/{shape}/{t}")
                d = med.get(f"onednn_nChw8c/{p}/{shape}/{t}")
                if not f or not u:
                    continue
                ms = lambda r: r["real_time"] if r["time_unit"] == "ms" else r["real_time"] / 1e3
                gbs = f["bytes_per_second"] / 1e9
                print(f"| {shape} | {p} | {t} | {ms(f):.3f} | {ms(u):.3f} | {ms(u) / ms(f):.2f}x | {gbs:.1f} | "
                      f"{100 * gbs / triad[t]:.0f}% | {ms(d):.3f} |" if d else
                      f"| {shape} | {p} | {t} | {ms(f):.3f} | {ms(u):.3f} | {ms(u) / ms(f):.2f}x | {gbs:.1f} | "
                      f"{100 * gbs / triad[t]:.0f}% | - |")
    mem = med.get("layer_memory/BatchNormReLU2d/64x64x28x28") or next(
        (r for r in rows if r["name"].startswith("layer_memory")), None)
    if mem:
        print(f"\nBatchNormReLU2d at 64x64x28x28 keeps {mem['kept_bytes'] / 2**20:.2f} MiB for backward "
              f"(input {mem['input_bytes'] / 2**20:.2f} MiB); the unfused pair keeps the input plus one byte per element.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bn.json")
