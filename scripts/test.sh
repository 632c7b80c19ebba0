#!/usr/bin/env bash
# Installs everything the test suite needs, then runs ruff, mypy (strict) and pytest.
# The suite starts its own redis-server processes (standalone, Cluster, Sentinel) on free
# loopback ports; it only needs the redis-server and redis-cli binaries on PATH.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not redis"`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  echo "redis-server not found: installing Debian's redis-server package" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
  # The package starts a service on 6379; the tests never use it, so leave it be.
fi
command -v redis-server >/dev/null || { echo "redis-server is still missing" >&2; exit 1; }

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'

.venv/bin/ruff check fastapi_ratelimit tests examples bench
.venv/bin/ruff format --check fastapi_ratelimit tests examples bench
.venv/bin/mypy
.venv/bin/python -m pytest "$@"

# The whole run above used the C speedups (tests/test_speedups.py fails under CI=true when
# they were not built). Their pure-Python twins run wherever no compiler was found: run every
# test that needs no Redis again on them (about 25 s).
if [ "$#" -eq 0 ]; then
  FASTAPI_RATELIMIT_PURE=1 .venv/bin/python -m pytest -q -m "not redis and not cluster and not sentinel"
fi
