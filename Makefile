# Two commands: `make run` (install + start the gateway) and `make test` (install + every check).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install browser lint typecheck bench fuzz clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/passerelle run --config config.yaml

lint: $(STAMP)
	$(BIN)/ruff check gateway connectors conformance tests bench
	$(BIN)/ruff format --check gateway connectors conformance tests bench
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# The console's end-to-end test drives Debian's headless chromium; installed here when missing.
browser:
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
		&& apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
		|| echo "chromium is missing: install Debian's chromium package for the console test"

test: lint typecheck browser
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/bench_mllp.py

fuzz: $(STAMP)  # hostile-input tests with many more examples than CI (FUZZ_EXAMPLES=2000)
	$(BIN)/python bench/fuzz.py $(or $(FUZZ_EXAMPLES),2000)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
