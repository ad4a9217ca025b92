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
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install vss with its dev tools

train: $(STAMP)  ## run the default training job (SegFormer MiT-B0 on the embedded synthetic videos)
	$(PY) -m vss.train $(ARGS)

test: $(STAMP)  ## run the test suite (slow checks excluded)
	$(PY) -m pytest -m "not slow" -q $(ARGS)

test-slow: $(STAMP)  ## run only the slow checks
	$(PY) -m pytest -m slow -q $(ARGS)

lint: $(STAMP)  ## ruff check and format check
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests

format: $(STAMP)  ## apply ruff fixes and formatting
	$(PY) -m ruff check --fix src tests
	$(PY) -m ruff format src tests

clean:  ## remove run outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache

bench: $(STAMP)  ## parameter counts and forward time per frame (SegFormer on MiT-B0, MiT-B1, ResNet-18; 240x432)
	$(PY) -m vss.bench -m encoder=mit_b0,mit_b1,resnet18 model=segformer height=240 width=432 iters=3 hydra.sweep.dir=outputs/bench/$$(date +%s) 2>&1 | grep '\[vss.bench\]'
