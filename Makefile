# Everything runs inside a local virtual environment (.venv) built from requirements/dev.txt.
# `make demo` runs the main job, `make test` the test suite; both set themselves up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
JOBS ?= $(shell nproc)
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*)

.PHONY: demo test compile-check bench install clean

demo: install
	$(PY) -m dla_fused demo

# Tests run in one pytest-xdist worker per core. The sm_90 compile sweep of every Triton kernel
# variant takes minutes: `make compile-check` runs it, one dtype per worker (CI runs both).
test: install
	$(PY) -m pytest tests -q -n $(JOBS) --dist worksteal -m "not compile_sweep"

compile-check: install
	$(PY) -m pytest tests -q -n $(JOBS) -m compile_sweep

bench: install
	$(PY) -m pytest benchmarks -q

install: $(VENV)/.installed

$(VENV)/.deps: requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/dev.txt
	touch $@

$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	set -o pipefail; MAX_JOBS=$(JOBS) $(PY) -m pip install --no-build-isolation --no-deps -v -e . 2>&1 \
		| tee $(VENV)/build.log | grep -E '^ *\[dla_fused\]' || { tail -40 $(VENV)/build.log; exit 1; }
	$(PY) -c "import torch, dla_fused._C"
	touch $@

clean:
	rm -rf build dist *.egg-info dla_fused/*.so $(VENV)
