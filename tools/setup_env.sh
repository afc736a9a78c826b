#!/usr/bin/env bash
# Creates the main virtual environment at .venv/ (Python 3.11, CPU torch 2.13.0, megatron-core 0.16.1).
# torch is installed first and pinned so that no range in pyproject.toml pulls a multi-GB CUDA build;
# transformers is pinned with it: the demo trains its base model from scratch, and the README's table
# reproduces only with the library versions that measured it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_NO_CACHE_DIR=1  # no second copy of the wheels on disk (CI disks are small)
PYTHON=${PYTHON:-python3.11}
VENV=.venv
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "torch==2.13.0" "megatron-core==0.16.1" "transformers==5.24.0"
"$VENV/bin/pip" install --quiet -e ".[test,launch]"
touch "$VENV/.installed"
