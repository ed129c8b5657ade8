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
	$(VENV)/bin/mypy routing comm moe launch

test: venv lint typecheck
	$(VENV)/bin/pytest -m "not gpu" -q

# The main job: a small MoE LM on the KJV Bible, 2 expert-parallel processes (gloo on
# CPU), a few minutes; everything it writes lands in runs/demo/ (run again: it resumes).
demo: venv
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc-per-node 2 -m launch.train experiment=demo

# The benchmarks of docs/BENCHMARKS.md that need no trained checkpoint (tens of minutes on
# 2 cores; run on a quiet machine). Each writes its raw output under docs/. Those on trained
# checkpoints (bench_generate, bench_serve, plan_check, compare_routing,
# distill_experiment) give their commands in docs/BENCHMARKS.md and docs/EXPERIMENTS.md.
bench: venv
	$(PY) scripts/bench_layer.py --json docs/bench_layer.json --plot docs/bench_layer.png
	$(PY) scripts/layer_anatomy.py --json docs/results/layer_anatomy.json
	$(PY) scripts/bench_grouped_mm.py --json docs/results/bench_grouped_mm.json
	$(PY) scripts/bench_int8.py --json docs/results/bench_int8.json
	$(PY) scripts/bench_train_step.py --rounds 7 --steps 3 --warmup 2 --json docs/results/train_step_ep1.json
	OMP_NUM_THREADS=1 $(PY) scripts/bench_dynamic.py --workload zipf --steps 60 --out docs/results/dynamic_zipf.json
	for size in 1048576 4194304; do OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc-per-node 2 \
	  scripts/bench_alltoall_overhead.py --bytes $$size --json docs/results/alltoall_overhead_$$size.json; done
	OMP_NUM_THREADS=1 $(PY) -m comm.bench --nproc 4 --ranks-per-node 2 --json docs/comm_bench_gloo_a.json
	OMP_NUM_THREADS=1 $(PY) -m comm.bench --nproc 4 --ranks-per-node 2 --json docs/comm_bench_gloo_b.json
	$(PY) -m comm.cost --calibrate docs/comm_bench_gloo_a.json --evaluate docs/comm_bench_gloo_b.json \
	  > docs/results/comm_cost_calibrated.txt

clean:
	rm -rf $(VENV) outputs runs wandb
