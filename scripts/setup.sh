#!/usr/bin/env bash
# Creates .venv and installs the package with its test extra at the versions in constraints.txt
# (the ones the suite passed with). CPU torch comes from the lock; on a GPU machine install your
# CUDA torch into .venv first: it is kept (the lock's torch line is then left out).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
lock=constraints.txt
if .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  lock=$(mktemp)
  trap 'rm -f "$lock"' EXIT
  grep -v '^torch==' constraints.txt >"$lock"
else
  .venv/bin/pip install -q -c constraints.txt torch
fi
.venv/bin/pip install -q -c "$lock" -e ".[test]"
