# qdet: `make demo` and `make test` set themselves up (see scripts/setup_env.sh).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo lint bench clean

setup:
	@PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup_env.sh

test: setup
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	QDET_QUANT_BACKEND=$${QDET_QUANT_BACKEND:-eager} $(PY) -m pytest -q tests

demo: setup
	$(PY) tools/demo.py

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check . && $(VENV)/bin/lint-imports

bench: setup
	$(PY) tools/benchmark_quantizer.py

clean:
	rm -rf $(VENV) output*
