# One-command set-up: `make serve` runs the service on the embedded SQLite default,
# `make test` runs the whole suite (PostgreSQL tests run when a server is reachable;
# with CI set they are required).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
export LOYALTY_DATABASE_URL ?= sqlite:///./var/loyalty.db

.PHONY: install serve test test-fast lint format bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

serve: install
	$(BIN)/loyalty migrate
	$(BIN)/loyalty serve --host $(HOST) --port $(PORT)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check loyalty tests benchmarks
	$(BIN)/ruff format --check loyalty tests benchmarks
	$(BIN)/mypy

format: install
	$(BIN)/ruff format loyalty tests benchmarks
	$(BIN)/ruff check --fix loyalty tests benchmarks

bench: install
	$(BIN)/python -m benchmarks.run --full

bench-quick: install
	$(BIN)/python -m benchmarks.run --quick

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
