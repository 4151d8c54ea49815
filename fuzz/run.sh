#!/bin/sh
# Builds the libFuzzer targets (clang 14, ASan + UBSan) and runs each for SECONDS (default 60)
# from its committed seed corpus. New inputs go to build/fuzz/corpus_*, never into the repo.
# A crash leaves crash-* files in build/fuzz and makes this script fail.
#   fuzz/run.sh [SECONDS]
set -eu
secs=${1:-60}
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
out="$root/build/fuzz"
mkdir -p "$out"
find "$out" -maxdepth 1 \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) -delete
# the targets' scratch files go to $TMPDIR: keep them in the build tree
rm -rf "$out/tmp"
mkdir -p "$out/tmp"
export TMPDIR="$out/tmp"
cxx=${CXX_FUZZ:-clang++-14}
# the three builds side by side (fuzz_layers alone takes most of a minute)
pids=""
for t in idx safetensors layers; do
  echo "building fuzz_$t"
  $cxx -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
    -I"$root/include" -isystem /usr/include/eigen3 "$here/fuzz_$t.cpp" -lz -o "$out/fuzz_$t" &
  pids="$pids $!"
done
for p in $pids; do
  wait "$p" || { echo "a fuzz target failed to build" >&2; exit 1; }
done
for t in idx safetensors layers; do
  mkdir -p "$out/corpus_$t"
  echo "fuzzing $t for ${secs}s"
  (cd "$out" && "./fuzz_$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      "corpus_$t" "$here/corpus/$t" 2>&1 | grep -E "stat::number_of_executed_units|ERROR|crash|Done" || true)
  found=$(find "$out" -maxdepth 1 \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) -print)
  if [ -n "$found" ]; then
    echo "fuzz_$t found failing inputs (reproduce: build/fuzz/fuzz_$t FILE):" >&2
    echo "$found" >&2
    exit 1
  fi
done
echo "fuzzing: no crash, leak or timeout"
