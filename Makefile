# `make train` and `make test` set everything up on a fresh machine: a .venv, the CPU build of torch
# where the venv has none yet (override with TORCH_SPEC=...), then the project and its dependencies.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: setup train test test-slow test-all lint clean bench

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

train: setup
	$(BIN)/python src/train.py $(ARGS)

test: setup
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow $(ARGS)

test-all: setup
	$(BIN)/python -m pytest $(ARGS)

# training-step benchmark vs TRL's DPOTrainer (installs the `bench` extra once; ARGS="--quick", "--skip-trl", ...)
bench: setup
	$(BIN)/python -c "import trl" 2>/dev/null || $(BIN)/pip install -e ".[dev,bench]"
	$(BIN)/python benchmarks/bench_step.py $(ARGS)

lint: setup
	$(BIN)/ruff check src tests notebooks
	$(BIN)/ruff format --check src tests

clean:
	rm -rf logs/train logs/debug logs/generate .pytest_cache
