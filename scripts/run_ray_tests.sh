#!/usr/bin/env bash
# Run tests/ray inside a fresh network namespace that has only loopback, so Ray
# binds and talks to 127.0.0.1 and nothing else. Needs root (or unprivileged
# user namespaces, then 'unshare -rn' is used).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
inner="ip link set lo up && exec $PY -m pytest -q -m ray tests/ray $*"
if [ "$(id -u)" = 0 ]; then
  exec unshare -n bash -c "$inner"
else
  exec unshare -rn bash -c "$inner"
fi
