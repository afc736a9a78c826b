#!/usr/bin/env bash
# Creates the second virtual environment at .venv-py312/ (Python 3.12, torch 2.14.1, megatron-core 0.19.2),
# so the Megatron tests also run against the newest megatron-core line (0.17+ needs Python >= 3.12).
# PyPI has no CPU-only torch wheel, so this is the CUDA build (several GB); it runs on CPU.
# torch is installed first and pinned so that no range in pyproject.toml picks another release; transformers
# is pinned as in .venv/ (tools/setup_env.sh), so both lines test the same transformers.
# Python 3.12 comes from pyenv when `python3.12` is not on PATH as such.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/uv_install.sh
if [ -z "${PYTHON:-}" ]; then
    if python3.12 -V >/dev/null 2>&1; then
        PYTHON=python3.12
    else
        root=${PYENV_ROOT:-$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")}
        PYTHON=$(ls -d "$root"/versions/3.12*/bin/python3.12 2>/dev/null | sort -V | tail -n 1 || true)  # ls fails on no match
        [ -n "$PYTHON" ] || { echo "setup_env_py312.sh: no python3.12 on PATH and none under $root/versions; set PYTHON312=/path/to/python3.12" >&2; exit 1; }
    fi
fi
VENV=.venv-py312
# bin/pip, not bin/python: an interrupted `python -m venv` leaves the interpreter without pip.
[ -x "$VENV/bin/pip" ] || "$PYTHON" -m venv --clear "$VENV"
PINS=("torch==2.14.1" "megatron-core==0.19.2" "transformers==5.24.0")
uv_install "$VENV" "${PINS[@]}"
uv_install "$VENV" -e ".[test]" "${PINS[@]}"  # the pins again: a dependency wanting another version fails here, not silently moves them
touch "$VENV/.installed"
