#!/usr/bin/env bash
# The test command: installs what the tests need into the project's own folders, runs ruff
# and shellcheck, then every test. A fresh clone needs only python3 (>= 3.11), git, node and npm.
#   tests/run.sh            # everything
#   tests/run.sh -k claim   # arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'

# The real claude CLI, pinned, for the end-to-end tests (tests/package.json).
npm ci --prefix tests --no-audit --no-fund --loglevel=error

# The checks that keep the code as the README says: lint, types, then the shell scripts.
.venv/bin/ruff check --quiet pmtool tests benchmarks
# pmtool ships py.typed: its annotations are part of the contract (files: pyproject.toml).
.venv/bin/mypy
.venv/bin/shellcheck scripts/*.sh tests/run.sh .ci/run

# The example scripts need jq; install it where we may (CI runs as root on Debian).
if ! command -v jq >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq jq >/dev/null
  else
    echo "tests/run.sh: jq is missing; install it (apt-get install jq) for the scripts tests" >&2
  fi
fi

exec .venv/bin/python -m pytest "$@"
