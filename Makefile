# Two commands matter: `make run` (the whole system, embedded defaults) and `make test`.
SHELL := /bin/bash
PYTHON_VERSION ?= 3.11
UV := $(shell command -v uv 2>/dev/null || echo .bootstrap/bin/uv)
VENV := .venv
PY := $(VENV)/bin/python
MANAGE := $(PY) manage.py

.PHONY: run test lint format bench migrate install clean

$(UV):
	python$(PYTHON_VERSION) -m venv .bootstrap || python3 -m venv .bootstrap
	.bootstrap/bin/pip install --quiet --disable-pip-version-check "uv>=0.5,<1"

# Each target installs what it needs and nothing more: `make run` the runtime dependencies only,
# `make test`/`lint`/`bench` add their groups (pyproject.toml [dependency-groups]).
SYNC := $(UV) sync --frozen --python $(PYTHON_VERSION) --no-default-groups --inexact

$(VENV)/.runtime: uv.lock pyproject.toml | $(UV)
	$(SYNC)
	@touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(SYNC) --group test
	@touch $@

$(VENV)/.lint: $(VENV)/.test
	$(SYNC) --group test --group lint
	@touch $@

$(VENV)/.bench: $(VENV)/.test
	$(SYNC) --group test --group bench
	@touch $@

install: $(VENV)/.runtime

migrate: install
	@mkdir -p var
	$(MANAGE) migrate --noinput -v 0

run: migrate
	$(MANAGE) ensure_operator
	$(MANAGE) runall

test: $(VENV)/.test
	@mkdir -p var
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: $(VENV)/.lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/vulture

format: $(VENV)/.lint
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(VENV)/.bench
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .bootstrap var
