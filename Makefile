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

bench: $(STAMP)
	$(BIN)/python -m bench

## make loadtest: locust, headless and bounded, against VOD_GATEWAY (the standalone stack by default).
VOD_GATEWAY ?= http://127.0.0.1:8000
loadtest: $(STAMP)
	mkdir -p bench/results
	$(BIN)/locust -f loadtests/locustfile.py --headless -u 10 -r 5 -t 10s --host $(VOD_GATEWAY) \
		--csv bench/results/locust --html bench/results/locust.html

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
