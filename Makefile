# The two commands of the README:
#   make demo   set up and run the main job on the bundled example model
#   make test   set up and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test lint demo bench clean

setup:
	bash scripts/setup.sh

lint: setup
	$(PY) -m ruff check nbsmt_onnx tests bench models scripts
	$(PY) -m mypy

test: setup lint
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/bench_ops.py

clean:
	rm -rf build $(VENV)
