#!/usr/bin/env bash
# Creates the rollout-server environment at .venv-sglang/ (beside .venv/): SGLang 0.5.23 and
# sglang-router for CPU servers. The trainer starts the servers as subprocesses of .venv-sglang/bin/python
# (opsdc_megatron/rollout/sglang).
#
# SGLang's wheel pins torch 2.14.1 and a CUDA kernel stack (about 11 GB installed), which ran a CI
# disk out of space. Here it is installed without its dependencies, on the CPU torch 2.13.0 that the
# machine has on disk, with its CPU-side requirements listed in tools/sglang_cpu_requirements.txt
# (about 3.5 GB). On GPU clusters install SGLang as its own docs say (`pip install sglang==0.5.23`) and
# point `rollout.sglang.python` at that environment.
#
# SGLang's CPU path imports sgl_kernel and torchvision at module level without calling them; on CPU
# the launcher puts their stand-ins (opsdc_megatron/rollout/sglang/cpu_stub) first on the server's PYTHONPATH.
# Idempotent: a re-run with the stamp present and this script and the requirements unchanged does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=${VENV_SGLANG:-.venv-sglang}
PINS="$(cat tools/setup_sglang.sh tools/sglang_cpu_requirements.txt tools/uv_install.sh tools/pip_sources.py | sha1sum | cut -c1-12)"  # these scripts and the requirements
STAMP="$VENV/.installed"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$PINS" ]; then
    touch "$STAMP"
    exit 0
fi
source tools/uv_install.sh
# bin/pip, not bin/python: an interrupted `python -m venv` leaves the interpreter without pip.
[ -x "$VENV/bin/pip" ] || "$PYTHON" -m venv --clear "$VENV"
uv_install "$VENV" "torch==2.13.0"
uv_install "$VENV" --no-deps "sglang==0.5.23" "sglang-router==0.3.2"
uv_install "$VENV" -r tools/sglang_cpu_requirements.txt "torch==2.13.0"  # torch again: a requirement cannot move it
# Fails here, not in the first test, when a requirement SGLang's server imports is missing.
PYTHONPATH=opsdc_megatron/rollout/sglang/cpu_stub "$VENV/bin/python" -W ignore -c \
    "import sglang.srt.entrypoints.http_server, sglang_router"
echo "$PINS" > "$STAMP"
