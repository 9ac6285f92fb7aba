# attnbench: `make bench` and `make test` do all set-up on a fresh machine.
PY      ?= python3
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
SUITE   ?= auto
RUN_ID  ?=# empty: a new run, or the unfinished one (results/latest) if the same command was killed
RESULTS ?= results/latest
ARGS    ?=
TEST_JOBS ?= auto# pytest-xdist processes for `make test` (auto: one per core; 0: in this process)

.PHONY: install bench test test-all lint report list clean-results compare gpu-wheels kernel-fit

$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[dev,lm]'
	touch $(STAMP)

install: $(STAMP)

# Runs the suite chosen for the device found (SUITE=cpu|gpu|smoke|full to choose), then the report.
bench: $(STAMP)
	ATTNBENCH_RUN_ID=$(RUN_ID) ATTNBENCH_RESUME=1 $(PYTHON) -m bench.run suite=$(SUITE) $(ARGS)

test: $(STAMP)
	$(PYTHON) -m pytest -q -n $(TEST_JOBS) $(ARGS)

test-all: $(STAMP)
	$(PYTHON) -m pytest -q -n $(TEST_JOBS) -m "slow or not slow" $(ARGS)

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

# Do the Triton kernels fit an A100 (sm_80) and an H100 (sm_90)? Compiled here, no GPU needed; ARGS=--all for
# every configuration instead of one per tile shape. Updates the committed cache results/baselines/kernel_fit.json.
kernel-fit: $(STAMP)
	env -u TRITON_INTERPRET $(PYTHON) -m bench.kernel_fit $(ARGS)

# The device check's offline wheels (scripts/gpu_check.sh): the GPU machine has no network and its image lacks
# Hydra. Run on a connected machine; the versions are the ones .venv runs. antlr4-python3-runtime 4.9.3 (what
# omegaconf 2.3 needs) is an sdist on PyPI, so its pure-Python wheel is built; PyYAML's wheels are per CPython
# version, so one per version the image may have.
WHEEL_PY      := $(if $(wildcard $(PYTHON)),$(PYTHON),$(PY))
PYYAML_PYTHONS = 3.10 3.11 3.12 3.13 3.14
gpu-wheels:
	$(WHEEL_PY) -m pip download --quiet --only-binary=:all: --no-deps -d gpu-wheels hydra-core==1.3.8 omegaconf==2.3.1
	$(WHEEL_PY) -m pip wheel --quiet --no-deps -w gpu-wheels antlr4-python3-runtime==4.9.3
	for v in $(PYYAML_PYTHONS); do \
		$(WHEEL_PY) -m pip download --quiet --only-binary=:all: --no-deps -d gpu-wheels \
			--python-version $$v --platform manylinux2014_x86_64 PyYAML==6.0.4 || exit 1; \
	done
	ls gpu-wheels
