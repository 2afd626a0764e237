# Two entry points (see README): `make demo` and `make test`.
# Both create .venv from nothing and install requirements; re-running reuses it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export TF_CPP_MIN_LOG_LEVEL ?= 3
export KERAS_BACKEND ?= tensorflow

.PHONY: setup demo test lint clean-demo

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) demo.py --output_dir demo --overwrite

lint: $(STAMP)
	$(PY) -m ruff check .
	$(if $(wildcard *.sh),$(VENV)/bin/shellcheck $(wildcard *.sh),@echo "no shell scripts to check")

test: lint
	$(PY) -m pytest -q

clean-demo:
	rm -rf demo
