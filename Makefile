# asyncckpt — two commands on a fresh machine: `make demo` and `make test`.
# Another interpreter or torch build gets its own virtual environment, e.g.
#   make test PYTHON=python3.12 VENV=.venv-py312 TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"
PYTHON     ?= python3
VENV       ?= .venv
# Pinned so a fresh machine gets the local CPU build; override for CUDA (as above).
TORCH_SPEC ?= torch==2.13.0
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.installed
# The TORCH_SPEC the stamp was made with: a different one for an existing VENV reinstalls torch.
SPEC       := $(VENV)/.spec
PYTEST_ARGS ?=
# `make test` spreads the test files over this many processes (pytest-xdist; each file stays in one process).
TEST_WORKERS ?= 2
# Optional integrations installed for the tests (their tests skip without them): `make test EXTRAS=` for none.
EXTRAS     ?= export,lightning,transformers,deepspeed,s3,test-s3
# The modules of tests/reliability.py's MODULES.
RELIABILITY_TESTS := tests/test_crash.py tests/test_power_loss.py tests/test_faults.py tests/test_corruption.py tests/test_hostile.py \
                     tests/test_pickle_policy.py

.PHONY: venv demo test test-service reliability bench-deps bench bench-cpu bench-many-small bench-service bench-integrations bench-gpu clean FORCE

venv: $(STAMP)

$(SPEC): FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH_SPEC)' | cmp -s - $@ || echo '$(TORCH_SPEC)' > $@

$(STAMP): pyproject.toml Makefile $(SPEC)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/.torch-pin
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet -c $(VENV)/.torch-pin -e ".[dev,$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/train_demo.py --out .demo_ckpt --steps 60 --save-every 10

# Never writes a tracked file (docs/RELIABILITY.md is `make reliability`'s).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The suite with writer.mode service as every saver's default (ASYNCCKPT_WRITER_MODE); the tests marked
# thread_only are skipped, each with its reason (-rs lists them).
test-service: $(STAMP)
	ASYNCCKPT_WRITER_MODE=service $(BIN)/python -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Runs the reliability tests and, if every one of them passed, rewrites docs/RELIABILITY.md.
reliability: $(STAMP)
	$(BIN)/python -m pytest -q --reliability-report=docs/RELIABILITY.md $(PYTEST_ARGS) $(RELIABILITY_TESTS)

bench-deps: $(STAMP)
	$(BIN)/python -m pip install --quiet -c $(VENV)/.torch-pin -e ".[dev,bench]"

bench: bench-deps
	$(BIN)/python -m benchmarks --config benchmarks/configs/gpt_1p5gb.yaml

# Issue 10's CPU targets: warm stall vs a memcpy timed beside each save, the first save of a saver built 3 s
# ahead, with lazy and eager snapshots (-> benchmarks/results/cpu_stall{,_eager}/), and compression: auto vs on
# and off (-> benchmarks/results/codec_auto/).
bench-cpu: bench-deps
	$(BIN)/python -m benchmarks --config benchmarks/configs/cpu_stall.yaml
	$(BIN)/python -m benchmarks --config benchmarks/configs/cpu_stall_eager.yaml
	$(BIN)/python -m benchmarks --config benchmarks/configs/codec_auto.yaml

bench-many-small: bench-deps
	$(BIN)/python -m benchmarks --config benchmarks/configs/many_small.yaml

# Issue 11: writer.mode thread vs service on gpt_0p5gb, training on one core (-> benchmarks/results/service/) and
# on every core (-> benchmarks/results/service_busy/), then one service for 2 local ranks and the node's thread
# budget (-> benchmarks/results/service/budget.json).
bench-service: bench-deps
	$(BIN)/python -m benchmarks --config benchmarks/configs/service.yaml
	$(BIN)/python -m benchmarks --config benchmarks/configs/service_busy.yaml
	$(BIN)/torchrun --standalone --nproc-per-node 2 -m benchmarks.service_budget --mib 256 --threads 2 --saves 3 \
		--out benchmarks/results/service/budget.json

bench-integrations: bench-deps
	$(BIN)/python -m benchmarks --config benchmarks/configs/integrations.yaml

# The GPU benchmark (issue 10): <= 6 min on one GPU, ~10 GB of state -> benchmarks/results/gpu_10gb/.
# Needs a CUDA torch (TORCH_SPEC); `make bench-gpu BENCH_GPU_ARGS=--smoke` checks the script on CPU.
bench-gpu: bench-deps
	$(BIN)/python -m benchmarks.gpu --config benchmarks/configs/gpu_10gb.yaml $(BENCH_GPU_ARGS)

clean:
	rm -rf $(VENV) .demo_ckpt .pytest_cache build *.egg-info
