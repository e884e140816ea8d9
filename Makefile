# The two commands a newcomer needs: `make demo` and `make test`. Both do their own set-up.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTHON ?= python3
LINTED := gateway device_drivers rules api simulators

.PHONY: demo test lint bench servers venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,demo]'
	touch $(STAMP)

venv: $(STAMP)

servers:
	./scripts/install-servers.sh

demo: $(STAMP)
	$(BIN)/scgw demo --data-dir .demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy --strict $(LINTED)
	$(BIN)/lint-imports

test: servers $(STAMP) lint
	$(BIN)/pytest -q -p no:cacheprovider -n 2 --dist loadfile

bench: servers $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .demo .mypy_cache .ruff_cache .pytest_cache
