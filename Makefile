# The README's two commands: `make demo` (main job on built-in data) and `make test` (the test suite).
# Both create .venv on first use, installing torch 2.13.0 (CPU build) before the project; the demo
# installs only what it needs (the library and nilearn, whose wheel carries the MNI152 templates of the
# realistic brains), the tests add their extras (slicer-core, vtk, qsm-ci, snakemake).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CORE := $(VENV)/.installed-core
EXTRAS := $(VENV)/.installed-test

.PHONY: demo test bench clean-venv

$(CORE): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[train]"
	touch $(CORE)

$(EXTRAS): $(CORE)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(EXTRAS)

demo: $(CORE)
	$(VENV)/bin/pdiqsm demo --out-dir out/demo
	@echo "The pdiqsm command is in $(VENV)/bin: run 'source $(VENV)/bin/activate' to use it as the README does."

test: $(EXTRAS)
	$(PY) -m pytest Testing

bench: $(EXTRAS)
	$(PY) benchmarks/bench_speed.py

clean-venv:
	rm -rf $(VENV)
