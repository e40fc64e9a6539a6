# The two commands of the README are `make demo` and `make test`; both run `make setup` first.
.PHONY: setup demo test lint typecheck check bench

VENV := .venv
PY := $(VENV)/bin/python

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m medge.demo $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check medge drivers firmware_sim daemons tests bench
	$(VENV)/bin/mypy

check: lint test

bench: setup
	$(PY) -m bench
