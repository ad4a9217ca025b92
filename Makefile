# vss: `make train` and `make test` each work as the first command on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: help install train test test-slow lint format bench clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,export]'
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install vss with its dev tools and the export extra (ONNX)

train: $(STAMP)  ## run the default training job (SegFormer MiT-B0 on the embedded synthetic videos)
	$(PY) -m vss.train $(ARGS)

# Test processes (pytest-xdist, one test file per worker at a time): every test runs single-threaded, so one
# worker per core up to 4 (more would multiply the memory of the torch imports for little gain); JOBS=1: serial.
JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))
PYTEST_JOBS = $(if $(filter 1,$(JOBS)),,-n $(JOBS) --dist loadfile)

test: $(STAMP)  ## run the test suite (slow checks excluded; JOBS=N worker processes, default: cores up to 4)
	$(PY) -m pytest -m "not slow" -q $(PYTEST_JOBS) $(ARGS)

test-slow: $(STAMP)  ## run only the slow checks
	$(PY) -m pytest -m slow -q $(PYTEST_JOBS) $(ARGS)

lint: $(STAMP)  ## ruff check and format check
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests

format: $(STAMP)  ## apply ruff fixes and formatting
	$(PY) -m ruff check --fix src tests
	$(PY) -m ruff format src tests

clean:  ## remove run outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache

bench: $(STAMP)  ## streaming ms/frame, FLOPs, memory, ratio to the single-frame baseline (MRCFA-B1, MSAF-R18); an MRCFA-B1 training step (CPU-sized)
	$(PY) -m vss.bench model=mrcfa encoder=mit_b1 height=256 width=448 frames=12 iters=3 hydra.run.dir=outputs/bench/$$(date +%s)-mrcfa 2>&1 | grep '\[vss.bench\]'
	$(PY) -m vss.bench model=msaf encoder=resnet18 height=256 width=512 frames=8 iters=3 hydra.run.dir=outputs/bench/$$(date +%s)-msaf 2>&1 | grep '\[vss.bench\]'
	$(PY) -m vss.bench mode=train model=mrcfa encoder=mit_b1 stm.p=0.5 height=256 width=256 batch=1 iters=3 hydra.run.dir=outputs/bench/$$(date +%s)-mrcfa-train 2>&1 | grep '\[vss.bench\]'

.PHONY: test-slurm
test-slurm: $(STAMP)  ## the real-SLURM checks (tests/test_slurm.py; first: scripts/slurm-local.sh start); installs the extra slurm
	@$(PY) -c "import hydra_plugins.hydra_submitit_launcher" 2>/dev/null || $(PY) -m pip install --quiet -e '.[slurm]'
	$(PY) -m pytest tests/test_slurm.py -m slow -q -s $(ARGS)
