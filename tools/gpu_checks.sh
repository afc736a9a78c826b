#!/usr/bin/env bash
# Every GPU check that needs neither Transformer Engine nor a CUDA SGLang, in one go on one GPU, in the order
# the open GPU-only targets need them: bench/kl.py at T = 8192 (the tables, then its --profile of ours and
# fused), the tests in tests/gpu (each skips with its reason what this machine lacks), then bench/step.py.
# Logs go to OUT_DIR (default gpu_checks/; on the device tool pass "$OUT", the folder that comes back), with
# run.txt naming the date, commit (OPSDC_COMMIT where the copy has no .git), GPU and versions.
#
#   bash tools/gpu_checks.sh [OUT_DIR]
#
# The time limits add up to 570 s, inside the device tool's 600 s per command. On an H200 (2026-11-29) the whole
# bench/kl.py took about 40 s and its profile 10 s, while tests/gpu ran past 120 s: most of the time goes to the tests.
#
# On a machine whose Python lacks the project's packages (a bare GPU image), put their wheels in
# .whl/ (tools/fetch_gpu_wheels.sh: megatron-core, omegaconf, antlr4, math-verify, latex2sympy2_extended): they
# are installed into /tmp/opsdc_site and put on PYTHONPATH, leaving the machine's Python as it is.
set -uo pipefail
out=$(realpath -m "${1:-gpu_checks}")
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the package itself, for the benches
if compgen -G ".whl/*.whl" > /dev/null && ! "$python" -c "import megatron.core, omegaconf, math_verify" 2> /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --upgrade --target /tmp/opsdc_site .whl/*.whl || { echo "gpu_checks.sh: installing .whl/ failed" >&2; exit 2; }
    export PYTHONPATH=/tmp/opsdc_site:$PYTHONPATH
fi
{
    date -u +%Y-%m-%dT%H:%MZ
    echo "commit ${OPSDC_COMMIT:-$(git rev-parse --short HEAD 2> /dev/null || echo "unknown: no .git here, set OPSDC_COMMIT")}"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$python" -c "import torch, triton, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'megatron-core', m.__version__)"
} 2>&1 | tee "$out/run.txt"
status=0
timeout 90 "$python" bench/kl.py --tokens 8192 --reps 5 2>&1 | tee "$out/kl.log" || status=1
# Where the unfused and the fused steps spend their time: kernel by kernel, and how much of it no kernel ran
timeout 40 "$python" bench/kl.py --tokens 8192 --profile ours fused 2>&1 | tee "$out/kl_profile.log" || status=1
timeout 310 "$python" -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" || status=1
timeout 130 "$python" bench/step.py --dtype bf16 --hidden 4096 --vocab 151936 --layers 8 --sequences 16 \
    --response-tokens 1024 --micro-batch 4 --reps 3 2>&1 | tee "$out/step.log" || status=1
exit $status
