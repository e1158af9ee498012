# The two commands of the README: `make speedrun` (the main job) and `make test`.
# Each creates .venv and installs llmlab into it on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch: small, and what this project trains with on a laptop.
# On a GPU machine install your own torch build first (see README), then `make install TORCH=`.
TORCH ?= torch==2.13.0
PRESET ?= cpu

.PHONY: install test test-all speedrun bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ""

speedrun: install
	$(VENV)/bin/llmlab speedrun --preset $(PRESET)

bench: install
	$(PY) bench/run_all.py

clean:
	rm -rf runs data/world .pytest_cache
