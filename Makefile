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

.PHONY: install bytecode serve test test-fast lint format fuzz bench bench-quick bench-smoke soak clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# The suite starts ~500 Python processes (the CLI, servers, workers): compiled once here,
# the project's modules are not compiled again in each of them where the environment
# says PYTHONDONTWRITEBYTECODE (this machine does: ~0.15 s of each ~1.3 s start-up).
bytecode: install
	$(BIN)/python -m compileall -q loyalty tests benchmarks

serve: install
	$(BIN)/loyalty migrate
	$(BIN)/loyalty serve --host $(HOST) --port $(PORT)

# The suite runs in TEST_WORKERS pytest-xdist workers (TEST_WORKERS=0: serial). 4 on 2
# cores because most slow tests wait on the processes they start (servers, workers, the
# CLI, clusters, a browser). Tests marked serial (timing bounds) run one after another in
# one xdist group, and the compensation modules (CLI runs over hundreds of members) in
# another ("cpu-bound", tests/conftest.py); each worker has its own PostgreSQL database,
# temporary directories and ports, and tests that stop a server stop one of their own (a PostgreSQL cluster, a
# RabbitMQ node). The groups only work since tests/conftest.py's hook runs before xdist's
# and pytest is below 9.2 (pyproject.toml): before, they were ignored, and the timing and
# compensation tests ran side by side. About 13 min here at 4 workers before these
# changes (27 serial); the three load-sensitive failures that kept the default serial
# are fixed at their cause (lease rounds wait for a lease holder, forget-me under load is
# an amount of work, the broker restart restarts a node of its own).
TEST_WORKERS ?= 4

test: install bytecode
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# The quick loop (<= 3 min): every test but those marked slow, and tests/conftest.py marks
# slow every test that starts another process (a live server, the CLI, a worker, a
# PostgreSQL cluster, nginx, a browser). `make test` runs them all.
# In-process tests are CPU-bound: one xdist worker per core (FAST_WORKERS).
FAST_WORKERS ?= 2

test-fast: install bytecode
	$(BIN)/python -m pytest -q -m "not slow" -n $(FAST_WORKERS) --dist loadgroup

# lint-imports: the import contracts in pyproject.toml ([tool.importlinter]: the layers
# domain < application < adapters < wiring < entrypoints); tests/unit/test_import_cycles.py:
# no import cycle inside loyalty, even between the modules of one package.
lint: install
	$(BIN)/ruff check loyalty alembic tests benchmarks
	$(BIN)/ruff format --check loyalty alembic tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit/test_import_cycles.py

format: install
	$(BIN)/ruff format loyalty alembic tests benchmarks
	$(BIN)/ruff check --fix loyalty alembic tests benchmarks

# Before a release: the full schemathesis run (examples, coverage, fuzzing and stateful
# phases, 2 workers, FUZZ_SECONDS per backend) against a live `loyalty serve` with its
# workers, on a fresh SQLite file and a fresh PostgreSQL database; fails on any failed
# check and on any 500 in the server's log. `make test` keeps the short, in-process run
# (tests/e2e/test_fuzz_openapi.py).
FUZZ_SECONDS ?= 150
fuzz: install
	$(BIN)/python -m tests.e2e.fuzz_live --backend sqlite --backend postgresql \
		--workers 2 --max-time $(FUZZ_SECONDS)

# The benchmarks need the `bench` extra (matplotlib for the chart, granian, py-spy);
# installed once, again only when pyproject.toml changes.
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.run --full

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.run --quick

# Every benchmark at tiny sizes (about a minute, no targets): shows that each one runs.
# Needs only the `dev` extra; `make test` runs it too (tests/e2e/test_benchmarks_smoke.py).
bench-smoke: install
	$(BIN)/python -m benchmarks.run --smoke

# 10 minutes of mixed traffic at 70% of measured capacity, a worker kill -9 halfway;
# exact balances against the load generator's tally (benchmarks/results/soak.json).
soak: install
	$(BIN)/python -m benchmarks.soak --duration 600

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
