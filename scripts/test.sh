#!/usr/bin/env bash
# Installs everything the test suite needs, then runs ruff, mypy (strict) and pytest.
#
#   bash scripts/test.sh            the locked toolchain (uv.lock): what CI runs
#   bash scripts/test.sh --latest   the newest release of every dependency, on the newest Python
#                                   found; reports what broke (not in CI)
#   bash scripts/test.sh --setup    only create or update .venv from the lock (for benchmarks)
#   bash scripts/test.sh --lowest   the lowest versions pyproject.toml allows for the library's
#                                   own dependencies (uv's lowest-direct resolution), on Python
#                                   3.11, with the locked test toolchain (not in CI)
#
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not redis"`.
# The suite starts its own redis-server processes (standalone, Cluster, Sentinel) on free
# loopback ports; it only needs the redis-server and redis-cli binaries on PATH. It installs
# those, promtool, docker-compose and chromium from Debian's packages when they are missing.
# Refresh the lock with `.tools/bin/uv lock --upgrade` (then run this script and commit uv.lock).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=locked
case "${1:-}" in
  --latest) MODE=latest; shift ;;
  --lowest) MODE=lowest; shift ;;
  --setup) MODE=setup; shift ;;
esac

# The services and tools the suite uses, from Debian's packages when missing: redis-server
# (every Redis set-up), promtool (package prometheus: the alert rules), docker-compose (only
# its `config` command, no engine) and chromium (the live dashboard's browser test). Under
# CI=true a test whose tool is missing fails rather than skips.
missing=()
{ command -v redis-server && command -v redis-cli; } >/dev/null || missing+=(redis-server)
if [ "$MODE" != setup ]; then
  command -v promtool >/dev/null || missing+=(prometheus)
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  [ -x /usr/bin/chromium ] || missing+=(chromium)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing Debian's ${missing[*]}" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
  # redis-server and prometheus start services (6379, 9090); the tests use neither.
fi
command -v redis-server >/dev/null || { echo "redis-server is still missing" >&2; exit 1; }

# uv itself, at a pinned version, in a virtualenv of its own (.tools/), so that nothing but the
# lock decides what the test environment holds.
UV_VERSION=0.13.9
PYTHON="${PYTHON:-python3}"
if [ ! -x .tools/bin/uv ] || [ "$(.tools/bin/uv --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  rm -rf .tools
  "$PYTHON" -m venv .tools
  .tools/bin/python -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
fi
UV=.tools/bin/uv
export UV_PYTHON_DOWNLOADS=never  # use this machine's Pythons; never fetch one

# Run each check; in the --latest and --lowest modes carry on past a failure and list them all.
FAILED=()
check() {
  local name="$1"
  shift
  echo "--- $name" >&2
  if "$@"; then return 0; fi
  FAILED+=("$name")
  [ "$MODE" = locked ] && { echo "FAILED: $name" >&2; exit 1; }
  return 0
}

lint_and_type() {
  check "ruff check" "$VENV/bin/ruff" check fastapi_ratelimit tests examples bench scripts docs
  check "ruff format" "$VENV/bin/ruff" format --check fastapi_ratelimit tests examples bench scripts docs
  check "mypy" "$VENV/bin/mypy"
}

# The documentation site must build with --strict (broken links and missing API references
# fail); into a temporary directory, since the built site is never committed.
docs_build() {
  local site
  site="$(mktemp -d)"
  NO_MKDOCS_2_WARNING=1 check "mkdocs build" "$VENV/bin/mkdocs" build --strict --quiet --site-dir "$site"
  rm -rf "$site"
}

case "$MODE" in
  locked | setup)
    VENV=.venv
    # --locked: fail when uv.lock no longer matches pyproject.toml, rather than re-resolving.
    "$UV" sync -q --locked --extra dev --extra bench --extra docs --python "$PYTHON"
    ;;
  latest)
    VENV=.venv-latest
    # The newest Python that runs (a pyenv shim may exist for a version it won't run);
    # LATEST_PYTHON chooses one.
    NEWEST="${LATEST_PYTHON:-}"
    for candidate in python3.14 python3.13 python3.12 "$PYTHON"; do
      [ -n "$NEWEST" ] && break
      "$candidate" -c '' 2>/dev/null && NEWEST="$candidate"
    done
    "$UV" venv -q --clear --python "$NEWEST" "$VENV"
    # No lock: the newest release of everything (pre-releases excluded), built fresh.
    "$UV" pip install -q --python "$VENV/bin/python" --upgrade --refresh --no-cache -e '.[dev]'
    ;;
  lowest)
    VENV=.venv-lowest
    "$UV" venv -q --clear --python "${LOWEST_PYTHON:-python3.11}" "$VENV"
    # The library's own ranges at their lowest; the test toolchain at its locked versions.
    python3 scripts/lowest_requirements.py > "$VENV/requirements.txt"
    "$UV" pip install -q --python "$VENV/bin/python" --resolution lowest-direct \
      -r "$VENV/requirements.txt"
    ;;
esac
if [ "$MODE" = setup ]; then
  echo "setup: .venv is in step with uv.lock" >&2
  exit 0
fi
if [ "$MODE" != locked ]; then
  echo "$MODE: installed versions" >&2
  "$UV" pip list --python "$VENV/bin/python" 2>/dev/null \
    | grep -iE '^(starlette|fastapi|loguru|redis|uvicorn|prometheus.client|psutil|httpx|pytest|pytest-asyncio|hypothesis|mypy|ruff|schemathesis|fakeredis) ' >&2 || true
fi

if [ "$MODE" = lowest ]; then
  # The linters' own lowest releases reach no user: lint and type-check with the locked
  # toolchain (a separate environment), and test the library on the lowest versions.
  "$UV" sync -q --locked --extra dev --extra bench --extra docs --python "$PYTHON"
  VENV=.venv lint_and_type
  VENV=.venv-lowest
else
  lint_and_type
fi
# The docs toolchain is locked; only the locked mode builds the site.
if [ "$MODE" = locked ]; then docs_build; fi
check "pytest" "$VENV/bin/python" -m pytest "$@"

if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "$MODE: FAILED: ${FAILED[*]}" >&2
  exit 1
fi
echo "$MODE: all checks passed" >&2
