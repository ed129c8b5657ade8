# Two commands a new user needs: `make demo` and `make test`. Both build .venv first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# On a machine without CUDA we pin the CPU build of torch (a looser pin would fetch a
# multi-GB CUDA build). Set TORCH_SPEC= (empty) to keep a torch you installed yourself.
TORCH_SPEC ?= torch==2.13.0
export OMP_NUM_THREADS ?= 2
export WANDB_MODE ?= offline
export DS_ACCELERATOR ?= cpu
export RAY_USAGE_STATS_ENABLED ?= 0
export PYTHONUNBUFFERED := 1

.PHONY: venv test lint typecheck demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy routing comm

test: venv lint typecheck
	$(VENV)/bin/pytest -m "not gpu" -q

demo: venv
	$(PY) scripts/bench_layer.py --quick

bench: venv
	$(PY) scripts/bench_layer.py --json docs/bench_layer.json

clean:
	rm -rf $(VENV) outputs runs wandb
