# One-command set-up: every target below creates the virtualenv and installs the project first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install node lint format test demo bench dashboard all clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("Python 3.11+ is required" if sys.version_info < (3, 11) else 0)'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# the celery-node producer test's packages (skipped quietly here when npm is missing; the test says so)
tests/node/node_modules/.package-lock.json: tests/node/package-lock.json
	if command -v npm >/dev/null; then npm ci --prefix tests/node --no-audit --no-fund; fi

node: tests/node/node_modules/.package-lock.json

lint: install
	$(BIN)/ruff check worker tests bench deploy
	$(BIN)/ruff format --check worker tests bench deploy
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix worker tests bench deploy
	$(BIN)/ruff format worker tests bench deploy

test: install node
	$(BIN)/pytest -q $(PYTEST_ARGS)

demo: install
	$(BIN)/vbs-deleter demo

dashboard: install
	$(BIN)/python -m worker.dashboard

all: lint test

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache tests/node/node_modules

bench: install
	$(BIN)/python -m bench.run --runs 3
