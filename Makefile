# The two set-up commands of the README: `make demo` and `make test`.
# Each creates the virtual environment at .venv/ on first use (tools/setup_env.sh).
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
VENV_SGLANG := .venv-sglang
STAMP_SGLANG := $(VENV_SGLANG)/.installed
# Every set-up script installs through these (uv, from the sources pip is configured with).
INSTALLER := tools/uv_install.sh tools/pip_sources.py

.PHONY: demo test env test-py312 env-py312 env-sglang

$(STAMP): pyproject.toml tools/setup_env.sh $(INSTALLER)
	PYTHON=$(PYTHON) bash tools/setup_env.sh

env: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/opsdc demo --out runs/demo

test: $(STAMP) $(STAMP_SGLANG)
	$(VENV)/bin/python -m pytest -m "not gpu" tests

# SGLang rollout servers run from their own environment, .venv-sglang/ (tools/setup_sglang.sh:
# SGLang 0.5.23 + sglang-router; it pins torch 2.14.1). The sglang tests (-m sglang) start real servers.
$(STAMP_SGLANG): tools/setup_sglang.sh tools/sglang_cpu_requirements.txt $(INSTALLER)
	PYTHON=$(PYTHON) bash tools/setup_sglang.sh

env-sglang: $(STAMP_SGLANG)

# The Megatron tests again on the newest megatron-core line: Python 3.12 (pyenv) with megatron-core
# 0.19.2 in .venv-py312/ (tools/setup_env_py312.sh; PYTHON312 empty = the newest pyenv 3.12).
# Not the stop-signal tests (-m stops): the stop handling is this project's own, megatron-core takes no
# part in it, and `make test` runs them (192 s of this line's 1240 s on a 2-core machine, 2026-11-28).
# Not the `opsdc train` layouts marked main_line either: tests/test_pipeline.py and tests/test_packing.py compare
# the same layouts at the model level on this line (115 s of its 936 s, 2026-11-29).
PYTHON312 ?=
VENV312 := .venv-py312
STAMP312 := $(VENV312)/.installed
MEGATRON_TESTS := tests/test_model_parity.py tests/test_opsdc_loop.py tests/test_kl.py tests/test_convert.py tests/test_pipeline.py tests/test_packing.py \
	tests/test_optimizer.py tests/test_sdpa_attention.py tests/test_teacher_offload.py tests/test_kl_fused.py tests/test_transformer_engine.py

$(STAMP312): pyproject.toml tools/setup_env_py312.sh $(INSTALLER)
	PYTHON=$(PYTHON312) bash tools/setup_env_py312.sh

env-py312: $(STAMP312)

test-py312: $(STAMP312)
	$(VENV312)/bin/python -m pytest -m "not gpu and not stops and not main_line" $(MEGATRON_TESTS)
