# tilehopper — the two commands a user needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:/usr/local/go/bin:$(PATH)

.PHONY: help setup test lint demo bench-up bench-down benchmark clean

help:
	@echo "make demo       the main job on the bench: operator, proxies, rotations, tiles, cleanup"
	@echo "make test       the whole test suite (what CI runs)"
	@echo "make bench-up   start every stand-in and write .bench/env (source it)"
	@echo "make bench-down stop everything bench-up started"
	@echo "make benchmark  throughput, switch latency and footprint figures (table + JSON line)"

# Everything the tests need, installed by the project itself: Debian packages, the pinned Python
# dependencies, and the control plane built from its pinned Go modules (cached outside the repo).
setup: $(VENV)/.installed
	@$(PY) -m tilehopper_bench.kube build >/dev/null

$(VENV)/.installed: pyproject.toml tools/install-system-deps.sh
	tools/install-system-deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==25.3
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# pytest's exit code 5 means "no tests ran": that is a failure here, never a silent pass.
test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

lint: $(VENV)/.installed
	$(VENV)/bin/lint-imports

bench-up: setup
	$(PY) -m tilehopper_bench up

bench-down:
	$(PY) -m tilehopper_bench down

demo: setup
	$(PY) -m tilehopper_bench.demo

benchmark: setup
	$(PY) -m tilehopper_bench.benchmark

clean: bench-down
	rm -rf .bench out
