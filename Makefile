# attnbench: `make bench` and `make test` do all set-up on a fresh machine.
PY      ?= python3
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
SUITE   ?= auto
RUN_ID  ?= $(shell date -u +%Y%m%d-%H%M%S)
RESULTS ?= results/latest
ARGS    ?=

.PHONY: install bench test test-all lint report list clean-results compare

$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[dev,lm]'
	touch $(STAMP)

install: $(STAMP)

# Runs the suite chosen for the device found (SUITE=cpu|gpu|smoke|full to choose), then the report.
bench: $(STAMP)
	ATTNBENCH_RUN_ID=$(RUN_ID) $(PYTHON) -m bench.run suite=$(SUITE) $(ARGS)

test: $(STAMP)
	$(PYTHON) -m pytest -q $(ARGS)

test-all: $(STAMP)
	$(PYTHON) -m pytest -q -m "slow or not slow" $(ARGS)

lint: $(STAMP)
	$(PYTHON) -m ruff check .

report: $(STAMP)
	$(PYTHON) -m bench.report $(RESULTS)

list: $(STAMP)
	$(PYTHON) -m bench.list

# Regression check: `make compare BASE=<baseline results> CAND=<candidate results>`; exit 1 on a regression.
BASE         ?= results/baselines/cpu-smoke
CAND         ?= results/latest
COMPARE_ARGS ?= --normalize-by sdpa
compare: $(STAMP)
	$(PYTHON) -m bench.compare $(BASE) $(CAND) $(COMPARE_ARGS)
