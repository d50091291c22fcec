# One-command set-up: every target below creates the virtualenv and installs the project first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install lint format test demo bench all clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("Python 3.11+ is required" if sys.version_info < (3, 11) else 0)'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check worker tests
	$(BIN)/ruff format --check worker tests
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix worker tests
	$(BIN)/ruff format worker tests

test: install
	$(BIN)/pytest -q $(PYTEST_ARGS)

demo: install
	$(BIN)/vbs-deleter demo

all: lint test

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
