# The two commands of the README. Each creates or reuses .venv by itself.
SHELL := /bin/bash
VENV  := .venv/bin
HOST  ?= 127.0.0.1
PORT  ?= 8000
PYTEST_ARGS ?=

.PHONY: serve test lint unit integration e2e bench venv testdeps

venv:
	@scripts/bootstrap.sh

## Debian's prometheus (server + promtool), used by the metrics tests.
testdeps:
	@scripts/test_deps.sh

## Serve the embedded default (SmolLM2-135M-Instruct + demo experts) on localhost:8000.
serve: venv
	$(VENV)/mergeserve serve --host $(HOST) --port $(PORT)

## The whole test suite: lint, types, unit, integration and the real-vLLM e2e tier.
test: venv testdeps lint
	$(VENV)/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/ruff check mergeserve tests benchmarks
	$(VENV)/ruff format --check mergeserve tests benchmarks
	$(VENV)/mypy

unit: venv
	$(VENV)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: venv testdeps
	$(VENV)/python -m pytest tests/integration $(PYTEST_ARGS)

e2e: venv
	$(VENV)/python -m pytest tests/e2e -m vllm $(PYTEST_ARGS)

## Every benchmark on the harness, then docs/benchmarks.md (outside CI; see scripts/bench.sh).
bench: venv
	@scripts/bench.sh
