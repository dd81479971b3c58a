# aekit: one command each for a fresh machine. `make demo` and `make test` install first if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Tests use loopback servers and 2 logical CPU devices; quiet TF's C++ start-up logs.
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: install demo test test-fast bench lint k8s clean

$(BIN)/aekit: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(BIN)/aekit

install: $(BIN)/aekit

demo: $(BIN)/aekit
	$(BIN)/aekit demo --output-dir demo-output

test: $(BIN)/aekit
	$(BIN)/python -m pytest -q

test-fast: $(BIN)/aekit
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(BIN)/aekit
	$(BIN)/python -m benchmarks.run_all --output-dir bench-output

lint: $(BIN)/aekit
	$(BIN)/ruff check .

k8s: $(BIN)/aekit
	$(BIN)/python -m pytest -q tests/test_k8s.py

clean:
	rm -rf demo-output bench-output runs models .pytest_cache
