# The commands the README gives. Each one does its own setup: `make quickstart` and `make test`
# work on a fresh clone (they create .venv and install torch first, then the package).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel by default; on a GPU cluster use e.g. TORCH_SPEC='torch==2.13.0' with the CUDA index.
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 2
QS_DATA := data/digits16
export OMP_NUM_THREADS ?= 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: setup quickstart shards train-quickstart test slurm-dev lint bench clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

setup: $(VENV)/.installed

shards: setup
	$(PY) -m data_prep make --source digits --out $(QS_DATA) --image-size 16 --channels 1 \
		--val-fraction 0.1 --max-per-shard 256

# The demo starts over each time (its MLflow runs accumulate in mlflow.db).
train-quickstart: shards
	rm -rf runs/quickstart
	$(VENV)/bin/deepspeed --num_gpus $(NPROC) --master_port $$($(PY) -c 'from trainer.distributed import free_port; print(free_port())') \
		trainer/main.py --config configs/quickstart.yaml --resume none $(QS_ARGS)

quickstart: train-quickstart
	@echo
	@echo "Done. Sample grid: runs/quickstart/samples/ (newest file). Look at the run with:"
	@echo "    $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db"

# Only CI (CI=true) changes the machine for the SLURM tests (apt, /etc/hosts); elsewhere they run on a
# cluster `make slurm-dev` set up, or skip with one line saying so.
test: setup
	$(PY) -m tests.slurm_harness ensure --if-ci
	$(PY) -m pytest -q

# Installs SLURM + MariaDB with apt, adds node1..node4 to /etc/hosts and starts a 4-node cluster (root).
slurm-dev: setup
	$(PY) -m tests.slurm_harness ensure

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Benchmarks write bench/results/*.json and *.md; run them on an otherwise idle machine.
bench: setup
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# The GPU check (bench/gpu_check.sh) runs on a GPU machine without network from a copy of the repo:
# `make gpu-wheels` puts the wheels it lacks (DeepSpeed, webdataset, pydantic, ...) in .whl/ beforehand.
.PHONY: gpu-wheels gpu-check
gpu-wheels: setup
	$(PY) bench/gpu_wheels.py --dest .whl

# Exits 2 at once without a visible GPU. Uses the machine's own python3 and torch, not the venv.
gpu-check:
	PYTHON="$(PYTHON)" bash bench/gpu_check.sh

clean:
	rm -rf runs data mlruns mlflow.db .pytest_cache
