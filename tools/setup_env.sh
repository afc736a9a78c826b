#!/usr/bin/env bash
# Creates the main virtual environment at .venv/ (Python 3.11, torch 2.13.0, megatron-core 0.16.1), installed by uv
# (tools/uv_install.sh) from the sources pip is configured with. torch is the CPU build where those hold one (these
# project machines keep its wheel on disk), else PyPI's CUDA build.
# torch is installed first and pinned so that no range in pyproject.toml pulls a multi-GB CUDA build;
# transformers is pinned with it: the demo trains its base model from scratch, and the README's table
# reproduces only with the library versions that measured it.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/uv_install.sh
PYTHON=${PYTHON:-python3.11}
VENV=.venv
# bin/pip, not bin/python: an interrupted `python -m venv` leaves the interpreter without pip.
[ -x "$VENV/bin/pip" ] || "$PYTHON" -m venv --clear "$VENV"
PINS=("torch==2.13.0" "megatron-core==0.16.1" "transformers==5.24.0")
uv_install "$VENV" "${PINS[@]}"
uv_install "$VENV" -e ".[test,launch]" "${PINS[@]}"  # the pins again: a dependency wanting another version fails here, not silently moves them
touch "$VENV/.installed"
