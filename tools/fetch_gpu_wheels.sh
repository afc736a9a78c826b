#!/usr/bin/env bash
# The wheels tools/gpu_checks.sh installs on a bare GPU image (Python 3.12 with torch, triton, transformers, rich,
# psutil and pytest, no network: ../.library/device/KINDS.md), the versions of .venv/, downloaded here into .whl/ (git-ignored; about 3 MB, carried to the machine).
#
#   bash tools/fetch_gpu_wheels.sh            # then, on the GPU machine: bash tools/gpu_checks.sh OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
pip=${PIP:-.venv/bin/pip}
mkdir -p .whl
"$pip" download -q --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
    megatron-core==0.19.2 omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 math-verify==0.9.0 latex2sympy2_extended==1.11.0
ls .whl
