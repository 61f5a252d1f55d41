# `make train` and `make test` set up .venv on first use, then run.
# torch is installed first and pinned (TORCH=...) so no other package pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
LMMS_EVAL ?= 0.7.3
BIN := $(VENV)/bin
STAMP := $(VENV)/.dllava-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup train test clean-logs

setup: $(STAMP)

# lmms-eval goes in last and without its own requirements: its wheel pins wandb==0.25.0 (ours: 0.31.0)
# and requires torchvision, whose only build for torch 2.13 on the index is a CUDA one that breaks
# transformers' image processors; the [lmms] extra holds what its evaluator imports. (`pip check` lists
# lmms-eval's other requirements as missing; nothing here needs them.)
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,lmms]"
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps "lmms-eval==$(LMMS_EVAL)"
	touch $(STAMP)

train: setup
	HF_HUB_OFFLINE=1 $(BIN)/python train.py $(ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-logs:
	rm -rf logs
