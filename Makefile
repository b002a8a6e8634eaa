# The two commands of the README:
#   make demo   set up, then transform + evaluate the bundled Fashion-MNIST ResNet
#   make test   set up, then lint and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/nbsmt-onnx
DEMO := build/demo
MODEL := models/fashion_mnist/fmnist_resnet.onnx

.PHONY: setup test lint demo bench models clean

setup:
	bash scripts/setup.sh

lint: setup
	$(PY) -m ruff check nbsmt_onnx tests bench models scripts
	$(PY) -m mypy

test: setup lint
	$(PY) -m pytest -q
	PY=$(PY) bash scripts/run_ray_tests.sh

# Real data (Fashion-MNIST from Debian's package): 1000 calibration images from
# the training set (both steps use all 1000), 2000 held-out test images; prints
# the table, writes reports.
demo: setup
	$(PY) models/fashion_mnist/data.py --out $(DEMO)/data --num-calib 1000 --num-eval 2000
	$(CLI) transform $(MODEL) --calib $(DEMO)/data/calib.npz --num-samples 1000 \
	  -o $(DEMO)/fmnist_resnet.nbsmt.onnx --export both --report $(DEMO)/transform.json --force
	$(CLI) evaluate $(MODEL) --data $(DEMO)/data/eval.npz --labels $(DEMO)/data/eval_labels.npy \
	  --calib $(DEMO)/data/calib.npz --num-samples 1000 \
	  --csv $(DEMO)/evaluation.csv --report $(DEMO)/report.html --force
	@echo "demo: models and reports in $(DEMO)/ (open $(DEMO)/report.html)"

bench: setup
	$(PY) bench/bench_ops.py

# Rebuild the example models and their data (dev only: a separate torch venv).
models:
	bash models/build_all.sh

clean:
	rm -rf build $(VENV) .venv-ort-*
