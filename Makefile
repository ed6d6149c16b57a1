# llmis — `make serve` runs the server on the bundled model, `make test` runs the suite.
# Both create and fill .venv first when it is missing (see scripts/install.sh).

VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config/llmis.toml
PYTEST_ARGS ?=

.PHONY: install serve test check lint bench clean

$(VENV)/.installed: pyproject.toml scripts/install.sh
	VENV=$(VENV) ./scripts/install.sh

install: $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/llmis serve --config $(CONFIG)

test: $(VENV)/.installed
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff format --check llmis tests scripts
	$(BIN)/ruff check llmis tests scripts
	$(BIN)/mypy

check: lint test

bench: $(VENV)/.installed
	$(BIN)/python -m scripts.bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
