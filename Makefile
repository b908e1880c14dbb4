# `make run` serves the app; `make test` runs the whole suite, `make test-quick` all but the
# tests marked slow; `make docs` builds the Sphinx site under docs/. All build .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

# What the suite needs beyond Python: Debian's Chromium (tests/test_usage_page.py drives the
# usage page in it), curl (tests/test_gunicorn.py) and Debian's prometheus package, for
# promtool and the server (tests/test_prometheus.py checks deploy/prometheus/ with them).
# Override to check the install step.
CHROMIUM ?= chromium
CURL ?= curl
PROMTOOL ?= promtool
APT_GET ?= apt-get

# The suite in parallel (pytest-xdist): most tests wait on servers, sleeps and sockets, so more
# workers than cores pay (measured: README, "Tests"). Each worker has its own Valkey, ports and
# temp folders; --dist loadgroup keeps the groups tests/conftest.py names on one worker.
# TEST_JOBS=0 runs in one process. PYTEST_ARGS adds options, e.g. PYTEST_ARGS="-p randomly".
TEST_JOBS ?= 4
PYTEST_ARGS ?=
XDIST = -n $(TEST_JOBS) --dist loadgroup

.PHONY: run test test-quick test-tools lint docs bench clean

# The project installs itself (editable), so the app, the tests and the CLI import it by the
# one name an adopter uses: `limiting`.
$(VENV)/.runtime: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	rm -rf flask_llm_limiter.egg-info   # a by-product: stale, it would break a later sdist
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(VENV)/.docs: $(VENV)/.runtime requirements-docs.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-docs.txt
	touch $@

$(VENV)/.bench: $(VENV)/.dev requirements-bench.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-bench.txt
	touch $@

run: $(VENV)/.runtime
	HOST=$(HOST) PORT=$(PORT) $(PY) -m gunicorn -c gunicorn.conf.py app:app

# Installs what is missing when run as root (a fresh container, CI); otherwise stops at once
# with the exact command to run, instead of failing tests minutes later.
test-tools:
	@missing=""; \
	command -v $(CHROMIUM) >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v $(CURL) >/dev/null 2>&1 || missing="$$missing curl"; \
	command -v $(PROMTOOL) >/dev/null 2>&1 || missing="$$missing prometheus"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		echo "make test: installing$$missing"; \
		$(APT_GET) update -qq && \
		DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq$$missing >/dev/null; \
	else \
		echo "make test needs$$missing; run: sudo apt-get update && sudo apt-get install -y$$missing" >&2; \
		exit 1; \
	fi

# Bytecode is written and compiled once, even where PYTHONDONTWRITEBYTECODE is set (CI images
# set it): otherwise every xdist worker rewrites every test module's asserts, and every
# gunicorn and CLI process the tests start compiles the package again (a minute of CPU).
PYTEST = env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -q $(XDIST)
COMPILE = $(PY) -m compileall -q -j 0 limiting fakeprovider blueprints tests app.py

test: $(VENV)/.dev test-tools
	$(COMPILE)
	$(PYTEST) $(PYTEST_ARGS)

test-quick: $(VENV)/.dev test-tools
	$(COMPILE)
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(PY) -m ruff check .
	$(PY) -m mypy

# The site under docs/, warnings as errors: the API and policy-file references are read from
# the code, so a name or key without its documentation fails here. Then README's own links.
docs: $(VENV)/.docs
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	$(PY) docs/_ext/readme_links.py README.md

bench: $(VENV)/.bench
	$(PY) -m bench

clean:
	rm -rf $(VENV) instance .pytest_cache .mypy_cache .ruff_cache docs/_build
