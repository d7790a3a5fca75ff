# `make demo` and `make test` work on a fresh machine with only Python and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.setup-stamp
PYTEST_ARGS ?=

.PHONY: setup demo test test-all bench clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build first, from local disk: a plain `torch` requirement would pull a multi-GB CUDA wheel.
	$(PIP) install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PIP) install -q -e ".[dev,deepspeed,openai,eval]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

test-all: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --runslow $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/bench_step.py
	$(PY) benchmarks/bench_rouge.py
	$(PY) benchmarks/bench_generate.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
