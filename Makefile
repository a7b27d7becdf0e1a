# Every target sets itself up: a fresh clone needs only python3 (>=3.10) and pip.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# The CPU build of torch that lies on these machines; installed explicitly first so that
# the package's wide `torch>=...` requirement never pulls a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
# Test processes (pytest-xdist): much of a test's time is single-threaded tracing and export,
# so two processes nearly halve the suite on two cores; more would oversubscribe torch's threads.
WORKERS ?= 2

.PHONY: install demo test test-all bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[all]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rfc-compile demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) -m "not slow" tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) tests

bench: $(STAMP)
	$(BIN)/python benchmarks/speed.py

clean:
	rm -rf $(VENV) build *.egg-info
