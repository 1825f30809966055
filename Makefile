# Two commands matter: `make run` (the whole system, embedded defaults) and `make test`.
SHELL := /bin/bash
PYTHON_VERSION ?= 3.11
UV := $(shell command -v uv 2>/dev/null || echo .bootstrap/bin/uv)
VENV := .venv
PY := $(VENV)/bin/python
MANAGE := $(PY) manage.py

.PHONY: run test test-fast lint format bench migrate install clean

$(UV):
	python$(PYTHON_VERSION) -m venv .bootstrap || python3 -m venv .bootstrap
	.bootstrap/bin/pip install --quiet --disable-pip-version-check "uv>=0.5,<1"

$(VENV)/.installed: uv.lock pyproject.toml | $(UV)
	$(UV) sync --frozen --python $(PYTHON_VERSION)
	@touch $@

install: $(VENV)/.installed

migrate: install
	@mkdir -p var
	$(MANAGE) migrate --noinput -v 0

run: migrate
	$(MANAGE) ensure_operator
	$(MANAGE) runall

test: install
	@mkdir -p var
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .
	$(VENV)/bin/lint-imports --no-cache

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .bootstrap var
