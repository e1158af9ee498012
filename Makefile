# The two commands of the README: `make speedrun` (the main job) and `make test`.
# Each creates .venv and installs llmlab into it on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch: small, and what this project trains with on a laptop.
# On a GPU machine install your own torch build first (see README), then `make install TORCH=`.
TORCH ?= torch==2.13.0
PRESET ?= cpu

.PHONY: install browser sandbox test test-all speedrun bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The web UI's browser test drives Debian's Chromium: installed here when missing and apt-get is at hand (as root).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
		apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
		echo "note: chromium is not installed (apt-get install chromium); tests/test_webui.py will be skipped"

# The python tool's sandbox needs bubblewrap (bwrap): installed here when missing and apt-get is at hand (as root).
sandbox:
	@sh scripts/install-sandbox.sh

test: install browser sandbox
	$(PY) -m pytest -q

test-all: install browser sandbox
	$(PY) -m pytest -q -m ""

speedrun: install sandbox
	$(VENV)/bin/llmlab speedrun --preset $(PRESET)

bench: install
	$(PY) bench/run_all.py

clean:
	rm -rf runs data/world .pytest_cache
