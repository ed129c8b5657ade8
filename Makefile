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

# The main job: a small MoE LM on the KJV Bible, 2 expert-parallel processes (gloo on
# CPU), a few minutes; everything it writes lands in runs/demo/ (run again: it resumes).
demo: venv
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc-per-node 2 -m launch.train experiment=demo

# Benchmarks behind docs/BENCHMARKS.md (tens of minutes on 2 cores).
bench: venv
	$(PY) scripts/bench_layer.py --json docs/bench_layer.json --plot docs/bench_layer.png
	OMP_NUM_THREADS=1 $(PY) -m comm.bench --nproc 4 --ranks-per-node 2 --json runs/comm_bench.json

clean:
	rm -rf $(VENV) outputs runs wandb
