# `make run` serves the app; `make test` runs the whole suite. Both build .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint bench clean

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(VENV)/.bench: $(VENV)/.dev requirements-bench.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-bench.txt
	touch $@

run: $(VENV)/.runtime
	HOST=$(HOST) PORT=$(PORT) $(PY) -m gunicorn -c gunicorn.conf.py app:app

test: $(VENV)/.dev
	$(PY) -m pytest -q

lint: $(VENV)/.dev
	$(PY) -m ruff check .
	$(PY) -m mypy

bench: $(VENV)/.bench
	$(PY) -m bench

clean:
	rm -rf $(VENV) instance .pytest_cache .mypy_cache .ruff_cache
