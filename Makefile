# The two commands a new user runs: `make demo` and `make test`. Both set everything up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-scale fuzz install lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m core_hub demo

# The suite in TEST_WORKERS processes (pytest-xdist), whole files per worker (module fixtures
# start a hub once): most of a test is waiting on real processes, so two halve the time here.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(BIN)/python -m bench

# A simulated fleet (real agent sync code) against a real hub: BENCH_AGENTS=3000 make bench-scale
# (BENCH_STEADY_S: steady window; BENCH_WORKERS: simulator processes, default one per 1,000
# agents; BENCH_HEARTBEAT_S: the agents' heartbeat, default 2; 10,000 agents fit this 2-core
# box at BENCH_HEARTBEAT_S=30: docs/scaling.md); then the reconnect storm (BENCH_STORM_AGENTS,
# BENCH_STORM_EVENTS).
bench-scale: $(STAMP)
	$(BIN)/python -m bench.fleet
	$(BIN)/python -m bench.storm

fuzz: $(STAMP)
	OUTPOST_FUZZ=300 OUTPOST_FUZZ_TIMEOUT=3600 $(BIN)/python -m pytest -q tests/test_fuzz_api.py -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check federation edge_agent core_hub tests bench
	$(BIN)/mypy --strict --ignore-missing-imports federation

clean:
	rm -rf $(VENV) .demo
