#!/usr/bin/env bash
# Run tests/ray inside a loopback-only network namespace (scripts/loopback.sh):
# Ray binds and talks to 127.0.0.1 and nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec bash scripts/loopback.sh "$PY" -m pytest -q -m ray tests/ray "$@"
