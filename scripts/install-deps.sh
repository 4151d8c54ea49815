#!/bin/sh
# Installs the Debian 12 packages bnrelu's build, tests, benchmarks and examples use.
# Needs root (or sudo). Fashion-MNIST comes as a package too (dataset-fashion-mnist).
#   scripts/install-deps.sh --bench   also the references the benchmarks compare with:
#   PyTorch 1.13 (python3-torch) and oneDNN 2.6 (libdnnl-dev, with the OpenCL files its CMake
#   package requires); configure again afterwards for bench_batchnorm_relu's oneDNN rows.
set -eu
BENCH=""
[ "${1:-}" = "--bench" ] && BENCH="python3-torch libdnnl-dev opencl-headers ocl-icd-opencl-dev"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
  build-essential cmake ninja-build pkg-config \
  libeigen3-dev nlohmann-json3-dev libcli11-dev zlib1g-dev \
  libgtest-dev libbenchmark-dev clang-14 libclang-rt-14-dev libomp-14-dev libopenmpi-dev openmpi-bin \
  libonnx-dev libprotobuf-dev dataset-fashion-mnist $BENCH >/dev/null
# ONNX Runtime for the ONNX export's tests, from the npm registry at the version the lock file
# pins. Its install script only fetches optional GPU files, so it does not run.
# Node.js and npm come from Debian unless the machine has them already.
command -v npm >/dev/null || $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
(cd "$(dirname "$0")/../tests/onnxruntime" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
