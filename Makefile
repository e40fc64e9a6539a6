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

# Deployment on an edge box (docs/operations.md); none of these are part of `make test`.
.PHONY: install uninstall sbom audit
PREFIX ?= /opt/medge
SBOM_PYTHON ?= $(PY)

install:
	DESTDIR="$(DESTDIR)" PREFIX="$(PREFIX)" bash scripts/install.sh install

uninstall:
	DESTDIR="$(DESTDIR)" PREFIX="$(PREFIX)" PURGE="$(PURGE)" bash scripts/install.sh uninstall

# CycloneDX SBOM of an environment: this venv by default, SBOM_PYTHON=/opt/medge/bin/python on a box
sbom: setup
	$(PY) -m pip install -q "cyclonedx-bom>=4"
	@mkdir -p build
	$(VENV)/bin/cyclonedx-py environment --pyproject pyproject.toml --of JSON \
		-o build/sbom.cdx.json $(SBOM_PYTHON)
	@echo "sbom: build/sbom.cdx.json"

audit: setup
	$(PY) -m pip install -q "pip-audit>=2.7"
	$(PY) scripts/audit.py $(PY)

# Reliability campaign (docs/reliability.md); opt-in, none of these are part of `make test`.
# Smoke runs: CHAOS_ARGS="--parts gateway --outage 5 --pacs-outage 5 --settle 3",
# SOAK_ARGS="--minutes 5"; both default to every part (gateway, scanner, robot).
.PHONY: fuzz chaos soak
FUZZ_SECONDS ?= 60

fuzz: setup
	$(PY) -m pip install -q atheris
	$(PY) -m fuzz.run --seconds $(FUZZ_SECONDS) $(FUZZ_TARGETS)

chaos: setup
	$(PY) -m bench.chaos $(CHAOS_ARGS)

soak: setup
	$(PY) -m bench.soak $(SOAK_ARGS)
