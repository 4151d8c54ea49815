"""Two versions of bnrelu timed side by side in one process: the headers of a git revision
(HEAD unless --base says otherwise) against the working tree's. Each is compiled with
bench/ab/cases.cpp into a shared library of its own (hidden visibility: the two versions of
the same templates never meet), one driver loads both, and Google Benchmark's random
interleaving runs their repetitions in random order, so that a shared machine's drift falls on
both versions alike. Prints each case's median and fastest repetition, and the working tree's
speed-up by both: on a shared machine, noise only adds time, so the minima often agree better.

    python3 bench/ab.py                                  # HEAD against the working tree
    python3 bench/ab.py --base HEAD~3 --filter resnet20 --repetitions 10 --threads 1

The cases use the public API only, so that they compile against both versions.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

from machine import cpu

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def compile_cases(prefix, include, out, arch):
    flags = shlex.split(subprocess.run(["pkg-config", "--cflags", "eigen3"], capture_output=True, text=True,
                                       check=True).stdout)
    return subprocess.Popen(["g++", "-O3", f"-march={arch}", "-std=gnu++20", "-fopenmp", "-DNDEBUG",
                             "-DEIGEN_DONT_PARALLELIZE", f"-DAB_PREFIX={prefix}", "-fPIC", "-shared",
                             "-fvisibility=hidden", "-fvisibility-inlines-hidden", f"-I{include}", *flags,
                             os.path.join(HERE, "ab", "cases.cpp"), "-o", out, "-lbenchmark", "-lz"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="HEAD", help="git revision whose include/ is the base (default HEAD)")
    p.add_argument("--filter", default=".", help="regular expression over case names")
    p.add_argument("--repetitions", type=int, default=15)
    p.add_argument("--min-time", type=float, default=0.2, help="seconds each repetition runs at least")
    p.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    p.add_argument("--arch", default="native", help="-march of both builds")
    a = p.parse_args()
    out = os.path.join(ROOT, "build", "ab")
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory() as base:
        archive = subprocess.run(["git", "-C", ROOT, "archive", a.base, "include"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", base], input=archive.stdout, check=True)
        builds = [compile_cases("base", os.path.join(base, "include"), os.path.join(out, "libab_base.so"), a.arch),
                  compile_cases("work", os.path.join(ROOT, "include"), os.path.join(out, "libab_work.so"), a.arch)]
        if any([b.wait() for b in builds]):  # both waited for
            sys.exit("bench/ab.py: a version failed to compile (the cases use the public API of both)")
    driver = os.path.join(out, "ab")
    subprocess.run(["g++", "-O2", "-std=gnu++20", os.path.join(HERE, "ab", "main.cpp"), "-o", driver, f"-L{out}",
                    "-lab_base", "-lab_work", "-lbenchmark", "-lpthread", f"-Wl,-rpath,{out}"], check=True)
    pattern = f"^(base|work)/.*({a.filter})"
    run = subprocess.run([driver, f"--ab_threads={a.threads}", f"--benchmark_filter={pattern}",
                          f"--benchmark_repetitions={a.repetitions}", f"--benchmark_min_time={a.min_time}",
                          "--benchmark_enable_random_interleaving=true", "--benchmark_format=json"],
                         capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"bench/ab.py: the driver failed:\n{run.stderr}")
    times = {}  # case -> version -> [ms of each repetition]
    for b in json.loads(run.stdout)["benchmarks"]:
        if b.get("run_type") == "iteration":
            version, case = b["run_name"].split("/", 1)
            times.setdefault(case.removesuffix("/real_time"), {}).setdefault(version, []).append(b["real_time"])
    print(f"Machine: {cpu()}; -march={a.arch}; base = {a.base}, work = the working tree; "
          f"{a.repetitions} repetitions of each, interleaved at random\n")
    print("| case | base ms, median (min) | work ms, median (min) | work speed-up, medians (minima) |")
    print("|---|---|---|---|")
    for case in sorted(times):
        t = times[case]
        if "base" not in t or "work" not in t:
            continue
        b, w = t["base"], t["work"]
        print(f"| {case} | {statistics.median(b):.3g} ({min(b):.3g}) | {statistics.median(w):.3g} ({min(w):.3g}) | "
              f"{statistics.median(b) / statistics.median(w):.2f}x ({min(b) / min(w):.2f}x) |")


if __name__ == "__main__":
    main()
