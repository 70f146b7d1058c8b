# Fresh machine: `make demo` (main job) or `make test` (test suite). Both create .venv first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast test-slow test-browser lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt --config-settings editable_mode=compat -e ".[cpu,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fundus2video demo

# The default run: every test group, as CI runs it.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow and not browser"

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/phantom_bench.py

clean:
	rm -rf .demo benchmarks/results
