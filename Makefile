# `make train` and `make test` set up .venv on first use, then run.
# torch is installed first and pinned (TORCH=...) so no other package pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.dllava-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup train test clean-logs

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

train: setup
	HF_HUB_OFFLINE=1 $(BIN)/python train.py $(ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-logs:
	rm -rf logs
