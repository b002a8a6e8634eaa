#!/usr/bin/env bash
# Run the custom-op test suite (tests/ops) against the oldest ONNX Runtime the
# package supports, in a separate venv that reuses the library built by
# scripts/setup.sh. The newest release is what the main venv installs.
#
# Usage: scripts/check_ort_versions.sh [ORT_VERSION ...]   (default: the oldest supported)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(1.17.3)

lib=$("$VENV/bin/python" -c "import nbsmt_onnx; print(nbsmt_onnx.get_library_path())")
for v in "${versions[@]}"; do
  venv=".venv-ort-$v"
  if [ ! -x "$venv/bin/python" ]; then
    "$PYTHON" -m venv "$venv"
    # ORT releases before 1.19 were built against NumPy 1.x.
    numpy_spec="numpy"
    case "$v" in 1.1[0-8].*) numpy_spec="numpy<2" ;; esac
    "$venv/bin/python" -m pip install -q "onnxruntime==$v" "$numpy_spec" onnx onnx-graphsurgeon click tqdm pytest
  fi
  echo "== tests/ops with onnxruntime $v =="
  NBSMT_ONNX_LIBRARY="$lib" PYTHONPATH="$PWD" "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/ops
done
