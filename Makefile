# Two commands for a fresh CPU machine: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv with pip on first use. torch and triton are pinned in the same pip command as everything
# else, so pip takes the local CPU wheel of torch 2.13.0 instead of a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PINS := torch==2.13.0 triton==3.7.1

.PHONY: demo test venv
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PINS) -e ".[test]"
	touch $@

demo: venv
	$(VENV)/bin/sana-jax demo --out outputs/demo

test: venv
	$(PY) -m pytest -n 2 --durations=15 tests
