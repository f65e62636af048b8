#!/usr/bin/env bash
# What a GPU run of benchmarks/gpu.sh needs, packed into .gpu/ on the development machine (carry .gpu
# with the device call; it is git-ignored): ../shared/device/pack.sh's Ray + Optuna + EMNIST files,
# plus pytest's pure-Python wheels (the GPU machine has no pytest) so the CUDA-only tests run there.
#   bash benchmarks/gpu_pack.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .gpu/site.tar.xz ] && [ -d .gpu/emnist ] || ../shared/device/pack.sh
rm -rf .gpu/pytest
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
  --dest .gpu/pytest pytest pluggy iniconfig packaging pygments 2>&1 | grep -v "is ignored" || true
ls .gpu/pytest
du -sh .gpu  # the device call carries at most 64 MiB, checkout included
