#!/usr/bin/env bash
# Creates the rollout-server environment at .venv-sglang/ (beside .venv/): SGLang 0.5.23 and
# sglang-router, which pin torch 2.14.1 and so cannot share the trainer's .venv (torch 2.13.0).
# The trainer starts the servers as subprocesses of .venv-sglang/bin/python (opsdc_megatron/rollout/sglang).
#
# On machines without CUDA the PyPI sgl-kernel wheel cannot be imported (it needs libcuda), yet SGLang's
# CPU path imports it at module level without calling it; the launcher then puts the stand-in package
# opsdc_megatron/rollout/sglang/cpu_stub/sgl_kernel first on the server's PYTHONPATH (see its docstring).
# Idempotent: a re-run with the stamp present and the same pins does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=.venv-sglang
PINS="sglang==0.5.23 sglang-router==0.3.2"
STAMP="$VENV/.installed"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$PINS" ]; then
    touch "$STAMP"
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "torch==2.14.1" $PINS
echo "$PINS" > "$STAMP"
