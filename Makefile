# The README's two commands: `make demo` (main job on built-in data) and `make test` (the test suite).
# Both create .venv on first use, installing torch 2.13.0 (CPU build) before the project.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pdiqsm demo --out-dir out/demo

test: $(STAMP)
	$(PY) -m pytest Testing

bench: $(STAMP)
	$(PY) benchmarks/bench_solvers.py

clean-venv:
	rm -rf $(VENV)
