# Tandem: `make serve` sets up and runs the default app; `make test` sets up and runs the tests.
# CPU machines install torch's CPU build through constraints-cpu.txt (no CUDA packages).
# On a GPU machine: `make setup CONSTRAINTS=` installs the CUDA torch instead.

VENV ?= .venv
PYTHON ?= python3
CONSTRAINTS ?= -c constraints-cpu.txt
PY := $(VENV)/bin/python

.PHONY: setup serve test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(CONSTRAINTS) -e '.[test]'
	touch $@

serve: setup
	$(VENV)/bin/serve run serve_config.yaml

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check models deployments tests bench
