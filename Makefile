# Two commands set everything up on a fresh machine:
#   make quickstart   venv + install + train DINO on the embedded digits dataset + k-NN evaluation
#   make test         venv with the dev requirements + pytest
# Both install the package itself (`pip install -e .`), so `python -m dino_jax.*` works from any directory.
# GPU: `make JAX=cuda12 quickstart` (or cuda13) installs jax[cuda12] instead of the CPU jax.

PYTHON ?= python3
VENV ?= .venv
JAX ?= cpu
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
WORKDIR ?= runs/quickstart
PYTEST_ARGS ?=

.PHONY: venv install install-dev quickstart test install-check clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# jax[cuda12] pulls the CUDA plugin; requirements.txt then finds jax already satisfied.
install: $(VENV)/bin/python
	@if [ "$(JAX)" != "cpu" ]; then $(PIP) install -q "jax[$(JAX)]>=0.10.2,<0.13"; fi
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .

install-dev: $(VENV)/bin/python
	@if [ "$(JAX)" != "cpu" ]; then $(PIP) install -q "jax[$(JAX)]>=0.10.2,<0.13"; fi
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps -e .

quickstart: install
	$(PY) -m dino_jax.train --config=configs/quickstart.py --workdir=$(WORKDIR)

test: install-dev
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

# CI step: the installed package trains from another directory (one step of a shrunk quickstart, then its k-NN).
install-check: install
	cd $$(mktemp -d) && $(abspath $(PY)) -m dino_jax.train --config=$(CURDIR)/configs/quickstart.py --workdir=run \
	  --config.max_steps=1 --config.model.overrides.depth=1 --config.eval.compare_random_init=False \
	  && test -s run/metrics.jsonl && test -s run/eval.json && echo "install-check: ok"

clean:
	rm -rf $(VENV) runs .pytest_cache
