#!/usr/bin/env bash
# One-time set-up on a fresh Debian 12/13 machine: system packages, a virtual
# environment in .venv, and the package built from source (custom_ops/ included).
# Idempotent: re-running only redoes what is missing or out of date.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
# System packages: the Fashion-MNIST data set (example model, demo, tests);
# chromium renders the HTML report in tests/e2e/test_html_render.py.
APT_PACKAGES=(dataset-fashion-mnist chromium)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ! "$PYTHON" -c "import venv, ensurepip" >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: missing Debian packages: ${missing[*]} (run 'sudo apt-get install ${missing[*]}')" >&2
    exit 1
  fi
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi

# Build requirements are installed into the venv so that the editable rebuild
# (scikit-build-core) works without network isolation tricks.
stamp="$VENV/.nbsmt-installed"
if [ ! -f "$stamp" ] || [ -n "$(find pyproject.toml custom_ops -newer "$stamp" -print -quit)" ]; then
  echo "setup: building and installing nbsmt-onnx (C++ op library included)"
  "$VENV/bin/python" -m pip install -q "scikit-build-core>=0.10" cmake ninja
  "$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[test,ray]"
  touch "$stamp"
fi
