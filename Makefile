# Fresh machine: `make demo` (main job) or `make test` (test suite). Both create .venv first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast test-slow test-browser chromium lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt --config-settings editable_mode=compat -e ".[cpu,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fundus2video demo

# Debian's chromium for the browser tests (Playwright drives it; it never downloads one).
# Tolerant: without apt (or root) the browser tests skip and say why.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v /usr/bin/chromium >/dev/null 2>&1 || \
	  { SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	    ($$SUDO apt-get install -y -q chromium || \
	     ($$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium)) >/dev/null 2>&1 || \
	    echo "chromium not installed (no apt?): the browser tests will skip"; }

# The default run: every test group, as CI runs it.
test: $(STAMP) chromium
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow and not browser"

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

test-browser: $(STAMP) chromium
	$(BIN)/pytest -q -m browser

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/phantom_bench.py
	$(BIN)/python benchmarks/api_bench.py

clean:
	rm -rf .demo benchmarks/results
