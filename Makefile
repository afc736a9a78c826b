# The two set-up commands of the README: `make demo` and `make test`.
# Each creates the virtual environment at .venv/ on first use (tools/setup_env.sh).
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test env

$(STAMP): pyproject.toml tools/setup_env.sh
	PYTHON=$(PYTHON) bash tools/setup_env.sh

env: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/opsdc demo --out runs/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not gpu" tests
