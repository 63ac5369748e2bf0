#!/usr/bin/env bash
# Sets up jest_pod on a fresh machine: a virtual environment in .venv with the pinned
# dependencies (pyproject.toml), the test extras and TensorFlow + CLU for TensorBoard. Idempotent: a second run only
# re-checks. Debian packages for the real data sets are installed on demand by
# `jest-pod data build` (it says what to run when it cannot).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup.sh: jest_pod needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup.sh: creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup.sh: installing jest_pod and its pinned dependencies (about a minute, 2.4 GB)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[test,tf]'
  rm -f .venv/.installed-* && touch "$stamp"
fi
echo "setup.sh: ready — .venv/bin/jest-pod --help"
