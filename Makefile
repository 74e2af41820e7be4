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

# Options pass through: make run ARGS="--mllp-port 2576 --http-port 8081 --data-dir /tmp/p"
run: $(STAMP)
	$(BIN)/passerelle run --config config.yaml $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check gateway connectors conformance tests bench
	$(BIN)/ruff format --check gateway connectors conformance tests bench
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# The console's end-to-end test drives Debian's headless chromium; installed here when missing
# (with apt-get, only when running as root), and said so before it starts.
browser:
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
		&& echo "make browser: chromium is missing; installing Debian's chromium package with apt-get (as root) for the console test" \
		&& apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
		|| echo "chromium is missing: install Debian's chromium package for the console test"

test: lint typecheck browser
	$(BIN)/pytest -q

bench: $(STAMP)  # text on stdout, plots in bench/out/mllp.svg
	$(BIN)/python bench/bench_mllp.py $(ARGS)

fuzz: $(STAMP)  # hostile-input tests with many more examples than CI (FUZZ_EXAMPLES=2000)
	$(BIN)/python bench/fuzz.py $(or $(FUZZ_EXAMPLES),2000)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
