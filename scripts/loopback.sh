#!/usr/bin/env bash
# Run a command inside a fresh network namespace that has only loopback, so
# anything it starts (a Ray instance) binds and talks to 127.0.0.1 and nothing
# else. Needs root, or unprivileged user namespaces ('unshare -rn' then).
#   bash scripts/loopback.sh .venv/bin/python bench/bench_executor.py
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }
flags=-n
[ "$(id -u)" = 0 ] || flags=-rn
exec unshare "$flags" bash -c 'ip link set lo up && exec "$@"' loopback "$@"
