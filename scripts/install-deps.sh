#!/bin/sh
# Installs the Debian 12 packages bnrelu's build, tests, benchmarks and examples use.
# Needs root (or sudo). Fashion-MNIST comes as a package too (dataset-fashion-mnist).
set -eu
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
  build-essential cmake ninja-build pkg-config \
  libeigen3-dev nlohmann-json3-dev libcli11-dev zlib1g-dev \
  libgtest-dev libbenchmark-dev clang-14 libclang-rt-14-dev libopenmpi-dev openmpi-bin \
  dataset-fashion-mnist >/dev/null
