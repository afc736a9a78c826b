#!/usr/bin/env bash
# Creates the second virtual environment at .venv-py312/ (Python 3.12, torch 2.14.1, megatron-core 0.19.2),
# so the Megatron tests also run against the newest megatron-core line (0.17+ needs Python >= 3.12).
# PyPI has no CPU-only torch wheel, so this is the CUDA build (~4.8 GB venv); it runs on CPU.
# torch is installed first and pinned so that no range in pyproject.toml picks another release.
# Python 3.12 comes from pyenv when `python3.12` is not on PATH as such.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_NO_CACHE_DIR=1  # no second copy of the wheels on disk (CI disks are small)
if [ -z "${PYTHON:-}" ]; then
    if python3.12 -V >/dev/null 2>&1; then
        PYTHON=python3.12
    else
        PYTHON=$(ls -d "$(pyenv root)"/versions/3.12*/bin/python3.12 | sort -V | tail -n 1)
    fi
fi
VENV=.venv-py312
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "torch==2.14.1" "megatron-core==0.19.2"
"$VENV/bin/pip" install --quiet -e ".[test]"
touch "$VENV/.installed"
