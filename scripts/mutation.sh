#!/usr/bin/env bash
# Mutation testing with mutmut (not in CI): each mutant is one small change to a core module
# (see [tool.mutmut] in pyproject.toml); a mutant that no test fails on "survived" and points at
# behaviour the tests do not pin down.
#
#   bash scripts/mutation.sh                     every mutant of the configured modules
#   bash scripts/mutation.sh 'fastapi_ratelimit.costs*'   only the mutants whose names match
#
# Then `.venv/bin/mutmut results` lists the survivors and `.venv/bin/mutmut show NAME` shows
# one. The work happens in mutants/ (a copy of the package and tests; git-ignored). A full run
# takes well over an hour on two cores: run it at low priority (`nice -n 10 bash
# scripts/mutation.sh`), and for a change give the patterns of the modules it touched.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/mutmut ] || bash scripts/test.sh --setup
.venv/bin/mutmut run "$@"
.venv/bin/mutmut results || true
