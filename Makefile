# vod — the two commands that matter: `make run` and `make test`.
# Everything installs into ./.venv from the pins in pyproject.toml; nothing by hand.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run services test unit lint format bench loadtest clean install browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-installs whenever the pins change.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(STAMP)

## make run: the whole suite in one process with embedded back ends; prints the URL.
run: $(STAMP)
	$(BIN)/python -m standalone

## make services: the four services as four processes against real back ends (VOD_* vars).
services: $(STAMP)
	BIN=$(BIN) deploy/run-services.sh

## make test: lint, then every test (real MariaDB/Redis/RabbitMQ where reachable).
test: $(STAMP) lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## make unit: the fast tests only (no real back ends, no processes).
unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit tests/api $(PYTEST_ARGS)

## make browser: Debian's chromium for the browser tests (as root), only when missing.
browser:
	test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium)

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## make bench: every micro-benchmark (~12 min, real back ends): bench/results/<name>.json,
## SUMMARY.md and latency-against-load PNGs; `python -m bench NAME` runs one.
bench: $(STAMP)
	$(BIN)/python -m bench

## make loadtest: locust, headless and bounded, against VOD_GATEWAY (the standalone stack by
## default; START=1 also starts it); CSV, HTML and JSON to bench/results/; fails over the
## thresholds (loadtests/README.md).
VOD_GATEWAY ?= http://127.0.0.1:8000
LOADTEST_USERS ?= 20
LOADTEST_SPAWN_RATE ?= 5
LOADTEST_TIME ?= 60s
LOADTEST_MAX_FAILURE_RATIO ?= 0.01
LOADTEST_MAX_P95_MS ?= 500
START ?=
loadtest: $(STAMP)
	$(BIN)/python loadtests/run.py --host $(VOD_GATEWAY) -u $(LOADTEST_USERS) \
		-r $(LOADTEST_SPAWN_RATE) -t $(LOADTEST_TIME) \
		--max-failure-ratio $(LOADTEST_MAX_FAILURE_RATIO) --max-p95-ms $(LOADTEST_MAX_P95_MS) \
		$(if $(filter 1,$(START)),--start)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
