# `make train` and `make test` set everything up on a fresh machine: a .venv, the CPU build of torch
# where the venv has none yet (override with TORCH_SPEC=...), then the project and its dependencies at the
# versions of constraints.txt (those the documented figures were made with).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: setup train test test-slow test-all lint clean bench notebook rehearse

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[dev]" -c constraints.txt
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

# training-step benchmark vs TRL's DPOTrainer (installs the `bench` extra once; ARGS="--quick", "--skip-trl",
# "--widths llava_1_5_7b --text-layers 1" for llava-1.5-7b's architecture at full width, ...)
bench: setup
	$(BIN)/python -c "import trl" 2>/dev/null || $(BIN)/pip install -e ".[dev,bench]" -c constraints.txt
	$(BIN)/python perf/bench_step.py $(ARGS)

# BPO end to end at llava-1.5-7b's widths on CPU (random weights, 1-3 decoder layers) against the memory plan;
# ARGS=--quick: 1-3 layers only (~15 min); one JSON line a run, the last with plan_error
rehearse: setup
	$(BIN)/python perf/rehearse.py $(ARGS)

# notebooks/analysis.ipynb run headless (installs the `notebook` extra once) on the newest training run and evaluation
# under logs/, or on BPO_RUN_DIR=<run folder> / BPO_REPORT=<report.json>; the executed copy, plots included, is written
# to logs/notebooks/ and its printed summary shown here
notebook: setup
	$(BIN)/python -c "import nbclient, ipykernel" 2>/dev/null || $(BIN)/pip install -e ".[dev,notebook]" -c constraints.txt
	mkdir -p logs/notebooks
	out="$(CURDIR)/logs/notebooks/analysis-$$(date +%Y-%m-%d_%H-%M-%S).ipynb"; \
	$(BIN)/jupyter execute notebooks/analysis.ipynb --output="$$out" && \
	$(BIN)/python -c "import nbformat, sys; [print(o.text, end='') for c in nbformat.read(sys.argv[1], 4).cells \
	    for o in c.get('outputs', []) if o.get('name') == 'stdout']; print('executed notebook:', sys.argv[1])" "$$out"

lint: setup
	$(BIN)/ruff check src tests notebooks perf
	$(BIN)/ruff format --check src tests perf

clean:
	rm -rf logs/train logs/debug logs/generate .pytest_cache
