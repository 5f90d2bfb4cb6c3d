# Two commands do all set-up on a fresh clone:  make lab  |  make test
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8888
# Jupyter/IPython state stays inside the project (pip's own config in XDG_CONFIG_HOME is left alone).
export JUPYTER_CONFIG_DIR := $(CURDIR)/.jupyter/config
export JUPYTER_DATA_DIR := $(CURDIR)/.jupyter/data
export JUPYTER_RUNTIME_DIR := $(CURDIR)/.jupyter/runtime
export IPYTHONDIR := $(CURDIR)/.jupyter/ipython

.PHONY: setup lab test test-fast bench clean site

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(VENV)/bin/python requirements.txt pyproject.toml
	mkdir -p $(JUPYTER_CONFIG_DIR) $(JUPYTER_DATA_DIR) $(JUPYTER_RUNTIME_DIR) $(IPYTHONDIR)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (v4lab)" >/dev/null
	$(BIN)/python -m v4lab.labsettings
	touch $(STAMP)

setup: $(STAMP)

# The token travels in JUPYTER_TOKEN (not the command line, which every local user can read); a busy
# PORT is refused instead of Jupyter silently moving to another one (v4lab/labserver.py).
lab: setup
	@$(BIN)/python -m v4lab.labserver --port $(PORT) --root $(CURDIR)/notebooks

test: setup
	$(BIN)/python -m pytest -q tests
	$(BIN)/python -m pytest -q --nbval-lax notebooks

test-fast: setup
	$(BIN)/python -m pytest -q -x -m "not slow and not browser" tests

# Every notebook run headless and exported to static HTML in site/ (git-ignored): open site/index.html.
site: setup
	$(BIN)/python -m v4lab.site

bench: setup
	$(BIN)/v4lab bench all --quick

clean:
	rm -rf $(VENV) .jupyter
