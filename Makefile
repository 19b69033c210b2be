# asyncckpt — two commands on a fresh machine: `make demo` and `make test`.
PYTHON     ?= python3
VENV       ?= .venv
# Pinned so a fresh machine gets the local CPU build; override for CUDA, e.g.
#   make test TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv demo test bench bench-smoke clean lint

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/train_demo.py --out .demo_ckpt --steps 60 --save-every 10

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench-deps: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"

bench: bench-deps
	$(BIN)/python -m benchmarks --config benchmarks/configs/gpt_1p5gb.yaml

clean:
	rm -rf $(VENV) .demo_ckpt .pytest_cache build *.egg-info
